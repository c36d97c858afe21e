"""Saxml's LM methods: generate, generate_stream, score, embed.

`extra_inputs` take Saxml's keys; unknown keys are refused (as Saxml does). Beside the numbers,
`json_schema` (a JSON Schema, as an object or its JSON text) constrains the output to it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

from common.bounds import REQUEST_BOUNDS
from model_server.api import params as P
from model_server.api import structured
from model_server.api.errors import from_engine_error, invalid
from model_server.api.sse import DONE, sse
from model_server.manager import ServedModel
from model_server.settings import RequestLimits

# Saxml's HTTP server defaults for generate.
EXTRA_INPUT_DEFAULTS: dict[str, float] = {
    "temperature": 0.5,
    "per_example_max_decode_steps": 128,
    "per_example_top_k": 200,
    "per_example_top_p": 0.95,
    "num_samples": 1,
    "seed": -1,
}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"'{key}' must be a non-empty string", key)
    return value


def _sampling(served: ServedModel, body: dict[str, Any], prompt_len: int, limits: RequestLimits) -> Any:
    from model_server.engine import SamplingParams

    extra = body.get("extra_inputs") or {}
    if not isinstance(extra, dict):
        raise invalid("'extra_inputs' must be an object", "extra_inputs")
    extra = dict(extra)
    schema = extra.pop("json_schema", None)
    guided = structured.guided_spec({"guided_json": schema}) if schema is not None else None
    if guided is not None:
        guided = type(guided)(guided.kind, guided.value, "extra_inputs")
    unknown = sorted(set(extra) - set(EXTRA_INPUT_DEFAULTS))
    if unknown:
        raise invalid(f"unknown extra_inputs {', '.join(unknown)}; accepted: "
                      f"{', '.join(EXTRA_INPUT_DEFAULTS)}, json_schema", "extra_inputs")
    merged = {**EXTRA_INPUT_DEFAULTS, **extra}
    for k, v in merged.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise invalid(f"extra_inputs.{k} must be a number", "extra_inputs")
    window = served.engine.max_seq_len - prompt_len
    steps = int(merged["per_example_max_decode_steps"])
    if steps < 1:
        raise invalid("per_example_max_decode_steps must be >= 1", "extra_inputs")
    if limits.max_tokens is not None:
        if "per_example_max_decode_steps" in extra and steps > limits.max_tokens:
            raise invalid(f"per_example_max_decode_steps is {steps}, more than this server's limit of "
                          f"{limits.max_tokens} generated tokens per request", "extra_inputs")
        steps = min(steps, limits.max_tokens)
    # common.bounds' table; Saxml's top_p excludes 0, and its top_k is clamped to the vocabulary.
    for key, bound in (("temperature", "temperature"), ("per_example_top_p", "top_p")):
        if not REQUEST_BOUNDS[bound].holds(merged[key]) or (key == "per_example_top_p" and merged[key] == 0):
            lo = "0 (exclusive)" if key == "per_example_top_p" else "0"
            raise invalid(f"extra_inputs.{key} must be between {lo} and {REQUEST_BOUNDS[bound].hi:g}, "
                          f"got {merged[key]}", "extra_inputs")
    n = int(merged["num_samples"])
    if not 1 <= n <= limits.max_n:
        raise invalid(f"num_samples must be in [1, {limits.max_n}]", "extra_inputs")
    seed = int(merged["seed"])
    return SamplingParams(max_tokens=max(1, min(steps, window)), temperature=float(merged["temperature"]),
                          top_k=min(max(0, int(merged["per_example_top_k"])), served.loaded.spec.vocab_size),
                          top_p=float(merged["per_example_top_p"]), n=n, logprobs=0,
                          seed=None if seed < 0 else seed, guided=guided)


def _submit(served: ServedModel, ids: list[int], sampling: Any) -> Any:
    try:
        return served.engine.submit(ids, sampling)
    except Exception as e:
        raise from_engine_error(e) from e


def _prompt(served: ServedModel, body: dict[str, Any], limits: RequestLimits) -> list[int]:
    ids = served.engine.tokenizer.encode(_text(body, "text"))
    P.check_prompt_tokens(ids, limits, "text")
    return ids


def generate(served: ServedModel, body: dict[str, Any], limits: RequestLimits = RequestLimits(),
             abandoned: Callable[[], bool] | None = None) -> list[list[Any]]:
    """[[text, score], ...] with score the sum of the sampled tokens' log-probabilities."""
    ids = _prompt(served, body, limits)
    sampling = _sampling(served, body, len(ids), limits)
    handle = _submit(served, ids, sampling)
    texts = [""] * sampling.n
    scores = [0.0] * sampling.n
    try:
        for d in handle.deltas(abandoned):
            texts[d.index] += d.text
            scores[d.index] += sum(e.logprob for e in d.logprobs)
    finally:
        handle.cancel()
    return [[t, s] for t, s in zip(texts, scores)]


