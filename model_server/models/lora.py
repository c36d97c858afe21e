"""Batched LoRA deltas over the Llama family's projections (the S-LoRA / Punica approach).

The adapters resident on a base live in one stack per projection and layer, a fixed-shape
input of every program: ``{"a": [max_loras, max_rank, in], "b": [out, max_loras, max_rank]}``
(an adapter of a smaller rank is zero-padded; its ``lora_alpha / r`` scaling is folded into
``b``; a projection an adapter does not target is zero). Both are laid out so that a run of
slots is one matrix in the models' ``[out, in]`` layout: ``a`` as ``[slots * rank, in]``,
``b`` as ``[out, slots * rank]``. Each row of a batch names its adapter by index (``-1``:
none), so rows of different adapters (and of the base) share one forward pass, and loading
an adapter writes a slot of the stack: it compiles nothing.

A forward pass first makes a `Plan` of its rows' adapters: the distinct slots its rows use,
gathered to the front, and each row's position among them. Each projection then takes the
branch for the bucket of that count (0, 1, 2, 4, ... up to ``min(max_loras, rows)``): 0 adds
nothing, k multiplies all rows by the k used slots' factors at once, two plain matrix
products (``x [M, in] . a_k^T`` then, each row masked to its own slot's ranks, ``. b_k^T``;
``M * k * rank * (in + out)`` FLOPs, each used slot's factors read once), through
`layers.linear` (the CPU kernel where it serves). Unused slots cost nothing; no row gathers
weights of its own. Every bucket is compiled with the program, so nothing compiles while
serving.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from model_server.models import layers as L
from model_server.models.spec import ModelSpec

#: PEFT target module -> our projection weight (model_server.models.llama).
TARGETS: dict[str, str] = {
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down",
}
#: model types whose projections take adapters
MODEL_TYPES = ("llama", "mistral", "qwen2")


class Plan(NamedTuple):
    """Which slots one forward pass's rows use (computed once, shared by every projection)."""

    index: jax.Array    # [B] each row's slot, -1: none
    order: jax.Array    # [N] the used slots first (ascending), then the others
    compact: jax.Array  # [B] each row's position among the used slots, -1: none
    branch: jax.Array   # () 0: no row uses an adapter; j: the bucket sizes[j - 1] holds them
    sizes: tuple        # the buckets of used-slot counts, ascending, the last min(N, B)


