"""Validation of requests against the model and the engine's limits (user-facing messages).

The fields' bounds are common.bounds' table, the same the APIs check before the engine."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from common.bounds import MAX_LOGIT_BIAS, REQUEST_BOUNDS
from model_server.engine import types
from model_server.engine.types import InvalidRequest, SamplingParams
from model_server.models import base

# The compiled programs hold this many logit_bias entries and top alternatives per row.
assert MAX_LOGIT_BIAS <= types.MAX_LOGIT_BIAS and REQUEST_BOUNDS["logprobs"].hi <= types.MAX_LOGPROBS


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

    def integer(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def within(name: str, value: Any, hi: float | None = None) -> None:
        bound = REQUEST_BOUNDS[name]
        need(bound.holds(value, hi), f"{name} must be {bound.describe(hi)}", name)

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
    within("n", p.n, hi=num_slots)
    within("temperature", p.temperature)
    within("top_k", p.top_k)  # (-1 or 0: off)
    within("top_p", p.top_p)
    need(p.seed is None or integer(p.seed), "seed must be an integer", "seed")  # any: it is hashed
    within("presence_penalty", p.presence_penalty)
    within("frequency_penalty", p.frequency_penalty)
    within("repetition_penalty", p.repetition_penalty)
    need(isinstance(p.logit_bias, dict) and len(p.logit_bias) <= MAX_LOGIT_BIAS,
         f"logit_bias takes at most {MAX_LOGIT_BIAS} entries", "logit_bias")
    for k, v in p.logit_bias.items():
        try:
            kid = int(k)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        need(0 <= kid < spec.vocab_size, f"logit_bias token id {kid} is out of range for a "
             f"vocabulary of {spec.vocab_size} tokens", "logit_bias")
        within("logit_bias", v)
    need(isinstance(p.stop, (list, tuple)) and all(isinstance(s, str) for s in p.stop),
         "stop must be a list of strings", "stop")
    need(isinstance(p.stop_token_ids, (list, tuple)) and all(
        integer(t) and 0 <= t < spec.vocab_size for t in p.stop_token_ids),
        "stop_token_ids must be token ids of this model", "stop_token_ids")
    if p.logprobs is not None:
        within("logprobs", p.logprobs)
    need(isinstance(p.prefix_caching, bool), "prefix_caching must be true or false", "prefix_caching")
    return ids
