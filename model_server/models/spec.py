"""A decoder's shape and features (`ModelSpec`), as each family reads it from a config.json,
and the error of a configuration that cannot be served."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np


#: The families registered (base.register_family adds each): the names a spec may carry.
FAMILY_NAMES: set[str] = set()


class ModelConfigError(ValueError):
    """A model configuration that we cannot serve (unknown architecture, bad values)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a model; hashable so it can be a static jit argument."""

    family: str  # implementation: "llama" | "gemma" | "gpt2"
    model_type: str  # Hugging Face model_type: llama, mistral, qwen2, gpt2, ...
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    activation: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # RoPE (llama family). rope_type: "default" | "linear" | "llama3".
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    # GPT-2 attention scaling options.
    attn_scale_weights: bool = True
    attn_scale_by_layer: bool = False
    # Sliding-window attention: a windowed layer attends to its last `sliding_window`
    # positions only. `layer_windows` gives each layer's window (0: global attention); empty
    # means every layer has `sliding_window` (Mistral). Never a limit on the context length.
    sliding_window: Optional[int] = None
    layer_windows: tuple[int, ...] = ()
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Leading dims of each head that RoPE rotates (0: all; Phi-3's partial_rotary_factor).
    rope_dim: int = 0
    # Gemma: tanh soft-capping of attention scores and of the final logits (0: none), the
    # query scale 1/sqrt(query_pre_attn_scalar) (0: head_dim), the RoPE base of windowed
    # layers (0: rope_theta; those layers use unscaled RoPE).
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0
    rope_local_theta: float = 0.0
    # Sparse mixture of experts (Qwen3-MoE, Mixtral): the layers in `moe_layers` route each
    # token to `num_experts_per_tok` of `num_experts` SwiGLU experts of width
    # `moe_intermediate_size` (renormalised top-k weights when `norm_topk_prob`); the other
    # layers have a dense MLP of `intermediate_size`.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    architecture: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise ModelConfigError(f"unknown model family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ModelConfigError(f"layer_windows has {len(self.layer_windows)} entries for "
                                   f"{self.num_layers} layers")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                   f"[1, num_experts ({self.num_experts})]")
        if self.moe_layers and self.moe_intermediate_size <= 0:
            raise ModelConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ModelConfigError(f"moe_layers {self.moe_layers} outside [0, {self.num_layers})")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")

    @property
    def max_seq_len_limit(self) -> int:
        """Longest sequence this model serves: its position limit (a sliding window is not one)."""
        return self.max_position_embeddings

    def window_of(self, layer: int) -> Optional[int]:
        """The attention window of `layer` (positions it attends back, itself included); None:
        every earlier position."""
        if self.layer_windows:
            return self.layer_windows[layer] or None
        return self.sliding_window or None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_windows"] = list(self.layer_windows)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelConfigError(f"unknown ModelSpec fields: {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)


def dtype_of(dtype: Any) -> np.dtype:
    """'float32' | 'bfloat16' | numpy/jax dtype -> numpy dtype."""
    return np.dtype(jnp.dtype(dtype))
