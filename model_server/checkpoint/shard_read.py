"""Per-host shard reading: each device's block of a tensor read from the checkpoint alone.

`place_rule` builds a global `jax.Array` for one name-table rule with
`jax.make_array_from_callback`: JAX asks for the block of each *addressable* device, and the
block is mapped back through the rule (rows, split, transpose) to a slice of the stored tensor,
which the reader copies out of its memmap (`SafetensorsFile.read`, which counts the bytes).
On a multi-host slice a host therefore reads only the shards its own devices hold; on one host
every device is addressable and the whole tensor is read once (replicated blocks are cached).

Quantization (int8, per output row, scale = max|row| over the input axis) happens per block:
a block that holds whole rows is exact as it is; a block of a tensor sharded along its input
(last) axis reads the whole rows of its output slice to compute the scales, then keeps its
columns, so the scales equal those of quantizing the whole tensor (such tensors are read in full
rows: row-parallel weights cost their output-slice rows, not half, under quantization).

Expert-stacked MoE params ([experts, out, in], one stored tensor per expert, `Rule.index`) are
placed the same way by `place_stack`: a block reads only the experts on its leading-axis range
(expert parallelism puts each expert on one device, so a host reads only its own experts).

`quantize_placed` quantizes a param that is already on its devices (an Orbax restore with the
target shardings) shard by shard: the row maxima are reduced on the devices (an all-reduce
where the input axis is split, none where it is not), then each host quantizes only its own
blocks with the scales of whole rows, so the values equal a whole-tensor `quantize_array`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from model_server.checkpoint.safetensors_reader import SafetensorsFile
from model_server.models import quant
from model_server.models.hfmap import Rule


def applied_shape(rule: Rule, raw_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `rule.apply` gives a stored tensor of `raw_shape` (None: it cannot apply)."""
    shape = list(raw_shape)
    if rule.rows is not None:
        if not shape or rule.rows[1] > shape[0]:
            return None
        shape[0] = rule.rows[1] - rule.rows[0]
    if rule.split is not None:
        axis, _, parts = rule.split
        if axis >= len(shape) or shape[axis] % parts:
            return None
        shape[axis] //= parts
    return tuple(reversed(shape)) if rule.transpose else tuple(shape)


