"""PEFT LoRA adapters: read and check `adapter_config.json` + `adapter_model.safetensors`
(local or gs://) against a loaded base, into the padded host arrays one slot of the engine's
adapter stack takes (`model_server.models.lora`)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from model_server import checkpoint as ckpt_lib
from model_server.checkpoint import CheckpointError
from model_server.models import lora as LoRA
from model_server.models.spec import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors",)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"lora_([AB])(?:\.default)?\.weight$")


class AdapterError(CheckpointError):
    """An adapter that cannot be served over its base (bad files, unsupported options)."""


@dataclasses.dataclass
class Adapter:
    """One adapter's weights, scaling folded in: per layer {weight name: (A [r, in], B [out, r])}."""

    source: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    layers: list[dict[str, tuple[np.ndarray, np.ndarray]]]

    def nbytes(self) -> int:
        return int(sum(a.nbytes + b.nbytes for layer in self.layers for a, b in layer.values()))

    def padded(self, spec: ModelSpec, max_rank: int) -> list[dict[str, dict[str, np.ndarray]]]:
        """The weights as one slot of the stack: every projection, rank padded to `max_rank`."""
        out = []
        for i, layer in enumerate(LoRA.slot_shapes(spec, max_rank)):
            row = {}
            for w, s in layer.items():
                a, b = np.zeros(s["a"], np.float32), np.zeros(s["b"], np.float32)
                if w in self.layers[i]:
                    la, lb = self.layers[i][w]
                    a[:la.shape[0]], b[:, :lb.shape[1]] = la, lb
                row[w] = {"a": a, "b": b}
            out.append(row)
        return out


def _targets(cfg: dict) -> tuple[str, ...]:
    raw = cfg.get("target_modules")
    if raw == "all-linear":
        return tuple(LoRA.TARGETS)
    if isinstance(raw, str):  # a regex over module names, as PEFT matches it
        found = tuple(m for m in LoRA.TARGETS if re.fullmatch(raw, f"model.layers.0.self_attn.{m}")
                      or re.fullmatch(raw, f"model.layers.0.mlp.{m}"))
        if not found:
            raise AdapterError(f"target_modules {raw!r} matches none of {', '.join(LoRA.TARGETS)}")
        return found
    if not isinstance(raw, list) or not raw:
        raise AdapterError(f"{CONFIG}: target_modules must be a list of module names, got {raw!r}")
    bad = sorted(set(raw) - set(LoRA.TARGETS))
    if bad:
        raise AdapterError(f"{CONFIG}: unsupported target module(s) {', '.join(bad)}; "
                           f"supported: {', '.join(LoRA.TARGETS)}")
    return tuple(raw)


def check_config(cfg: dict, max_rank: Optional[int] = None) -> tuple[int, float, bool, tuple[str, ...]]:
    """(r, lora_alpha, use_rslora, target modules) of an adapter_config.json; AdapterError for
    anything this server does not serve."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{CONFIG}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise AdapterError(f"{CONFIG}: DoRA adapters (use_dora) are not supported")
    for key in ("alpha_pattern", "rank_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{CONFIG}: per-module {key} is not supported")
    for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices"):
        if cfg.get(key):
            raise AdapterError(f"{CONFIG}: {key} is not supported (an adapter may only change "
                               f"the attention and MLP projections)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{CONFIG}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{CONFIG}: r must be a positive integer, got {r!r}")
    if max_rank is not None and r > max_rank:
        raise AdapterError(f"adapter rank {r} exceeds the base's max_lora_rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{CONFIG}: lora_alpha must be a number, got {alpha!r}")
    return r, float(alpha), bool(cfg.get("use_rslora", False)), _targets(cfg)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {CONFIG} (not a PEFT adapter directory)") from None
    except ValueError as e:
        raise AdapterError(f"{path / CONFIG} is not valid JSON: {e}") from None


def load_adapter(source: str, spec: ModelSpec, max_rank: int, *, cache_dir: Optional[str] = None) -> Adapter:
    """Read and check the adapter at `source` (a directory or gs:// prefix) for base `spec`."""
    if spec.family != "llama" or spec.model_type not in LoRA.MODEL_TYPES:
        raise AdapterError(f"LoRA adapters are served over {', '.join(LoRA.MODEL_TYPES)} bases, "
                           f"not {spec.model_type}")
    path = ckpt_lib.resolve_local(source, cache_dir)
    r, alpha, rslora, targets = check_config(read_config(path), max_rank)
    files = [path / w for w in WEIGHTS if (path / w).is_file()]
    if not files:
        raise AdapterError(f"{source} has no {WEIGHTS[0]}")
    st = ckpt_lib.SafetensorsFile(files[0])
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    dims = LoRA.projection_dims(spec)
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key in st.keys():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{source}: tensor {key!r} is not a LoRA factor of a supported "
                               f"projection ({', '.join(LoRA.TARGETS)})")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in LoRA.TARGETS:
            raise AdapterError(f"{source}: tensor {key!r} adapts unsupported module {module!r}")
        if layer >= spec.num_layers:
            raise AdapterError(f"{source}: tensor {key!r} names layer {layer}; the base has {spec.num_layers}")
        parts.setdefault((layer, LoRA.TARGETS[module]), {})[ab] = np.asarray(st.get(key), np.float32)
    layers: list[dict[str, Any]] = [{} for _ in range(spec.num_layers)]
    for (layer, w), f in parts.items():
        if set(f) != {"A", "B"}:
            raise AdapterError(f"{source}: layer {layer} {w} has lora_{''.join(f)} but not both factors")
        a, b = f["A"], f["B"]
        i, o = dims[w]
        if a.shape != (r, i) or b.shape != (o, r):
            raise AdapterError(f"{source}: layer {layer} {w}: factors {a.shape} x {b.shape} do not fit "
                               f"rank {r} over the base's ({o}, {i}) projection")
        layers[layer][w] = (a, (b * np.float32(scaling)).astype(np.float32))
    if not parts:
        raise AdapterError(f"{source}: {files[0].name} holds no LoRA factors")
    return Adapter(str(source), r, alpha, rslora, targets, layers)
