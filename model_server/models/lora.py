"""Batched LoRA deltas over the Llama family's projections (the S-LoRA / Punica approach).

The adapters resident on a base live in one stack per projection and layer, a fixed-shape
input of every program: ``{"a": [max_loras, max_rank, in], "b": [max_loras, out, max_rank]}``
(an adapter of a smaller rank is zero-padded; its ``lora_alpha / r`` scaling is folded into
``b``; a projection an adapter does not target is zero). Each row of a batch names its adapter
by index (``-1``: none): the row's low-rank factors are gathered and applied to that row only,
so rows of different adapters (and of the base) share one forward pass, and loading an
adapter writes a slot of the stack: it compiles nothing.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from model_server.models.spec import ModelSpec

#: PEFT target module -> our projection weight (model_server.models.llama).
TARGETS: dict[str, str] = {
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down",
}
#: model types whose projections take adapters
MODEL_TYPES = ("llama", "mistral", "qwen2")


class Lora(NamedTuple):
    """What one forward pass gets: the layers' stacks and each row's adapter index [B]."""

    stack: list  # per layer: {weight name: {"a": [N, R, in], "b": [N, out, R]}}
    index: jax.Array

    def layer(self, i: int) -> "LayerLora":
        return LayerLora(self.stack[i], self.index)


class LayerLora(NamedTuple):
    stack: dict
    index: jax.Array


def projection_dims(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection an adapter may target."""
    d, f = spec.hidden_size, spec.intermediate_size
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"wq": (d, qd), "wk": (d, kvd), "wv": (d, kvd), "wo": (qd, d),
            "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}


def stack_shapes(spec: ModelSpec, max_loras: int, max_rank: int) -> list[dict[str, dict[str, tuple]]]:
    """Shapes of the adapter stack (every projection of every layer)."""
    dims = projection_dims(spec)
    layer = {w: {"a": (max_loras, max_rank, i), "b": (max_loras, o, max_rank)} for w, (i, o) in dims.items()}
    return [layer for _ in range(spec.num_layers)]


def slot_shapes(spec: ModelSpec, max_rank: int) -> list[dict[str, dict[str, tuple]]]:
    """Shapes of one adapter's padded weights (one slot of the stack)."""
    return [{w: {"a": s["a"][1:], "b": s["b"][1:]} for w, s in layer.items()}
            for layer in stack_shapes(spec, 1, max_rank)]


def stack_bytes(spec: ModelSpec, max_loras: int, max_rank: int, itemsize: int = 4) -> int:
    dims = projection_dims(spec)
    return spec.num_layers * max_loras * max_rank * sum(i + o for i, o in dims.values()) * itemsize


def delta(x: jax.Array, lora: Optional[LayerLora], name: str) -> Optional[jax.Array]:
    """The adapters' contribution to projection `name` of x [B, T, in] -> [B, T, out], or None
    without adapters. Rows with index -1 get zero; a batch with no adapter row skips the work.

    Fewer rows than adapter slots: each row's factors are gathered (Punica's BGMV: reads B
    rows' factors). Otherwise every slot's factors are applied once to all rows and each row
    keeps its own adapter's product (reads the stack once; B * max_loras * rank * (in + out)
    FLOPs, small beside the base's B * in * out at serving ranks)."""
    if lora is None or name not in lora.stack:
        return None
    ab, idx = lora.stack[name], lora.index
    n = ab["a"].shape[0]
    out_dim = ab["b"].shape[1]

    def gathered() -> jax.Array:
        sel = jnp.maximum(idx, 0)
        a = jnp.take(ab["a"], sel, axis=0)  # [B, R, in]
        b = jnp.take(ab["b"], sel, axis=0)  # [B, out, R]
        low = jnp.einsum("bti,bri->btr", x.astype(a.dtype), a, preferred_element_type=jnp.float32)
        low = low * (idx >= 0).astype(low.dtype)[:, None, None]
        return jnp.einsum("btr,bor->bto", low.astype(b.dtype), b, preferred_element_type=jnp.float32)

    def dense() -> jax.Array:
        onehot = (idx[:, None] == jnp.arange(n, dtype=idx.dtype)[None, :]).astype(jnp.float32)  # [B, N]
        low = jnp.einsum("bti,nri->btnr", x.astype(ab["a"].dtype), ab["a"], preferred_element_type=jnp.float32)
        low = low * onehot[:, None, :, None]
        return jnp.einsum("btnr,nor->bto", low.astype(ab["b"].dtype), ab["b"], preferred_element_type=jnp.float32)

    compute = gathered if x.shape[0] < n else dense
    zeros = lambda: jnp.zeros(x.shape[:-1] + (out_dim,), jnp.float32)  # noqa: E731
    return jax.lax.cond(jnp.any(idx >= 0), compute, zeros).astype(x.dtype)


def add(y: jax.Array, x: jax.Array, lora: Optional[LayerLora], name: str) -> jax.Array:
    """y (the base projection of x) plus the adapters' delta."""
    d = delta(x, lora, name)
    return y if d is None else y + d


def set_slot(stack: Any, slot: jax.Array, weights: Any) -> Any:
    """The stack with slot `slot` replaced by one adapter's padded `weights` (see slot_shapes)."""
    return jax.tree.map(lambda s, w: s.at[slot].set(w.astype(s.dtype)), stack, weights)
