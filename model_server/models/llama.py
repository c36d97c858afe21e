"""Llama family: Llama 2/3 (incl. Llama-3 RoPE scaling), Mistral (no sliding window), Qwen2.

RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied embeddings, optional
q/k/v biases (Qwen2) and o/mlp biases (Llama `attention_bias` / `mlp_bias`).
Weights are stored [out, in], as torch Linear stores them. `Llama` is the Flax NNX module;
its params are the tree `param_shapes` describes (see base.bind).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from model_server.models import layers as L
from model_server.models.base import DecoderModel, ModelConfigError, ModelSpec, declare_params
from model_server.models.hfmap import Rule

MODEL_TYPES = ("llama", "mistral", "qwen2")
MODULE = "Llama"


def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
    """Build a spec from a Hugging Face config.json dict (old and new rope formats)."""
    model_type = cfg.get("model_type", "llama")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks {e.args[0]!r}") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)

    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and ("rope_theta" in rope or "rope_type" in rope):
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelConfigError(f"unsupported rope scaling type {rope_type!r}")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelConfigError("partial_rotary_factor != 1 is not supported")

    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        use_sw = bool(cfg.get("use_sliding_window", False))
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        use_sw = True
    window = cfg.get("sliding_window") if use_sw else None
    act = cfg.get("hidden_act", "silu")
    if act not in L.ACTIVATIONS:
        raise ModelConfigError(f"unsupported hidden_act {act!r}")
    return ModelSpec(
        family="llama", model_type=model_type, architecture=architecture,
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), activation=act,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_theta=theta, rope_type=rope_type,
        rope_factor=float(scaling.get("factor", 1.0)),
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(scaling.get("original_max_position_embeddings",
                                                   cfg.get("max_position_embeddings", 8192))),
        sliding_window=int(window) if window else None,
    )


def to_hf_config(spec: ModelSpec) -> dict:
    """A config.json dict for `spec` (LlamaForCausalLM), used to export test models."""
    rope: dict[str, Any] = {"rope_type": spec.rope_type}
    if spec.rope_type != "default":
        rope["factor"] = spec.rope_factor
    if spec.rope_type == "llama3":
        rope.update(low_freq_factor=spec.rope_low_freq_factor,
                    high_freq_factor=spec.rope_high_freq_factor,
                    original_max_position_embeddings=spec.rope_original_max_position)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps, "hidden_act": spec.activation,
        "tie_word_embeddings": spec.tie_word_embeddings, "attention_bias": spec.qkv_bias,
        "mlp_bias": spec.mlp_bias, "rope_theta": spec.rope_theta,
        "rope_scaling": rope if spec.rope_type != "default" else None,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else
        (spec.eos_token_ids[0] if spec.eos_token_ids else None),
        "pad_token_id": spec.pad_token_id, "dtype": "float32",
    }


def _layer_shapes(spec: ModelSpec) -> dict[str, tuple]:
    d, f = spec.hidden_size, spec.intermediate_size
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    s: dict[str, tuple] = {
        "attn_norm": (d,), "wq": (qd, d), "wk": (kvd, d), "wv": (kvd, d), "wo": (d, qd),
        "mlp_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
    }
    if spec.qkv_bias:
        s.update(bq=(qd,), bk=(kvd,), bv=(kvd,))
    if spec.o_bias:
        s["bo"] = (d,)
    if spec.mlp_bias:
        s.update(b_gate=(f,), b_up=(f,), b_down=(d,))
    return s


def param_shapes(spec: ModelSpec) -> dict:
    shapes: dict[str, Any] = {
        "embed": (spec.vocab_size, spec.hidden_size),
        "layers": [_layer_shapes(spec) for _ in range(spec.num_layers)],
        "final_norm": (spec.hidden_size,),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, spec.hidden_size)
    return shapes


# Our layer param -> HF name under model.layers.{i}. (same layout). The one HF mapping.
_LAYER_MAP = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight", "bo": "self_attn.o_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "b_gate": "mlp.gate_proj.bias",
    "w_up": "mlp.up_proj.weight", "b_up": "mlp.up_proj.bias",
    "w_down": "mlp.down_proj.weight", "b_down": "mlp.down_proj.bias",
}
HF_PREFIX = "model."  # some exports omit it; the loader also tries without


def hf_rules(spec: ModelSpec) -> list[Rule]:
    rules = [Rule(("embed",), "model.embed_tokens.weight"),
             Rule(("final_norm",), "model.norm.weight")]
    for i in range(spec.num_layers):
        for name in _layer_shapes(spec):
            rules.append(Rule(("layers", i, name), f"model.layers.{i}.{_LAYER_MAP[name]}"))
    if not spec.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight"))
    return rules


def partition_specs(spec: ModelSpec, axis: str, size: int) -> dict:
    def col(n: int, heads: int | None = None) -> P:  # split the output dimension (axis 0)
        ok = size > 1 and n % size == 0 and (heads is None or heads % size == 0)
        return P(axis, None) if ok else P()

    def row(n: int, heads: int | None = None) -> P:  # split the input dimension (axis 1)
        ok = size > 1 and n % size == 0 and (heads is None or heads % size == 0)
        return P(None, axis) if ok else P()

    def vec(p: P) -> P:
        return P(axis) if p != P() else P()

    qd, kvd, f = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    layer = {
        "attn_norm": P(), "mlp_norm": P(),
        "wq": col(qd, spec.num_heads), "wk": col(kvd, spec.num_kv_heads),
        "wv": col(kvd, spec.num_kv_heads), "wo": row(qd, spec.num_heads),
        "w_gate": col(f), "w_up": col(f), "w_down": row(f),
    }
    if spec.qkv_bias:
        layer.update(bq=vec(layer["wq"]), bk=vec(layer["wk"]), bv=vec(layer["wv"]))
    if spec.o_bias:
        layer["bo"] = P()
    if spec.mlp_bias:
        layer.update(b_gate=vec(layer["w_gate"]), b_up=vec(layer["w_up"]), b_down=P())
    out: dict[str, Any] = {"embed": P(), "layers": [dict(layer) for _ in range(spec.num_layers)],
                           "final_norm": P()}
    if not spec.tie_word_embeddings:
        out["lm_head"] = col(spec.vocab_size)
    return out


class Block(nnx.Module):
    """One pre-RMSNorm layer; its weights are the Params named in `_layer_shapes` (the
    biases only where the spec has them)."""

    def __init__(self, spec: ModelSpec, index: int):
        self.spec, self.index = spec, index
        declare_params(self, _layer_shapes(spec))

    def _bias(self, name: str) -> jax.Array | None:
        param = getattr(self, name, None)
        return None if param is None else param[...]

    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any, block_tables: jax.Array | None,
                 last_index: jax.Array | None):
        spec, (b, t) = self.spec, positions.shape
        h_, kv_, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        inv_freq = _inv_freq(spec)
        h = L.rms_norm(x, self.attn_norm[...], spec.norm_eps)
        x, h_q, q_pos = L.last_layer_rows(self.index, spec.num_layers, last_index, x, h, positions)
        q, k, v = L.qkv(h, h_q, [self.wq[...], self.wk[...], self.wv[...]],
                        [self._bias("bq"), self._bias("bk"), self._bias("bv")])
        k = L.apply_rope(k.reshape(b, t, kv_, hd), positions, inv_freq)
        v = v.reshape(b, t, kv_, hd)
        q = L.apply_rope(q.reshape(b, -1, h_, hd), positions if q_pos is None else q_pos, inv_freq)
        o, layer_cache = L.attention(q, k, v, positions, layer_cache, block_tables, 1.0 / math.sqrt(hd),
                                     q_pos)
        x = x + L.linear(o, self.wo[...], self._bias("bo"))
        h = L.rms_norm(x, self.mlp_norm[...], spec.norm_eps)
        gate, up = L.linears(h, [self.w_gate[...], self.w_up[...]],
                             [self._bias("b_gate"), self._bias("b_up")])
        g = L.ACTIVATIONS[spec.activation](gate) * up
        return x + L.linear(g, self.w_down[...], self._bias("b_down")), layer_cache


class Llama(DecoderModel):
    """The Llama family as a Flax NNX module; `base.bind` merges it with a param tree."""

    Block = Block

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0, mode="clip")

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        return L.rms_norm(x, self.final_norm[...], self.spec.norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.embed if self.spec.tie_word_embeddings else self.lm_head
        return L.linear(hidden, head[...], out_dtype=jnp.float32)


@functools.lru_cache(maxsize=64)
def _inv_freq(spec: ModelSpec) -> np.ndarray:
    return L.rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_type, spec.rope_factor,
                           spec.rope_low_freq_factor, spec.rope_high_freq_factor,
                           spec.rope_original_max_position)