def _norm(idx: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """A JAX device index (slices, maybe shorter than `shape`) as (start, stop) per axis."""
    out = []
    for axis, size in enumerate(shape):
        s = idx[axis] if axis < len(idx) else slice(None)
        start, stop, step = s.indices(size)
        assert step == 1, s
        out.append((start, stop))
    return out


def _to_raw(rule: Rule, bounds: list[tuple[int, int]], raw_shape: tuple[int, ...]) -> tuple:
    """The slice of the stored tensor that `rule.apply` turns into the block `bounds`."""
    b = list(reversed(bounds)) if rule.transpose else list(bounds)
    if rule.split is not None:
        axis, index, parts = rule.split
        size = (raw_shape[axis] if rule.rows is None or axis else rule.rows[1] - rule.rows[0]) // parts
        b[axis] = (b[axis][0] + index * size, b[axis][1] + index * size)
    if rule.rows is not None:
        b[0] = (b[0][0] + rule.rows[0], b[0][1] + rule.rows[0])
    return tuple(slice(lo, hi) for lo, hi in b)


def _block_reader(f: SafetensorsFile, stored: str, rule: Rule) -> Callable[[list[tuple[int, int]]], np.ndarray]:
    raw_shape = f.shape(stored)
    cache: dict[tuple, np.ndarray] = {}

    def read(bounds: list[tuple[int, int]]) -> np.ndarray:
        key = tuple(bounds)
        if key not in cache:
            block = f.read(stored, _to_raw(rule, bounds, raw_shape))
            cache[key] = block.T if rule.transpose else block
        return cache[key]
    return read


def _stack_reader(entries: list[tuple[SafetensorsFile, str, Rule]]) -> Callable[[list[tuple[int, int]]], np.ndarray]:
    """Blocks of an expert-stacked param: entry e of the leading axis is `entries[e]`'s tensor."""
    readers = [_block_reader(f, stored, rule) for f, stored, rule in entries]

    def read(bounds: list[tuple[int, int]]) -> np.ndarray:
        (lo, hi), rest = bounds[0], bounds[1:]
        return np.stack([readers[e](rest) for e in range(lo, hi)])
    return read


def place_rule(f: SafetensorsFile, stored: str, rule: Rule, shape: tuple[int, ...],
               np_dtype: Any, sharding: Any, quantize: bool) -> Any:
    """The param of `rule` as a global array on `sharding` (a `QTensor` of two when `quantize`),
    each addressable device's block read from `f` alone."""
    return _place(_block_reader(f, stored, rule), shape, np_dtype, sharding, quantize)


def place_stack(entries: list[tuple[SafetensorsFile, str, Rule]], shape: tuple[int, ...],
                np_dtype: Any, sharding: Any, quantize: bool) -> Any:
    """An expert-stacked param [experts, ...] from one stored tensor per expert (`entries` in
    expert order), each addressable device's block read from its own experts' tensors."""
    return _place(_stack_reader(entries), shape, np_dtype, sharding, quantize)


def _place(read: Callable[[list[tuple[int, int]]], np.ndarray], shape: tuple[int, ...],
           np_dtype: Any, sharding: Any, quantize: bool) -> Any:
    if not quantize:
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: np.asarray(read(_norm(idx, shape)), dtype=np_dtype))
    rows_cache: dict[tuple, quant.QTensor] = {}

    def whole_rows(bounds: list[tuple[int, int]]) -> quant.QTensor:
        """The block's output rows over the whole input axis, quantized (cached)."""
        full = [*bounds[:-1], (0, shape[-1])]
        key = tuple(full)
        if key not in rows_cache:
            rows_cache[key] = quant.quantize_array(read(full))
        return rows_cache[key]

    def values(idx: tuple) -> np.ndarray:
        bounds = _norm(idx, shape)
        lo, hi = bounds[-1]
        return np.asarray(whole_rows(bounds).q[..., lo:hi])

    def scales(idx: tuple) -> np.ndarray:
        bounds = _norm(idx, shape[:-1]) + [(0, shape[-1])]
        return np.asarray(whole_rows(bounds).scale)

    return quant.QTensor(jax.make_array_from_callback(shape, sharding.q, values),
                         jax.make_array_from_callback(shape[:-1], sharding.scale, scales))


def quantize_placed(w: jax.Array, sharding: Any) -> quant.QTensor:
    """The global array `w` [..., out, in] int8-quantized onto `sharding` (a `QTensor` of
    shardings), each host quantizing only its addressable blocks (see the module docstring)."""
    if not w.sharding.is_equivalent_to(sharding.q, w.ndim):
        w = jax.device_put(w, sharding.q)
    shape = tuple(w.shape)
    amax = jax.jit(lambda x: jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1),
                   out_shardings=sharding.scale)(w)
    blocks = {tuple(_norm(s.index, shape)): s for s in w.addressable_shards}
    maxima = {tuple(_norm(s.index, shape[:-1])): s for s in amax.addressable_shards}
    done: dict[tuple, quant.QTensor] = {}

    def block(idx: tuple) -> quant.QTensor:
        key = tuple(_norm(idx, shape))
        if key not in done:
            done[key] = quant.quantize_rows(np.asarray(blocks[key].data), np.asarray(maxima[key[:-1]].data))
        return done[key]

    def scales(idx: tuple) -> np.ndarray:
        return quant.row_scales(np.asarray(maxima[tuple(_norm(idx, shape[:-1]))].data))

    return quant.QTensor(jax.make_array_from_callback(shape, sharding.q, lambda idx: block(idx).q),
                         jax.make_array_from_callback(shape[:-1], sharding.scale, scales))
