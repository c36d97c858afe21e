"""Loading params: safetensors through each family's name table, or an Orbax restore."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from model_server.checkpoint.errors import CheckpointError
from model_server.checkpoint.formats import ORBAX_PARAMS_DIR, Checkpoint, open_checkpoint
from model_server.checkpoint.safetensors_reader import SafetensorsDir
from model_server.checkpoint.shard_read import applied_shape, place_rule, place_stack, quantize_placed
from model_server.checkpoint.sharding import param_shardings, place_params
from model_server.models import base, quant
from model_server.models.hfmap import Rule, empty_like_shapes, set_path

log = logging.getLogger(__name__)


def load_params(ckpt: Checkpoint, dtype: Any = "float32", *,
                mesh: Optional[jax.sharding.Mesh] = None, on_device: bool = True,
                quantization: Optional[str] = None) -> Any:
    """Load the params of `ckpt` in `dtype` (sharded over `mesh` when given); with
    `quantization` ('int8'), the weights its rule names quantized as they are read (HF: block
    by block, from the checkpoint's own precision; Orbax: after the restore, each host its own
    shards on a mesh).

    With `on_device=False` (HF only) returns host numpy arrays, e.g. for conversion.
    """
    t0 = time.monotonic()
    shardings = param_shardings(ckpt.spec, mesh, quantization)
    if ckpt.format == "orbax":
        params = _restore_orbax(ckpt, dtype, param_shardings(ckpt.spec, mesh))
        if quantization is not None and shardings is None:
            params = place_params(quant.quantize_tree(jax.tree.map(np.asarray, params)), None)
        elif quantization is not None:  # each host quantizes its own shards
            params = _quantize_placed_tree(params, shardings)
    else:
        params = _load_hf_params(ckpt, dtype, shardings, on_device, quantization)
    log.info("loaded %s params (%s%s, %.1f MB) in %.2fs", ckpt.source, ckpt.format,
             f", {quantization}" if quantization else "",
             base.param_bytes(ckpt.spec, dtype, quantization) / 1e6, time.monotonic() - t0)
    return params


def _load_hf_params(ckpt: Checkpoint, dtype: Any, shardings: Any, on_device: bool,
                    quantization: Optional[str] = None) -> Any:
    spec = ckpt.spec
    family = base.family_class(spec)
    tensors = SafetensorsDir(ckpt.path)
    rules = family.hf_rules(spec)
    shapes = base.param_shapes(spec)
    names = {r.hf_name: tensors.find(r.hf_name, family.hf_prefix) for r in rules}
    missing = sorted(n for n, found in names.items() if found is None)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{ckpt.source}: {len(missing)} tensors missing for {spec.architecture}: "
            f"{', '.join(missing[:5])}{more}")
    np_dtype = base.dtype_of(dtype)
    params = empty_like_shapes(shapes)
    stacks: dict[tuple, list] = {}  # path -> [host array, entries filled] (expert-stacked params)
    placed = _place_sharded(tensors, names, rules, shapes, np_dtype, shardings, quantization) \
        if on_device and shardings is not None else {}
    for rule in rules:
        if rule.path in placed:
            set_path(params, rule.path, placed[rule.path])
            continue
        stored = names[rule.hf_name]
        raw = tensors.where[stored].get(stored)
        if rule.split is not None and raw.shape[rule.split[0]] % rule.split[2]:
            raise CheckpointError(f"{ckpt.source}: tensor {stored} has shape {raw.shape}, "
                                  f"cannot split it in {rule.split[2]}")
        arr = rule.apply(raw)
        want = _get(shapes, rule.path)
        expect = tuple(want) if rule.index is None else tuple(want[1:])
        if tuple(arr.shape) != expect:
            raise CheckpointError(
                f"{ckpt.source}: tensor {stored} has shape {tuple(raw.shape)}, expected one giving "
                f"{expect} for config {spec.architecture} (hidden {spec.hidden_size}, "
                f"vocab {spec.vocab_size})")
        if rule.index is not None:  # one entry of a stacked param: complete it first
            stack = stacks.setdefault(rule.path, [np.empty(want, np_dtype), 0])
            stack[0][rule.index] = arr
            stack[1] += 1
            if stack[1] < want[0]:
                continue
            arr = stacks.pop(rule.path)[0]
        if quantization is not None and quant.quantizable(str(rule.path[-1]), tuple(arr.shape)):
            arr = quant.quantize_array(arr)
        else:
            arr = np.asarray(arr, dtype=np_dtype)
        if on_device:
            sharding = _get(shardings, rule.path) if shardings is not None else None
            arr = jax.tree.map(_place_host, arr, sharding) if sharding is not None else place_params(arr, None)
        set_path(params, rule.path, arr)
    return params


def _place_sharded(tensors: SafetensorsDir, names: dict, rules: list[Rule], shapes: Any,
                   np_dtype: Any, shardings: Any, quantization: Optional[str]) -> dict[tuple, Any]:
    """The params each host can read shard by shard (plain and expert-stacked), by path; the
    others (a shape the rule cannot give) are left to the whole-tensor path."""
    by_path: dict[tuple, list[Rule]] = {}
    for rule in rules:
        by_path.setdefault(rule.path, []).append(rule)
    out: dict[tuple, Any] = {}
    for path, group in by_path.items():
        want = tuple(_get(shapes, path))
        entries = [(tensors.where[names[r.hf_name]], names[r.hf_name], r) for r in group]
        quantize = quantization is not None and quant.quantizable(str(path[-1]), want)
        sharding = _get(shardings, path)
        if len(group) == 1 and group[0].index is None:
            f, stored, rule = entries[0]
            if applied_shape(rule, f.shape(stored)) == want:
                out[path] = place_rule(f, stored, rule, want, np_dtype, sharding, quantize)
        elif _whole_stack(entries, want):
            entries.sort(key=lambda e: e[2].index)
            out[path] = place_stack(entries, want, np_dtype, sharding, quantize)
    return out


def _whole_stack(entries: list, want: tuple[int, ...]) -> bool:
    """Whether `entries` are the experts 0..n-1 of a stacked param of shape `want`, each
    giving one entry's shape."""
    indices = [r.index for _, _, r in entries]
    if None in indices or sorted(indices) != list(range(want[0])):
        return False
    return all(applied_shape(r, f.shape(stored)) == want[1:] for f, stored, r in entries)


