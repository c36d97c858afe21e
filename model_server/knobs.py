"""Serving knobs a published model's `overrides` may set; the one place that defines them."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from common.overrides import PLACEMENT_KEYS, SERVING_KEYS
DTYPES = ("float32", "bfloat16")
#: Weight quantizations (see models/quant.py) and KV cache dtypes (int8: per-head scales).
QUANTIZATIONS = ("int8",)
KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")
DEFAULT_MAX_SEQ_LEN = 2048
MIN_BUCKET = 16
#: Positions per KV block (a multiple of 16, the CPU prefill kernel's tile; see bench/RESULTS.md).
DEFAULT_BLOCK_SIZE = 16
#: Tokens per engine step while sequences decode: decodes, then prompt chunks.
DEFAULT_TOKEN_BUDGET = 256
#: Longest prompt chunk one prefill call computes: longer prompts prefill in chunks even when
#: nothing decodes (each reads the chunks before it through the block table). Larger buckets
#: serve scoring only; chunks pad less than one long bucket and compile fewer programs.
MAX_PREFILL_CHUNK = 512
#: Seconds a request may wait for admission before its retryable refusal (queue_full).
DEFAULT_MAX_QUEUE_WAIT_S = 60


class OverrideError(ValueError):
    """An override key or value the model server does not accept."""


@dataclasses.dataclass(frozen=True)
class ServingKnobs:
    """Serving configuration. `None` fields are filled by `resolve` from the model/platform.

    num_slots: decode slots (max concurrent sequences); max_seq_len: prompt + generated
    tokens per sequence; prefill_buckets: prompt-chunk lengths prefill is padded to (the
    largest is the longest chunk); dtype: params/KV cache dtype; max_queue: requests waiting
    for a slot before refusals; kv_cache_bytes: the KV block pool's size (default: room for
    num_slots sequences of max_seq_len); block_size: positions per KV block;
    max_num_batched_tokens: tokens per engine step while sequences decode (chunked prefill);
    enable_prefix_caching: reuse cached KV blocks of shared prompt prefixes;
    max_queue_wait_s: seconds a request may wait for a slot and blocks before it is refused
    (retryable: a caller or the frontend tries again, or elsewhere); max_loras: LoRA
    adapters resident at once over this (base) model (0: none; more swap in and out LRU);
    max_lora_rank: the largest adapter rank it takes;
    quantization: None (weights in dtype) or 'int8' (weight-only, per-output-channel scales,
    see models/quant.py); kv_cache_dtype: the KV pool's dtype (default: dtype; 'int8' keeps a
    float32 scale per position and KV head).
    """

    num_slots: int = 8
    max_seq_len: Optional[int] = None
    prefill_buckets: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    max_queue: int = 64
    kv_cache_bytes: Optional[int] = None
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = DEFAULT_TOKEN_BUDGET
    enable_prefix_caching: bool = True
    max_queue_wait_s: int = DEFAULT_MAX_QUEUE_WAIT_S
    max_loras: int = 0
    max_lora_rank: int = 16
    quantization: Optional[str] = None
    kv_cache_dtype: Optional[str] = None

    def num_blocks(self, spec: Any) -> int:
        """Blocks of the KV pool for `spec` (a resolved knob set): `kv_cache_bytes` of them,
        or by default room for num_slots sequences of max_seq_len (and each slot's own last
        block)."""
        from model_server.models import base

        assert self.max_seq_len is not None and self.kv_cache_dtype is not None
        per_block = base.kv_bytes_per_token(spec, self.kv_cache_dtype) * self.block_size
        max_blocks = -(-self.max_seq_len // self.block_size)
        least = max_blocks + self.num_slots
        if self.kv_cache_bytes is None:
            return self.num_slots * max_blocks + self.num_slots
        blocks = self.kv_cache_bytes // per_block
        if blocks < least:
            raise OverrideError(f"kv_cache_bytes {self.kv_cache_bytes} holds {blocks} blocks of {self.block_size} "
                                f"positions; one sequence of max_seq_len {self.max_seq_len} needs {least} "
                                f"({least * per_block} bytes)")
        return blocks

    def resolve(self, max_seq_len_limit: int, platform: Optional[str] = None) -> "ServingKnobs":
        """Fill defaults and check against the model (`max_seq_len_limit` positions)."""
        max_len = self.max_seq_len or min(max_seq_len_limit, DEFAULT_MAX_SEQ_LEN)
        if max_len > max_seq_len_limit:
            raise OverrideError(
                f"max_seq_len {max_len} exceeds the model's limit of {max_seq_len_limit} positions")
        buckets = self.prefill_buckets
        if buckets is None:
            buckets, b = [], MIN_BUCKET
            while b < max_len:
                buckets.append(b)
                b *= 2
            buckets = tuple(buckets + [max_len])
        elif buckets[-1] > max_len:
            raise OverrideError(f"prefill bucket {buckets[-1]} exceeds max_seq_len {max_len}")
        dtype = self.dtype
        if dtype is None:
            if platform is None:
                import jax
                platform = jax.default_backend()
            dtype = "float32" if platform == "cpu" else "bfloat16"
        return dataclasses.replace(self, max_seq_len=max_len, prefill_buckets=tuple(buckets),
                                   dtype=dtype, kv_cache_dtype=self.kv_cache_dtype or dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["prefill_buckets"] is not None:
            d["prefill_buckets"] = list(d["prefill_buckets"])
        return d


KNOB_NAMES = tuple(f.name for f in dataclasses.fields(ServingKnobs))


def _maybe_json(value: Any) -> Any:
    """Values may arrive as JSON text ("8", "[16, 32]") from string-only override maps."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    value = _maybe_json(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OverrideError(f"override {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_overrides(overrides: Optional[Mapping[str, Any]]) -> ServingKnobs:
    """Validate an overrides map into `ServingKnobs`; unknown keys raise `OverrideError`."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(KNOB_NAMES) - PLACEMENT_KEYS)
    if unknown:
        raise OverrideError(
            f"unknown override key(s) {', '.join(map(repr, unknown))}; accepted: "
            f"{', '.join(KNOB_NAMES + tuple(sorted(PLACEMENT_KEYS)))}")
    kw: dict[str, Any] = {}
    if "num_slots" in overrides:
        kw["num_slots"] = _positive_int("num_slots", overrides["num_slots"])
    if "max_seq_len" in overrides:
        kw["max_seq_len"] = _positive_int("max_seq_len", overrides["max_seq_len"], 2)
    if "max_queue" in overrides:
        kw["max_queue"] = _positive_int("max_queue", overrides["max_queue"], 0)
    if "kv_cache_bytes" in overrides:
        kw["kv_cache_bytes"] = _positive_int("kv_cache_bytes", overrides["kv_cache_bytes"])
    if "block_size" in overrides:
        kw["block_size"] = _positive_int("block_size", overrides["block_size"])
        if kw["block_size"] % 16:
            raise OverrideError(f"override 'block_size' must be a multiple of 16, got {kw['block_size']}")
    if "max_num_batched_tokens" in overrides:
        kw["max_num_batched_tokens"] = _positive_int("max_num_batched_tokens", overrides["max_num_batched_tokens"], 16)
    if "max_queue_wait_s" in overrides:
        kw["max_queue_wait_s"] = _positive_int("max_queue_wait_s", overrides["max_queue_wait_s"])
    if "max_loras" in overrides:
        kw["max_loras"] = _positive_int("max_loras", overrides["max_loras"], 0)
    if "max_lora_rank" in overrides:
        kw["max_lora_rank"] = _positive_int("max_lora_rank", overrides["max_lora_rank"])
    if "enable_prefix_caching" in overrides:
        v = _maybe_json(overrides["enable_prefix_caching"])
        if not isinstance(v, bool):
            raise OverrideError(f"override 'enable_prefix_caching' must be true or false, got {v!r}")
        kw["enable_prefix_caching"] = v
    if "dtype" in overrides:
        dtype = overrides["dtype"]
        if dtype not in DTYPES:
            raise OverrideError(f"override 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
        kw["dtype"] = dtype
    for key, allowed in (("quantization", QUANTIZATIONS), ("kv_cache_dtype", KV_CACHE_DTYPES)):
        if key in overrides:
            value = overrides[key]
            if value not in allowed:
                raise OverrideError(f"override {key!r} must be one of {', '.join(allowed)}, got {value!r}")
            kw[key] = value
    if "prefill_buckets" in overrides:
        raw = _maybe_json(overrides["prefill_buckets"])
        if not isinstance(raw, (list, tuple)) or not raw:
            raise OverrideError(f"override 'prefill_buckets' must be a non-empty list of integers, got {raw!r}")
        buckets = tuple(_positive_int("prefill_buckets", b) for b in raw)
        if list(buckets) != sorted(set(buckets)):
            raise OverrideError(f"override 'prefill_buckets' must be strictly increasing, got {list(buckets)}")
        kw["prefill_buckets"] = buckets
    if "max_seq_len" in kw and "prefill_buckets" in kw and kw["prefill_buckets"][-1] > kw["max_seq_len"]:
        raise OverrideError(
            f"prefill bucket {kw['prefill_buckets'][-1]} exceeds max_seq_len {kw['max_seq_len']}")
    return ServingKnobs(**kw)


assert set(KNOB_NAMES) == SERVING_KEYS, "common.overrides.SERVING_KEYS must name every serving knob"
