"""Hugging Face tensor name -> our param path rules, shared by the families."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import numpy as np

Path = tuple  # e.g. ("layers", 3, "wq")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our param at `path` is HF tensor `hf_name`, optionally split then transposed.

    `split=(axis, index, parts)` takes chunk `index` of `parts` equal chunks along `axis`
    of the HF tensor (GPT-2's fused c_attn); `rows=(start, stop)` takes those rows (axis 0;
    Phi-3's qkv_proj, whose k and v are smaller than q); `transpose` turns GPT-2's Conv1D
    [in, out] into our [out, in] (torch Linear's layout, which needs none).
    """

    path: Path
    hf_name: str
    transpose: bool = False
    split: Optional[tuple[int, int, int]] = None
    rows: Optional[tuple[int, int]] = None
    #: the HF tensor is entry `index` of our param's leading axis (one expert of the
    #: expert-stacked MoE weights)
    index: Optional[int] = None

    def apply(self, arr: np.ndarray) -> np.ndarray:
        if self.rows is not None:
            arr = arr[self.rows[0]:self.rows[1]]
        if self.split is not None:
            axis, index, parts = self.split
            size = arr.shape[axis] // parts
            arr = np.take(arr, np.arange(index * size, (index + 1) * size), axis=axis)
        if self.transpose:
            arr = arr.T
        return arr


def set_path(tree: dict, path: Path, value: Any) -> None:
    node: Any = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def get_path(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def empty_like_shapes(shapes: Any) -> Any:
    """A mutable skeleton (dicts/lists) with the structure of `shapes`, leaves None."""
    if isinstance(shapes, dict):
        return {k: empty_like_shapes(v) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [empty_like_shapes(v) for v in shapes]
    return None


def to_hf(rules: Iterable[Rule], params: Any) -> dict[str, np.ndarray]:
    """Inverse of the rules: our params -> HF-named tensors (used to export test models)."""
    grouped: dict[str, list[Rule]] = {}
    for rule in rules:
        grouped.setdefault(rule.hf_name, []).append(rule)
    out: dict[str, np.ndarray] = {}
    for name, group in grouped.items():
        arrays = []
        for rule in sorted(group, key=lambda r: r.split[1] if r.split else (r.rows[0] if r.rows else 0)):
            arr = np.asarray(get_path(params, rule.path))
            if rule.index is not None:
                arr = arr[rule.index]
            arrays.append(arr.T if rule.transpose else arr)
        split = group[0].split
        out[name] = np.ascontiguousarray(
            np.concatenate(arrays, axis=split[0] if split else 0) if len(arrays) > 1 else arrays[0])
    return out