def generate_stream(served: ServedModel, body: dict[str, Any], limits: RequestLimits = RequestLimits()
                    ) -> Iterator[bytes]:
    """SSE events `{"index", "text" (new text), "score" (so far), "finish_reason"}`, then [DONE]."""
    ids = _prompt(served, body, limits)
    sampling = _sampling(served, body, len(ids), limits)
    handle = _submit(served, ids, sampling)

    def events() -> Iterator[bytes]:
        scores = [0.0] * sampling.n
        try:
            for d in handle:
                scores[d.index] += sum(e.logprob for e in d.logprobs)
                if d.text or d.finish_reason:
                    yield sse({"index": d.index, "text": d.text, "score": scores[d.index],
                               "finish_reason": d.finish_reason})
            yield DONE
        finally:
            handle.cancel()
    return events()


def split_continuation(tok: Any, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: encode the whole
    text and take what follows the prefix's encoding (falling back to separate encodes
    when a merge crosses the boundary)."""
    ctx = tok.encode(prefix) if prefix else []
    whole = tok.encode(prefix + suffix)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(suffix, add_special_tokens=not ctx)


def score(served: ServedModel, body: dict[str, Any], limits: RequestLimits = RequestLimits()) -> list[float]:
    """log P(suffix | prefix) for each suffix."""
    from model_server.engine import SamplingParams

    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise invalid("'prefix' must be a string", "prefix")
    suffixes = body.get("suffixes", body.get("suffix"))
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    if not isinstance(suffixes, list) or not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise invalid("'suffixes' must be a non-empty list of non-empty strings", "suffixes")
    if len(suffixes) > P.MAX_PROMPTS:
        raise invalid(f"at most {P.MAX_PROMPTS} suffixes per call", "suffixes")
    tok = served.engine.tokenizer
    jobs = []
    for s in suffixes:
        ctx, cont = split_continuation(tok, prefix, s)
        ids = ctx + cont
        P.check_prompt_tokens(ids, limits, "suffixes")
        if len(ids) < 2 and not ctx:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids
        jobs.append((ids, len(cont)))
    # In waves of one slot's worth each: a call with more suffixes than the engine queues at once
    # is not refused as "at capacity, retry" (which no retry could cure).
    out: list[float] = []
    wave = max(1, served.engine.num_slots)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=0)
    for start in range(0, len(jobs), wave):
        handles: list[Any] = []
        try:
            for ids, _ in jobs[start:start + wave]:
                handles.append(_submit(served, ids, scoring))
            for h, (ids, n_cont) in zip(handles, jobs[start:start + wave]):
                for _ in h:
                    pass
                lps = h.prompt_logprobs or []
                tail = lps[len(ids) - n_cont:]
                if any(e is None for e in tail):
                    raise invalid("the suffix needs a non-empty prefix or a BOS token to be scored", "prefix")
                out.append(sum(e.logprob for e in tail))
        finally:
            for h in handles:
                h.cancel()
    return out


def embed(served: ServedModel, text: Any, limits: RequestLimits = RequestLimits(), param: str = "text"
          ) -> list[float]:
    if not isinstance(text, str) or not text:
        raise invalid(f"'{param}' must be a non-empty string", param)
    ids = served.engine.tokenizer.encode(text)
    P.check_prompt_tokens(ids, limits, param)
    try:
        return served.engine.embed(ids)
    except Exception as e:
        raise from_engine_error(e) from e
