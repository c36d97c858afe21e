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
"""
from __future__ import annotations

from typing import Any, Callable

import jax
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


def _block_reader(f: SafetensorsFile, stored: str, rule: Rule, shape: tuple[int, ...],
                  np_dtype: Any) -> Callable[[list[tuple[int, int]]], np.ndarray]:
    raw_shape = f.shape(stored)
    cache: dict[tuple, np.ndarray] = {}

    def read(bounds: list[tuple[int, int]]) -> np.ndarray:
        key = tuple(bounds)
        if key not in cache:
            block = f.read(stored, _to_raw(rule, bounds, raw_shape))
            cache[key] = block.T if rule.transpose else block
        return cache[key]
    return read


def place_rule(f: SafetensorsFile, stored: str, rule: Rule, shape: tuple[int, ...],
               np_dtype: Any, sharding: Any, quantize: bool) -> Any:
    """The param of `rule` as a global array on `sharding` (a `QTensor` of two when `quantize`),
    each addressable device's block read from `f` alone."""
    read = _block_reader(f, stored, rule, shape, np_dtype)
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
