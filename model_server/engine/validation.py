"""Validation of requests against the model and the engine's limits (user-facing messages)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from model_server.engine.types import MAX_LOGIT_BIAS, MAX_LOGPROBS, InvalidRequest, SamplingParams
from model_server.models import base


def check_prompt(spec: base.ModelSpec, max_seq_len: int, longest_prompt: int, prompt_ids: Sequence[int]) -> list[int]:
    """The prompt as a list of ints; InvalidRequest unless it is one this engine takes."""
    try:
        ids = [int(t) for t in prompt_ids]
    except (TypeError, ValueError):
        raise InvalidRequest("the prompt must be a list of token ids", "prompt") from None
    if not ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    bad = [t for t in ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is out of range for a vocabulary of "
                             f"{spec.vocab_size} tokens", "prompt")
    if len(ids) > max_seq_len:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens, more than this model's "
                             f"context window of {max_seq_len} tokens", "prompt")
    if len(ids) > longest_prompt:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens, more than the longest "
                             f"prompt this server takes ({longest_prompt})", "prompt")
    return ids


def validate(spec: base.ModelSpec, max_seq_len: int, longest_prompt: int, num_slots: int,
             prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
    """Raise InvalidRequest if the engine cannot serve `params` for the prompt; returns the
    prompt as a list of ints. Prompts up to max_seq_len are generated from (prefilled in
    chunks); prompts scored (prompt logprobs: one cache-free pass) up to `longest_prompt`."""
    ids = check_prompt(spec, max_seq_len, max_seq_len, prompt_ids)
    p = params

    def need(cond: bool, msg: str, param: str) -> None:
        if not cond:
            raise InvalidRequest(msg, param)

    def num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    need(integer(p.max_tokens) and p.max_tokens >= 0, "max_tokens must be a non-negative integer",
         "max_tokens")
    if p.prompt_logprobs and len(ids) > longest_prompt:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens, more than the longest prompt this server "
                             f"scores ({longest_prompt})", "prompt")
    need(p.max_tokens > 0 or p.prompt_logprobs,
         "max_tokens must be at least 1 (0 only when scoring the prompt)", "max_tokens")
    if p.max_tokens > 0 and len(ids) + p.max_tokens > max_seq_len:
        raise InvalidRequest(
            f"this model's context window is {max_seq_len} tokens; the prompt has {len(ids)} "
            f"and max_tokens asks for {p.max_tokens} more ({len(ids) + p.max_tokens} in all)",
            "max_tokens")
    need(integer(p.n) and 1 <= p.n <= num_slots,
         f"n must be between 1 and {num_slots}", "n")
    need(num(p.temperature) and 0 <= p.temperature <= 100, "temperature must be >= 0", "temperature")
    need(integer(p.top_k) and 0 <= p.top_k < 1 << 31, "top_k must be a non-negative integer (0 = off)",
         "top_k")  # it goes into an int32 array: a bigger one would fail the engine loop
    need(num(p.top_p) and 0 < p.top_p <= 1, "top_p must be in (0, 1]", "top_p")
    need(p.seed is None or integer(p.seed), "seed must be an integer", "seed")
    need(num(p.presence_penalty) and -2 <= p.presence_penalty <= 2,
         "presence_penalty must be between -2 and 2", "presence_penalty")
    need(num(p.frequency_penalty) and -2 <= p.frequency_penalty <= 2,
         "frequency_penalty must be between -2 and 2", "frequency_penalty")
    need(num(p.repetition_penalty) and 0 < p.repetition_penalty <= 100,
         "repetition_penalty must be > 0", "repetition_penalty")
    need(isinstance(p.logit_bias, dict) and len(p.logit_bias) <= MAX_LOGIT_BIAS,
         f"logit_bias takes at most {MAX_LOGIT_BIAS} entries", "logit_bias")
    for k, v in p.logit_bias.items():
        try:
            kid = int(k)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        need(0 <= kid < spec.vocab_size, f"logit_bias token id {kid} is out of range for a "
             f"vocabulary of {spec.vocab_size} tokens", "logit_bias")
        need(num(v) and -100 <= v <= 100, "logit_bias values must be between -100 and 100",
             "logit_bias")
    need(isinstance(p.stop, (list, tuple)) and all(isinstance(s, str) for s in p.stop),
         "stop must be a list of strings", "stop")
    need(isinstance(p.stop_token_ids, (list, tuple)) and all(
        integer(t) and 0 <= t < spec.vocab_size for t in p.stop_token_ids),
        "stop_token_ids must be token ids of this model", "stop_token_ids")
    need(p.logprobs is None or (integer(p.logprobs) and 0 <= p.logprobs <= MAX_LOGPROBS),
         f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
    need(isinstance(p.prefix_caching, bool), "prefix_caching must be true or false", "prefix_caching")
    return ids
