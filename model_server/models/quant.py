"""Weight-only int8 quantization (serving override `quantization: int8`).

Rule (the same for every family, by param name):

* quantized: every projection matrix (`w*`: wq, wk, wv, wo, w_gate, w_up, w_down, w_fc,
  w_proj; the experts' stacked `e_gate`, `e_up`, `e_down`), the token embedding `embed` and
  an untied `lm_head`;
* kept in the serving dtype: norms, biases, GPT-2's position table `pos_embed` (one row read
  per token, no bandwidth to save) and an MoE `router` (top-k choices are sensitive to it and
  it is tiny).

Each quantized weight w [..., out, in] (torch Linear's layout) is a `QTensor`: int8 values
q = round(w / s) in [-127, 127] and float32 scales s = max|w[..., o, :]| / 127, one per output
row ("symmetric per-output-channel"). For the embedding that row is a vocabulary entry, so the
one tensor serves both the lookup (rows of q times their scale) and a tied LM head (scaled
columns of the logits). Activations stay in the serving dtype: `x . w^T` is computed as
`(x . q^T) * s`, with q converted to the activations' dtype (exact: |q| <= 127 fits bfloat16)
and float32 accumulation; XLA fuses the conversion into the product on GPU/TPU, and the CPU
matmul kernel reads q itself (see kernels/matmul.cc).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZATIONS = ("int8",)
#: Params by name that stay unquantized although they are matrices.
_KEEP = frozenset({"pos_embed", "router"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """An int8 weight [..., out, in] and its float32 scales [..., out] (a pytree of both)."""

    q: Any
    scale: Any

    def __getitem__(self, index: Any) -> "QTensor":
        """`param[...]` (how NNX modules read their weights) returns the tensor itself."""
        if index is not Ellipsis:
            raise TypeError("a QTensor supports only [...]")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def dtype(self) -> Any:
        return self.q.dtype

    def dequantize(self, dtype: Any) -> jax.Array:
        """The weight in `dtype` (for code that needs a plain matrix)."""
        return (self.q.astype(jnp.float32) * self.scale[..., None]).astype(dtype)

    def rows(self, index: jax.Array, dtype: Any) -> jax.Array:
        """Rows `index` of the weight in `dtype` (an embedding lookup): [*index.shape, in]."""
        q = jnp.take(self.q, index, axis=0, mode="clip")
        s = jnp.take(self.scale, index, axis=0, mode="clip")
        return (q.astype(jnp.float32) * s[..., None]).astype(dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QTensor)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the param `name` of `shape` is quantized (see the module's rule)."""
    if len(shape) < 2 or name in _KEEP:
        return False
    return name in ("embed", "lm_head") or name.startswith(("w", "e_"))


def quantize_array(w: Any) -> QTensor:
    """Symmetric per-output-row int8 (host numpy): scale = max|row| / 127 (1 for a zero row)."""
    w = np.asarray(w, dtype=np.float32)
    return quantize_rows(w, np.max(np.abs(w), axis=-1))


def row_scales(amax: Any) -> np.ndarray:
    """The float32 scales of rows whose max |w| is `amax` (1 for a zero row)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)


def quantize_rows(w: Any, amax: Any) -> QTensor:
    """`w` [..., out, in_part] quantized with the scales of its rows' maxima `amax` [..., out]
    (taken over the whole input axis, which `w` may hold only a slice of): the same values as
    that slice of `quantize_array` of the whole rows."""
    scale = row_scales(amax)
    q = np.clip(np.rint(np.asarray(w, dtype=np.float32) / scale[..., None]), -127, 127)
    return QTensor(q.astype(np.int8), scale)


def quantize_tree(params: Any, name: str = "") -> Any:
    """The param tree with every quantizable leaf a (host) `QTensor`; others unchanged."""
    if isinstance(params, dict):
        return {k: quantize_tree(v, k) for k, v in params.items()}
    if isinstance(params, list):
        return [quantize_tree(v, name) for v in params]
    if isinstance(params, QTensor) or not quantizable(name, tuple(np.shape(params))):
        return params
    return quantize_array(params)


def quantization_of(params: Any) -> Optional[str]:
    """'int8' when the tree holds quantized weights, else None."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    return "int8" if any(is_quantized(leaf) for leaf in leaves) else None


def cast_tree(params: Any, dtype: Any) -> Any:
    """Unquantized leaves cast to `dtype`; quantized ones kept (int8 values, float32 scales)."""
    dt = jnp.dtype(dtype)

    def cast(leaf: Any) -> Any:
        if is_quantized(leaf) or leaf.dtype == dt:
            return leaf
        return jnp.asarray(leaf, dt)

    return jax.tree.map(cast, params, is_leaf=is_quantized)


def partition_specs(specs: Any, shapes: Any, name: str = "") -> Any:
    """The PartitionSpec tree of a quantized param tree: a quantized weight's values as the
    weight, its scales as the weight without its last (input) dimension."""
    from jax.sharding import PartitionSpec as P

    if isinstance(specs, dict):
        return {k: partition_specs(v, shapes[k], k) for k, v in specs.items()}
    if isinstance(specs, list):
        return [partition_specs(v, s, name) for v, s in zip(specs, shapes)]
    if not quantizable(name, tuple(shapes)):
        return specs
    scale = P(*tuple(specs)[:len(shapes) - 1]) if len(tuple(specs)) else P()
    return QTensor(specs, scale)


def param_bytes(shapes: Any, itemsize: int, name: str = "") -> int:
    """Bytes of a param tree of `shapes` quantized by the rule (other leaves `itemsize` each)."""
    if isinstance(shapes, dict):
        return sum(param_bytes(v, itemsize, k) for k, v in shapes.items())
    if isinstance(shapes, list):
        return sum(param_bytes(v, itemsize, name) for v in shapes)
    n = int(np.prod(shapes))
    if quantizable(name, tuple(shapes)):
        return n + 4 * n // shapes[-1]
    return n * itemsize
