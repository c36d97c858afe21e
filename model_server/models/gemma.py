"""Gemma 2 and Gemma 3 (text): Llama-style attention with Gemma's differences.

(1 + w) RMSNorms, pre- and post-norms around attention and the MLP, GeGLU with tanh GELU,
embeddings scaled by sqrt(hidden_size), queries scaled by 1/sqrt(query_pre_attn_scalar),
alternating sliding-window and global layers (`layer_types`, or the family's pattern), and
Gemma 2's tanh soft-capping of attention scores and final logits; Gemma 3 adds per-head
q/k norms and a RoPE base of its own for the windowed (local) layers.
Weights are [out, in], as torch Linear stores them; `llama` shares its tensor names.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model_server.models import hfconfig
from model_server.models import layers as L
from model_server.models import llama
from model_server.models.base import DecoderModel, ModelConfigError, ModelSpec, register_family
from model_server.models.hfmap import Rule

MODEL_TYPES = ("gemma2", "gemma3_text")
HF_PREFIX = "model."
#: every `pattern`-th layer is global, the others windowed (when config.json has no layer_types)
_PATTERN = {"gemma2": 2, "gemma3_text": 6}


def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
    model_type = cfg.get("model_type") or ("gemma2" if architecture.startswith("Gemma2") else "gemma3_text")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(f"unsupported model_type {model_type!r} for {architecture} (config.json "
                               f"model_type; supported: {', '.join(MODEL_TYPES)})")
    gemma3 = model_type == "gemma3_text"
    hidden, heads, layers, inter, vocab = hfconfig.require(
        cfg, "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    if cfg.get("use_bidirectional_attention"):
        raise ModelConfigError("unsupported attention variant: bidirectional (config.json "
                               "use_bidirectional_attention)")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in L.ACTIVATIONS:
        raise ModelConfigError(f"unsupported hidden_activation {act!r} (config.json hidden_activation)")

    per_type = cfg.get("rope_parameters")
    local_theta = 0.0
    if gemma3 and isinstance(per_type, dict) and "full_attention" in per_type:
        global_rope = hfconfig.rope(cfg, per_type["full_attention"] or {}, default_theta=1e6)
        local = hfconfig.rope(cfg, per_type.get("sliding_attention") or {}, default_theta=1e4)
        if local["rope_type"] != "default":
            raise ModelConfigError(f"unsupported rope type {local['rope_type']!r} for local layers "
                                   "(config.json rope_parameters.sliding_attention.rope_type)")
        local_theta = local["theta"]
    else:
        global_rope = hfconfig.rope(cfg, default_theta=1e6 if gemma3 else 1e4)
        if gemma3:
            local_theta = float(cfg.get("rope_local_base_freq", 1e4))
    window = hfconfig.positive_window(cfg.get("sliding_window"))
    pattern = _PATTERN[model_type]
    default_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    windows = hfconfig.layer_windows(cfg, layers, window, default_types)
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        family="gemma", model_type=model_type, architecture=architecture,
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), activation=act,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias,
        sliding_window=window, layer_windows=windows, qk_norm=gemma3,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
        rope_local_theta=local_theta, **hfconfig.spec_rope_fields(global_rope, head_dim),
    )


#: our layer param -> HF name under model.layers.{i}. (those not here: llama's names)
_GEMMA_NAMES = {
    "attn_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight", "post_mlp_norm": "post_feedforward_layernorm.weight",
}


def _layer_shapes(spec: ModelSpec) -> dict[str, tuple]:
    s = {k: v for k, v in llama._layer_shapes(spec).items() if not k.startswith("b_")}
    d = spec.hidden_size
    s.update(post_attn_norm=(d,), post_mlp_norm=(d,))
    return s


def param_shapes(spec: ModelSpec) -> dict:
    return llama.param_shapes(spec, _layer_shapes(spec))


def hf_rules(spec: ModelSpec) -> list[Rule]:
    rules = [Rule(("embed",), "model.embed_tokens.weight"), Rule(("final_norm",), "model.norm.weight")]
    for i in range(spec.num_layers):
        for name in _layer_shapes(spec):
            hf = _GEMMA_NAMES.get(name) or llama._LAYER_MAP[name]
            rules.append(Rule(("layers", i, name), f"model.layers.{i}.{hf}"))
    if not spec.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight"))
    return rules


def partition_specs(spec: ModelSpec, axis: str, size: int) -> dict:
    return llama.partition_specs(spec, axis, size, _layer_shapes(spec))


class Block(llama.Block):
    """One Gemma layer: norm, attention, norm, residual; norm, GeGLU MLP, norm, residual."""

    layer_shapes = staticmethod(_layer_shapes)
    norm = staticmethod(L.gemma_rms_norm)

    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any, block_tables: jax.Array | None,
                 last_index: jax.Array | None):
        spec, eps = self.spec, self.spec.norm_eps
        h = L.gemma_rms_norm(x, self.attn_norm[...], eps)
        x, h_q, q_pos = L.last_layer_rows(self.index, spec.num_layers, last_index, x, h, positions)
        o, layer_cache = self.self_attention(
            h, h_q, positions, q_pos, layer_cache, block_tables,
            _inv_freq(spec, local=spec.window_of(self.index) is not None),
            1.0 / math.sqrt(spec.query_pre_attn_scalar), spec.attn_softcap)
        x = x + L.gemma_rms_norm(o, self.post_attn_norm[...], eps)
        h = L.gemma_rms_norm(x, self.mlp_norm[...], eps)
        gate, up = L.linears(h, [self.w_gate[...], self.w_up[...]], [None, None])
        g = L.ACTIVATIONS[spec.activation](gate) * up
        return x + L.gemma_rms_norm(L.linear(g, self.w_down[...]), self.post_mlp_norm[...], eps), layer_cache


@register_family("gemma", ("Gemma2ForCausalLM", "Gemma3ForCausalLM"), hf_prefix=HF_PREFIX,
                 spec_from_hf_config=spec_from_hf_config, param_shapes=param_shapes, hf_rules=hf_rules,
                 partition_specs=partition_specs)
class Gemma(DecoderModel):
    """Gemma 2 / 3 as a Flax NNX module; `base.bind` merges it with a param tree."""

    Block = Block

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        table = self.embed[...]
        scale = jnp.asarray(math.sqrt(self.spec.hidden_size), table.dtype)  # rounded as HF's is
        return jnp.take(table, tokens, axis=0, mode="clip") * scale

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        return L.gemma_rms_norm(x, self.final_norm[...], self.spec.norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.embed if self.spec.tie_word_embeddings else self.lm_head
        out = L.linear(hidden, head[...], out_dtype=jnp.float32)
        cap = self.spec.final_softcap
        return jnp.tanh(out / cap) * cap if cap else out


@functools.lru_cache(maxsize=64)
def _inv_freq(spec: ModelSpec, local: bool) -> np.ndarray:
    dim = spec.rope_dim or spec.head_dim
    if local and spec.rope_local_theta:
        return L.rope_inv_freq(dim, spec.rope_local_theta)
    return L.rope_inv_freq(dim, spec.rope_theta, spec.rope_type, spec.rope_factor, spec.rope_low_freq_factor,
                           spec.rope_high_freq_factor, spec.rope_original_max_position)
