"""The paged KV cache, its shardings and its sizes.

``init_cache(spec, num_blocks, block_size, dtype)`` -> ``KVCache``: a list with one
``(k_pool, v_pool)`` pair per layer, each ``[num_blocks, num_kv_heads, block_size, head_dim]``
(head-major within a block). A sequence's positions live in the blocks its block table names:
position ``p`` in block ``table[p // block_size]`` at offset ``p % block_size``.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from model_server.models.spec import ModelSpec, dtype_of

KVCache = list  # list[tuple[jax.Array, jax.Array]]: the (k, v) pools of each layer


def kv_bytes_per_token(spec: ModelSpec, dtype: Any = "bfloat16") -> int:
    """Bytes one position of one sequence takes in the KV cache (keys and values, all layers);
    an int8 cache adds its float32 scale per position and KV head."""
    per_head = spec.head_dim * dtype_of(dtype).itemsize
    if dtype_of(dtype) == np.int8:
        per_head += 4
    return spec.num_layers * 2 * spec.num_kv_heads * per_head


def kv_cache_bytes(spec: ModelSpec, tokens: int, dtype: Any = "bfloat16") -> int:
    """Bytes of a KV cache of `tokens` positions in all (e.g. num_blocks * block_size)."""
    return tokens * kv_bytes_per_token(spec, dtype)


def init_cache(spec: ModelSpec, num_blocks: int, block_size: int, dtype: Any,
               sharding: Optional[jax.sharding.Sharding] = None) -> KVCache:
    """Zeroed paged KV cache: list (per layer) of (k pool, v pool), each
    [num_blocks, kv_heads, block_size, head_dim]. An int8 pool is a `quant.QTensor`: int8
    values and a float32 scale per position and KV head [num_blocks, kv_heads, block_size]
    (symmetric, set as each position is written; see layers.write_kv)."""
    from model_server.models.quant import QTensor

    dt = jnp.dtype(dtype)
    shape = (num_blocks, spec.num_kv_heads, block_size, spec.head_dim)

    def full(shape: tuple, dt: Any, value: float) -> jax.Array:
        if sharding is None:
            return jnp.full(shape, value, dt)
        return jax.jit(lambda: jnp.full(shape, value, dt), out_shardings=pool_sharding(sharding, len(shape)))()

    def pool() -> Any:
        if dt == jnp.int8:
            return QTensor(full(shape, dt, 0), full(shape[:-1], jnp.float32, 1.0))
        return full(shape, dt, 0)

    return [(pool(), pool()) for _ in range(spec.num_layers)]


def pool_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The cache's sharding for an array of `ndim` dims of a pool (an int8 pool's scales have
    three: no head dim)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) <= ndim:
        return sharding
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:ndim]))


def cache_shardings(cache: KVCache, sharding: jax.sharding.Sharding) -> Any:
    """The sharding tree of `cache` (e.g. a program's out_shardings)."""
    return jax.tree.map(lambda a: pool_sharding(sharding, a.ndim), cache)


def cache_partition_spec(spec: ModelSpec, axis: str = "tp", axis_size: int = 1):
    """KV cache pools [blocks, kv heads, block size, head dim] split over kv heads when divisible."""
    from jax.sharding import PartitionSpec as P
    if axis_size > 1 and spec.num_kv_heads % axis_size == 0:
        return P(None, axis, None, None)
    return P()
