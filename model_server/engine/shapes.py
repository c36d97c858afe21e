"""The engine's shapes, resolved once from its arguments: prompt buckets (scoring) and chunk
buckets (prefill programs), decode row buckets, and the KV pool's blocks and bytes."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from model_server.knobs import MAX_PREFILL_CHUNK
from model_server.models import base


#: Padded prompt tokens per batched prefill / scoring call; rows = clamp(this // T, 1, 8).
ROW_TOKENS = 256
MAX_ROWS = 8


def rows_for(bucket: int, cap: int) -> int:
    return max(1, min(MAX_ROWS, cap, ROW_TOKENS // bucket))


def default_decode_buckets(num_slots: int) -> list[int]:
    """Row counts of the gathered decode variants (plus num_slots itself).

    A gathered row copies its slot's cache (gather) before attending to it, a full step reads
    every slot once and computes every row; measured on CPU, gathering pays up to about half
    of the slots.
    """
    out, b = [], 1
    while 2 * b <= num_slots:
        out.append(b)
        b *= 2
    return out + [num_slots]


def kv_block_variants(blocks: int, kernels_read_tables: bool) -> list[int]:
    """Table widths (blocks per sequence) the programs are compiled for.

    The CPU kernels read only the positions a query sees, so one width serves every length
    there; the pure-JAX path gathers the table's blocks, so it gets powers of two and all."""
    if kernels_read_tables:
        return [blocks]
    out, k = [], 1
    while k < blocks:
        out.append(k)
        k *= 2
    return out + [blocks]


@dataclasses.dataclass(frozen=True)
class Shapes:
    num_slots: int
    max_seq_len: int
    dtype: str
    kv_cache_dtype: str
    buckets: list[int]          # prompt lengths of the scoring / embedding passes
    chunk_buckets: list[int]    # prompt-chunk lengths of the prefill programs
    decode_buckets: list[int]   # rows of the decode programs
    block_size: int
    num_blocks: int
    kv_cache_bytes: int


def resolve(spec: base.ModelSpec, *, num_slots: int, max_seq_len: int, dtype: str,
            kv_cache_dtype: Optional[str] = None, prefill_buckets: Optional[Sequence[int]] = None,
            decode_buckets: Optional[Sequence[int]] = None, block_size: int = 16,
            num_blocks: Optional[int] = None, kv_cache_bytes: Optional[int] = None) -> Shapes:
    """ValueError naming the argument when the engine cannot take it."""
    if num_slots < 1:
        raise ValueError("num_slots must be >= 1")
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be >= 2")
    if max_seq_len > spec.max_seq_len_limit:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's limit of "
                         f"{spec.max_seq_len_limit} positions")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    num_slots, max_seq_len, block_size = int(num_slots), int(max_seq_len), int(block_size)
    cache_dtype = str(jnp.dtype(kv_cache_dtype or dtype))
    if prefill_buckets is None:
        buckets, b = [], 16
        while b < max_seq_len:
            buckets.append(b)
            b *= 2
        buckets.append(max_seq_len)
    else:
        buckets = sorted({int(b) for b in prefill_buckets if 0 < int(b) <= max_seq_len})
        if not buckets:
            raise ValueError("no usable prefill bucket (all exceed max_seq_len)")
    if decode_buckets is None:
        dbuckets = default_decode_buckets(num_slots)
    else:
        dbuckets = sorted({int(b) for b in decode_buckets if 0 < int(b) < num_slots} | {num_slots})
    max_blocks = -(-max_seq_len // block_size)
    per_block = base.kv_bytes_per_token(spec, cache_dtype) * block_size
    if num_blocks is None:
        num_blocks = int(kv_cache_bytes) // per_block if kv_cache_bytes else num_slots * max_blocks + num_slots
    # one sequence of the whole window, and the extra samples' own last blocks, always fit
    least = max_blocks + num_slots
    if num_blocks < least:
        raise ValueError(f"a KV pool of {num_blocks} blocks of {block_size} positions is too small: it needs "
                         f"at least {least} ({least * per_block} bytes) for one sequence of max_seq_len {max_seq_len}")
    return Shapes(num_slots, max_seq_len, str(jnp.dtype(dtype)), cache_dtype, buckets,
                  [b for b in buckets if b <= MAX_PREFILL_CHUNK] or buckets[:1], dbuckets, block_size,
                  int(num_blocks), int(num_blocks) * per_block)
