"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): top-k routing and the experts' work.

A sparse layer's params: `router` [E, D]; `e_gate`, `e_up` [E, I, D] and `e_down` [E, D, I],
every expert's torch Linear weights stacked on a leading expert axis.

Routing is transformers': softmax over the router logits (float32), the `top_k` best experts,
their probabilities renormalised to sum 1 when `normalize` (Qwen3-MoE's `norm_topk_prob`;
always for Mixtral). The output is the routing-weighted sum of the chosen experts' SwiGLUs.

Two ways to compute the experts, both with static shapes under `jit`:

* `experts_grouped`: the (token, expert) pairs sorted by expert and cut into tiles of at most
  `tile` rows of one expert; a while loop over the tiles in use runs each tile's SwiGLU with its
  expert's weights. Only the selected experts' weights are read, only their rows computed.
* `experts_dense`: every expert on every token, weighted by the routing weights (zero for the
  experts not chosen): one matmul per projection and E / top_k times the arithmetic.

`moe_mlp` picks by the number of rows (`GROUPED_FROM_ROWS`; bench/moe_experts.py measures
both). With the experts sharded over a mesh axis (expert parallelism) each device computes
the pairs routed to its own experts and the partial outputs are summed (`jax.shard_map`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

F32 = jnp.float32

#: Rows (tokens) from which the grouped path is used; below it the dense one. Measured on the
#: bench's Qwen3-MoE shape (128 experts, top 8), the grouped path was faster at every size from
#: one decode row to prefill (bench/RESULTS.md), so it is used throughout.
GROUPED_FROM_ROWS = 1


def route(h: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] float32, experts [N, k] int32) of the rows h [N, D]."""
    logits = jnp.einsum("nd,ed->ne", h, router, preferred_element_type=F32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def tile_rows(pairs: int, num_experts: int) -> int:
    """Rows per tile: about the mean rows per expert, a power of two in [8, 128]."""
    mean = max(1, pairs // num_experts)
    return min(128, max(8, 1 << (mean - 1).bit_length()))


def experts_grouped(h: jax.Array, experts: jax.Array, weights: jax.Array, e_gate: jax.Array,
                    e_up: jax.Array, e_down: jax.Array, act: Callable, first_expert: jax.Array | int = 0,
                    tile: Optional[int] = None) -> jax.Array:
    """Sum over each row's chosen experts among e_gate.shape[0] local ones (numbered from
    `first_expert`) of weight * SwiGLU, computing only the chosen (token, expert) pairs.
    h [N, D], experts / weights [N, k] -> [N, D] float32 (pairs of other experts add 0)."""
    n, d = h.shape
    local = e_gate.shape[0]
    k = experts.shape[1]
    pairs = n * k
    tile = tile or tile_rows(pairs, local)
    e = experts.reshape(pairs) - first_expert
    mine = (e >= 0) & (e < local)
    e = jnp.where(mine, e, local)  # other devices' experts sort last and are never computed
    order = jnp.argsort(e, stable=True)
    counts = jnp.bincount(e, length=local + 1)[:local]
    starts = jnp.cumsum(counts) - counts
    tiles = (counts + tile - 1) // tile
    tiles_end = jnp.cumsum(tiles)
    rows = jnp.concatenate([h[order // k], jnp.zeros((tile, d), h.dtype)])  # pairs by expert
    scale = jnp.concatenate([jnp.where(mine, weights.reshape(pairs), 0.0)[order], jnp.zeros(tile, F32)])

    def body(carry):
        t, out = carry
        ex = jnp.searchsorted(tiles_end, t, side="right")
        first = (t - (tiles_end[ex] - tiles[ex])) * tile  # this tile's first row within its expert
        r0 = starts[ex] + first
        x = lax.dynamic_slice_in_dim(rows, r0, tile)
        g = jnp.einsum("td,id->ti", x, e_gate[ex], preferred_element_type=F32)
        u = jnp.einsum("td,id->ti", x, e_up[ex], preferred_element_type=F32)
        a = (act(g) * u).astype(h.dtype)
        y = jnp.einsum("ti,di->td", a, e_down[ex], preferred_element_type=F32)
        valid = (jnp.arange(tile) < counts[ex] - first)[:, None]
        y = y * lax.dynamic_slice_in_dim(scale, r0, tile)[:, None]
        old = lax.dynamic_slice_in_dim(out, r0, tile)
        return t + 1, lax.dynamic_update_slice_in_dim(out, jnp.where(valid, y, old), r0, 0)

    out = jnp.zeros((pairs + tile, d), F32)
    _, out = lax.while_loop(lambda c: c[0] < tiles_end[-1], body, (jnp.int32(0), out))
    inverse = jnp.argsort(order)
    return out[inverse].reshape(n, k, d).sum(axis=1)


def experts_dense(h: jax.Array, experts: jax.Array, weights: jax.Array, e_gate: jax.Array,
                  e_up: jax.Array, e_down: jax.Array, act: Callable,
                  first_expert: jax.Array | int = 0) -> jax.Array:
    """The same sum as `experts_grouped`, computing every local expert on every row."""
    n = h.shape[0]
    local = e_gate.shape[0]
    e = experts - first_expert
    e = jnp.where((e >= 0) & (e < local), e, local)
    combine = jnp.zeros((n, local), F32).at[jnp.arange(n)[:, None], e].add(weights, mode="drop")
    g = jnp.einsum("nd,eid->nei", h, e_gate, preferred_element_type=F32)
    u = jnp.einsum("nd,eid->nei", h, e_up, preferred_element_type=F32)
    a = (act(g) * u * combine[:, :, None]).astype(h.dtype)
    return jnp.einsum("nei,edi->nd", a, e_down, preferred_element_type=F32)


def expert_axis(e_gate: jax.Array) -> Optional[tuple[jax.sharding.AbstractMesh, str]]:
    """(mesh, axis) when the experts are split over the first axis of the mesh the params live
    on (see `partition_spec`), else None (one device, or experts not divisible)."""
    mesh = getattr(jax.typeof(e_gate).sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    return (mesh, axis) if size > 1 and e_gate.shape[0] % size == 0 else None


def partition_spec(num_experts: int, axis: str, size: int) -> P:
    """Expert-stacked weights split on their expert axis when it divides by `size`."""
    return P(axis, None, None) if size > 1 and num_experts % size == 0 else P()


def moe_mlp(h: jax.Array, router: jax.Array, e_gate: jax.Array, e_up: jax.Array, e_down: jax.Array,
            top_k: int, normalize: bool, act: Callable, impl: Optional[str] = None) -> jax.Array:
    """The sparse MLP of h [..., D] -> [..., D] (h's dtype). `impl`: "grouped" | "dense" | None
    (by the number of rows, `GROUPED_FROM_ROWS`)."""
    lead, d = h.shape[:-1], h.shape[-1]
    x = h.reshape(-1, d)
    weights, experts = route(x, router, top_k, normalize)
    if impl is None:
        impl = "grouped" if x.shape[0] >= GROUPED_FROM_ROWS else "dense"
    compute = experts_grouped if impl == "grouped" else experts_dense

    sharded = expert_axis(e_gate)
    if sharded is None:
        y = compute(x, experts, weights, e_gate, e_up, e_down, act)
    else:
        mesh, axis = sharded

        def local(x, experts, weights, e_gate, e_up, e_down):
            first = lax.axis_index(axis) * e_gate.shape[0]
            return lax.psum(compute(x, experts, weights, e_gate, e_up, e_down, act, first), axis)

        w = P(axis, None, None)
        y = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), w, w, w), out_specs=P(),
                          check_vma=False)(x, experts, weights, e_gate, e_up, e_down)
    return y.astype(h.dtype).reshape(*lead, d)
