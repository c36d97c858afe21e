"""Validation of request fields shared by the OpenAI and Sax APIs (bounds: common.bounds)."""
from __future__ import annotations

from typing import Any

from common.bounds import MAX_LOGIT_BIAS, MAX_PROMPTS, MAX_STOP, REQUEST_BOUNDS  # noqa: F401 (P.MAX_PROMPTS)
from model_server.api.errors import invalid
from model_server.settings import RequestLimits


def number(body: dict[str, Any], key: str, default: float | None, lo: float, hi: float,
           *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise invalid(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def bounded(body: dict[str, Any], key: str, default: Any, *, hi: float | None = None,
            bound: str | None = None) -> Any:
    """`body[key]` within its REQUEST_BOUNDS entry (`bound`, default `key`; `hi` narrows it),
    else 400 naming `key`; `default` when absent."""
    value = body.get(key)
    if value is None:
        return default
    b = REQUEST_BOUNDS[bound or key]
    top = b.hi if hi is None else min(hi, b.hi)
    if isinstance(value, bool) or not isinstance(value, int if b.integer else (int, float)):
        raise invalid(f"'{key}' must be {'an integer' if b.integer else 'a number'}, got {value!r}", key)
    if not b.holds(value, top):
        raise invalid(f"'{key}' must be {b.describe(top)}, got {value}", key)
    return value


def boolean(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean, got {value!r}", key)
    return value


def string(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise invalid(f"'{key}' must be a string, got {value!r}"[:200], key)
    return value


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise invalid(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise invalid("'stop' sequences must not be empty", "stop")
    return stop


def token_list(value: Any, key: str, vocab_size: int) -> list[int]:
    if (not isinstance(value, list)
            or any(isinstance(t, bool) or not isinstance(t, int) for t in value)):
        raise invalid(f"'{key}' must be a list of token ids", key)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"'{key}' holds token ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}", key)
    return value


def logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid("'logit_bias' must map token ids to biases", "logit_bias")
    out: dict[int, float] = {}
    for k, v in raw.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise invalid(f"'logit_bias' token id {tid} is outside the vocabulary", "logit_bias")
        if not REQUEST_BOUNDS["logit_bias"].holds(v):
            raise invalid(f"'logit_bias' values must be numbers {REQUEST_BOUNDS['logit_bias'].describe()}, "
                          f"got {v!r}", "logit_bias")
        out[tid] = float(v)
    if len(out) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries, got {len(out)}", "logit_bias")
    return out


def check_prompt_tokens(ids: list[int], limits: RequestLimits, param: str = "prompt") -> None:
    """400 when a prompt is longer than the server's --max-prompt-tokens (the engine checks the
    model's context window itself)."""
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise invalid(f"the prompt has {len(ids)} tokens, more than this server's limit of "
                      f"{limits.max_prompt_tokens} prompt tokens", param)


def max_tokens(body: dict[str, Any], key: str, default: int, limits: RequestLimits, lo: int = 0) -> int:
    """The tokens to generate: `body[key]` (refused past the server's --max-tokens), else the
    default bounded by that limit."""
    value = number(body, key, None, lo, int(REQUEST_BOUNDS["max_tokens"].hi), integer=True)
    cap = limits.max_tokens
    if value is None:
        return default if cap is None else min(default, cap)
    if cap is not None and value > cap:
        raise invalid(f"'{key}' is {value}, more than this server's limit of {cap} generated tokens "
                      "per request", key)
    return value


def check_known(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])


def sampling_fields(body: dict[str, Any], vocab_size: int, max_n: int) -> dict[str, Any]:
    """The sampling fields common to completions and chat (OpenAI names, plus top_k,
    repetition_penalty, ignore_eos and stop_token_ids as vLLM accepts them)."""
    top_k = bounded(body, "top_k", 0)
    stop_ids = body.get("stop_token_ids")
    return {
        "temperature": float(bounded(body, "temperature", 1.0)),
        "top_p": float(bounded(body, "top_p", 1.0)),
        "top_k": max(top_k, 0),
        "n": bounded(body, "n", 1, hi=max_n),
        "seed": bounded(body, "seed", None),
        "presence_penalty": float(bounded(body, "presence_penalty", 0.0)),
        "frequency_penalty": float(bounded(body, "frequency_penalty", 0.0)),
        "repetition_penalty": float(bounded(body, "repetition_penalty", 1.0)),
        "logit_bias": logit_bias(body, vocab_size),
        "stop": stop_strings(body),
        "stop_token_ids": token_list(stop_ids, "stop_token_ids", vocab_size) if stop_ids is not None else [],
        "ignore_eos": boolean(body, "ignore_eos"),
        # an extra: false keeps this request's prompt out of the prefix cache (no reuse, no offer)
        "prefix_caching": boolean(body, "prefix_caching", True),
    }


SAMPLING_KEYS = {"temperature", "top_p", "top_k", "n", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "ignore_eos",
                 "prefix_caching"}