def bucket_sizes(slots: int, rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to min(slots, rows), which ends the list."""
    top = max(1, min(slots, rows))
    sizes = [1]
    while sizes[-1] * 2 < top:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != top:
        sizes.append(top)
    return tuple(sizes)


def plan(index: jax.Array, slots: int) -> Plan:
    """The `Plan` of rows whose adapters are `index` [B] over a stack of `slots` slots."""
    index = index.astype(jnp.int32)
    used = jnp.any(index[:, None] == jnp.arange(slots, dtype=jnp.int32)[None, :], axis=0)  # [N]
    order = jnp.argsort(jnp.logical_not(used), stable=True).astype(jnp.int32)
    position = jnp.cumsum(used.astype(jnp.int32)) - 1
    compact = jnp.where(index >= 0, position[jnp.clip(index, 0, slots - 1)], -1)
    sizes = bucket_sizes(slots, index.shape[0])
    count = jnp.sum(used.astype(jnp.int32))
    bigger = sum((count > s).astype(jnp.int32) for s in sizes[:-1]) if len(sizes) > 1 else 0
    branch = jnp.where(count == 0, 0, 1 + bigger)
    return Plan(index, order, compact, branch, sizes)


class Lora(NamedTuple):
    """What one forward pass gets: the layers' stacks and its rows' `Plan`."""

    stack: list  # per layer: {weight name: {"a": [N, R, in], "b": [out, N, R]}}
    plan: Plan

    @classmethod
    def of(cls, stack: list, index: jax.Array) -> "Lora":
        """The adapters of rows `index` [B] (-1: none) over `stack`."""
        slots = next(iter(stack[0].values()))["a"].shape[0]
        return cls(stack, plan(index, slots))

    def layer(self, i: int) -> "LayerLora":
        return LayerLora(self.stack[i], self.plan)


class LayerLora(NamedTuple):
    stack: dict
    plan: Plan


def projection_dims(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection an adapter may target."""
    d, f = spec.hidden_size, spec.intermediate_size
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"wq": (d, qd), "wk": (d, kvd), "wv": (d, kvd), "wo": (qd, d),
            "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}


def stack_shapes(spec: ModelSpec, max_loras: int, max_rank: int) -> list[dict[str, dict[str, tuple]]]:
    """Shapes of the adapter stack (every projection of every layer)."""
    dims = projection_dims(spec)
    layer = {w: {"a": (max_loras, max_rank, i), "b": (o, max_loras, max_rank)} for w, (i, o) in dims.items()}
    return [layer for _ in range(spec.num_layers)]


def slot_shapes(spec: ModelSpec, max_rank: int) -> list[dict[str, dict[str, tuple]]]:
    """Shapes of one adapter's padded weights (one slot of the stack): a [R, in], b [out, R]."""
    return [{w: {"a": (max_rank, i), "b": (o, max_rank)} for w, (i, o) in projection_dims(spec).items()}
            for _ in range(spec.num_layers)]


def stack_bytes(spec: ModelSpec, max_loras: int, max_rank: int, itemsize: int = 4) -> int:
    dims = projection_dims(spec)
    return spec.num_layers * max_loras * max_rank * sum(i + o for i, o in dims.values()) * itemsize


def _product(x: jax.Array, a: jax.Array, b: jax.Array, rows: jax.Array, size: int) -> jax.Array:
    """x [B, T, in] through `size` slots' factors a [size, R, in], b [out, size, R], each row
    keeping its own slot's (`rows` [B]: its position among them, -1: none) -> [B, T, out] f32."""
    bsz, t, k = x.shape
    r, out = a.shape[1], b.shape[0]
    low = L.linear(x.reshape(bsz * t, k).astype(a.dtype), a.reshape(size * r, k), out_dtype=jnp.float32)
    keep = rows[:, None] == jnp.arange(size, dtype=rows.dtype)[None, :]  # [B, size]
    keep = jnp.repeat(keep, r, axis=1).astype(low.dtype)                 # [B, size * R]
    low = (low.reshape(bsz, t, size * r) * keep[:, None, :]).reshape(bsz * t, size * r)
    return L.linear(low.astype(b.dtype), b.reshape(out, size * r), out_dtype=jnp.float32).reshape(bsz, t, out)


def _delta(x: jax.Array, ab: dict, p: Plan, size: int) -> jax.Array:
    """The delta over the plan's used slots gathered into a run of `size` (all of them: no gather)."""
    a, b = ab["a"], ab["b"]
    if size == a.shape[0]:
        return _product(x, a, b, p.index, size)
    sel = p.order[:size]
    return _product(x, jnp.take(a, sel, axis=0), jnp.take(b, sel, axis=1), p.compact, size)


def add(y: jax.Array, x: jax.Array, lora: Optional[LayerLora], name: str) -> jax.Array:
    """y (the base projection of x [B, T, in]) plus the adapters' delta of projection `name`:
    rows with index -1 get nothing, and a pass with no adapter row skips the work."""
    if lora is None or name not in lora.stack:
        return y
    ab, p = lora.stack[name], lora.plan
    # The branches return only the delta (zeros when no row uses an adapter) and the sum is
    # taken outside: a switch that passes y through costs more on XLA:CPU (measured with
    # bench.lora, AMD EPYC, 2026-12-08).
    zeros = lambda: jnp.zeros(y.shape, jnp.float32)  # noqa: E731
    branches = [zeros] + [(lambda s: lambda: _delta(x, ab, p, s))(s) for s in p.sizes]
    return (y.astype(jnp.float32) + jax.lax.switch(p.branch, branches)).astype(y.dtype)


def set_slot(stack: Any, slot: jax.Array, weights: Any) -> Any:
    """The stack with slot `slot` replaced by one adapter's padded `weights` (see slot_shapes)."""
    def put(layer_stack: dict, layer_weights: dict) -> dict:
        return {w: {"a": s["a"].at[slot].set(layer_weights[w]["a"].astype(s["a"].dtype)),
                    "b": s["b"].at[:, slot].set(layer_weights[w]["b"].astype(s["b"].dtype))}
                for w, s in layer_stack.items()}
    return [put(s, w) for s, w in zip(stack, weights)]
