"""Reading config.json values the families share: RoPE parameters and per-layer windows.

Every value that we cannot serve raises `ModelConfigError` naming the config.json field.
"""
from __future__ import annotations

from typing import Any, Optional

from model_server.models.spec import ModelConfigError

ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("sliding_attention", "full_attention")


def require(cfg: dict, *names: str) -> list[int]:
    """Integer fields that must be present."""
    try:
        return [int(cfg[n]) for n in names]
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks {e.args[0]!r}") from None


def rope(cfg: dict, params: Optional[dict] = None, default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE settings from the new (`rope_parameters`) or old (`rope_theta`, `rope_scaling`)
    format, or from `params`, one layer type's entry of `rope_parameters` (Gemma 3):
    {theta, rope_type, factor, low_freq_factor, high_freq_factor, original_max_position,
    partial_rotary_factor}."""
    field = "rope_parameters"
    if params is None:
        params = cfg.get("rope_parameters")
        if not (isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params)):
            params, field = None, "rope_scaling"
    if params is not None:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
        scaling = params
    else:
        theta = float(cfg.get("rope_theta", default_theta))
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(f"unsupported {field} type {rope_type!r} (config.json {field}.rope_type; "
                               f"supported: {', '.join(ROPE_TYPES)})")
    partial = float(scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return dict(
        theta=theta, rope_type=rope_type, factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position=int(scaling.get("original_max_position_embeddings",
                                              cfg.get("max_position_embeddings", 8192))),
        partial_rotary_factor=partial)


def spec_rope_fields(r: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """ModelSpec keyword arguments for the RoPE settings `r` (see `rope`)."""
    rope_dim = int(head_dim * r["partial_rotary_factor"])
    if not 0 < rope_dim <= head_dim or rope_dim % 2:
        raise ModelConfigError(f"unsupported partial_rotary_factor {r['partial_rotary_factor']} "
                               f"for head_dim {head_dim} (config.json partial_rotary_factor)")
    return dict(rope_theta=r["theta"], rope_type=r["rope_type"], rope_factor=r["factor"],
                rope_low_freq_factor=r["low_freq_factor"], rope_high_freq_factor=r["high_freq_factor"],
                rope_original_max_position=r["original_max_position"],
                rope_dim=0 if rope_dim == head_dim else rope_dim)


def layer_windows(cfg: dict, num_layers: int, window: Optional[int],
                  default_types: Optional[list[str]] = None) -> tuple[int, ...]:
    """Each layer's window (0: global) from `layer_types`, else `default_types`; () when every
    layer has `window` (no layer types: Mistral, Phi-3) or there is no window."""
    if not window:
        return ()
    types = cfg.get("layer_types") or default_types
    if types is None:
        return ()
    if len(types) != num_layers:
        raise ModelConfigError(f"config.json layer_types has {len(types)} entries for {num_layers} layers")
    for t in types:
        if t not in LAYER_TYPES:
            raise ModelConfigError(f"unsupported attention variant {t!r} (config.json layer_types; "
                                   f"supported: {', '.join(LAYER_TYPES)})")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def positive_window(value: Any) -> Optional[int]:
    """`sliding_window` as a positive int, or None."""
    if value in (None, 0, False):
        return None
    try:
        w = int(value)
    except (TypeError, ValueError):
        raise ModelConfigError(f"config.json sliding_window must be an integer, got {value!r}") from None
    if w <= 0:
        raise ModelConfigError(f"config.json sliding_window must be positive, got {w}")
    return w
