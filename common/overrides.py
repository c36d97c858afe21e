"""The override keys a publish may carry, and their validation (the admin refuses unknown keys
at publish time; the model server turns the serving keys into its ServingKnobs)."""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from common.naming import InvalidArgument


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidArgument(f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v
    return check


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise InvalidArgument(f"expected one of {', '.join(choices)}, got {v!r}")
        return v
    return check


def _buckets(v: Any) -> list[int]:
    if (not isinstance(v, list) or not v
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in v)
            or sorted(set(v)) != v):
        raise InvalidArgument(f"expected a strictly increasing list of positive integers, got {v!r}")
    return v


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list) or any(not isinstance(s, str) or not s for s in v):
        raise InvalidArgument(f"expected a list of strings, got {v!r}")
    return v


def _alias(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}", v):
        raise InvalidArgument(f"expected an alias like 'my-model', got {v!r}")
    return v


def _base(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"/sax/[a-z]+[a-z0-9-_]*/[a-z]+[a-z0-9-_]*", v):
        raise InvalidArgument(f"expected the base's model id like /sax/cell/model, got {v!r}")
    return v


# Every override key a publish may carry. Serving knobs are applied by the
# model server; `ram`, `chip` and `constraints` steer placement; `alias`
# names the model on the OpenAI API.
OVERRIDE_KEYS: dict[str, Callable[[Any], Any]] = {
    "num_slots": _int_in(1, 4096),
    "max_seq_len": _int_in(1, 1 << 20),
    "prefill_buckets": _buckets,
    "dtype": _one_of("float32", "bfloat16"),
    "quantization": _one_of("int8"),
    "kv_cache_dtype": _one_of("float32", "bfloat16", "int8"),
    "max_queue": _int_in(0, 1 << 20),
    "kv_cache_bytes": _int_in(1, 1 << 50),
    "block_size": _int_in(1, 1024),
    "max_num_batched_tokens": _int_in(16, 1 << 20),
    "max_queue_wait_s": _int_in(1, 1 << 20),
    "enable_prefix_caching": lambda v: v if isinstance(v, bool) else (_ for _ in ()).throw(ValueError("must be true or false")),
    "ram": _int_in(0, 1 << 50),
    "chip": lambda v: _str_list(v) if isinstance(v, list) else _str_list([v])[0],
    "constraints": _str_list,
    "alias": _alias,
    "max_loras": _int_in(0, 256),
    "max_lora_rank": _int_in(1, 1024),
    "base": _base,
}

#: The keys the model server applies (model_server.knobs.ServingKnobs' fields); the others steer
#: placement or naming and the model server accepts and ignores them.
SERVING_KEYS = frozenset({"quantization", "kv_cache_dtype", "num_slots", "max_seq_len", "prefill_buckets", "dtype", "max_queue",
                          "kv_cache_bytes", "block_size", "max_num_batched_tokens",
                          "enable_prefix_caching", "max_queue_wait_s", "max_loras",
                          "max_lora_rank"})
PLACEMENT_KEYS = frozenset(OVERRIDE_KEYS) - SERVING_KEYS


def check_overrides(overrides: Any) -> dict[str, Any]:
    """Validates a publish's overrides. Values may be JSON or JSON-encoded strings (Saxml style)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise InvalidArgument("overrides must be an object of KEY: JSON value")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise InvalidArgument(
                f"unknown override {key!r}; known overrides: {', '.join(sorted(OVERRIDE_KEYS))}")
        if isinstance(value, str) and key not in ("alias", "dtype", "chip", "base", "quantization", "kv_cache_dtype"):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidArgument(f"override {key}: {value!r} is not valid JSON") from None
        try:
            out[key] = OVERRIDE_KEYS[key](value)
        except InvalidArgument as e:
            raise InvalidArgument(f"override {key}: {e}") from None
    return out