def _quantize_placed_tree(params: Any, shardings: Any, name: str = "") -> Any:
    """Restored params with every quantizable leaf quantized shard by shard on its devices
    (`quantize_placed`), the float leaf released as soon as its int8 one exists."""
    if isinstance(params, dict):
        return {k: _quantize_placed_tree(v, shardings[k], k) for k, v in params.items()}
    if isinstance(params, list):
        return [_quantize_placed_tree(v, s, name) for v, s in zip(params, shardings)]
    if not quant.quantizable(name, tuple(params.shape)):
        return params
    q = quantize_placed(params, shardings)
    params.delete()
    return q


def _place_host(arr: np.ndarray, sharding: Any) -> jax.Array:
    """A host tensor onto `sharding`. Over several hosts (a multi-host slice) each host copies
    only its own devices' shards, without `device_put`'s cross-host equality check (an
    allgather of the whole tensor)."""
    if jax.process_count() == 1:
        return jax.device_put(arr, sharding)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: np.array(arr[idx]))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _restore_orbax(ckpt: Checkpoint, dtype: Any, shardings: Any) -> Any:
    import orbax.checkpoint as ocp

    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, base.param_shapes(ckpt.spec),
                                 is_leaf=lambda x: isinstance(x, tuple))
    target = base.abstract_params(ckpt.spec, dtype, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore((ckpt.path / ORBAX_PARAMS_DIR).absolute(), target)
    except Exception as e:
        raise CheckpointError(f"{ckpt.source}: cannot restore Orbax params: {e}") from e


def load_checkpoint(source: str | os.PathLike, dtype: Any = "float32", *,
                    cache_dir: str | os.PathLike | None = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> tuple[Checkpoint, Any]:
    ckpt = open_checkpoint(source, cache_dir=cache_dir)
    return ckpt, load_params(ckpt, dtype, mesh=mesh)
