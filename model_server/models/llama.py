"""Llama family: Llama 2/3 (incl. Llama-3 RoPE scaling), Mistral, Qwen2, Qwen3, Phi-3.

RMSNorm, RoPE (optionally partial), grouped-query attention, SwiGLU, tied or untied
embeddings, optional q/k/v biases (Qwen2) and o/mlp biases (Llama `attention_bias` /
`mlp_bias`), per-head q/k RMSNorm before RoPE (Qwen3: `spec.qk_norm`), sliding-window layers
(`spec.window_of`), and Phi-3's fused qkv_proj / gate_up_proj (split at load by `hf_rules`).
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

from model_server.models import hfconfig
from model_server.models import layers as L
from model_server.models import lora as LoRA
from model_server.models.base import DecoderModel, ModelConfigError, ModelSpec, declare_params, register_family
from model_server.models.hfmap import Rule

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
    """Build a spec from a Hugging Face config.json dict (old and new rope formats)."""
    model_type = cfg.get("model_type", "llama")
    hidden, heads, layers, inter, vocab = hfconfig.require(
        cfg, "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope = hfconfig.spec_rope_fields(hfconfig.rope(cfg), head_dim)

    if model_type in ("qwen2", "qwen3"):
        qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = False
        window = hfconfig.positive_window(cfg.get("sliding_window")) if cfg.get("use_sliding_window") else None
        max_window = int(cfg.get("max_window_layers", layers))
        default_types = ["sliding_attention" if i >= max_window else "full_attention" for i in range(layers)]
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        window = hfconfig.positive_window(cfg.get("sliding_window")) if model_type in ("mistral", "phi3") else None
        default_types = None
    act = cfg.get("hidden_act", "silu")
    if act not in L.ACTIVATIONS:
        raise ModelConfigError(f"unsupported hidden_act {act!r} (config.json hidden_act)")
    return ModelSpec(
        family="llama", model_type=model_type, architecture=architecture,
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), activation=act,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=window, layer_windows=hfconfig.layer_windows(cfg, layers, window, default_types),
        qk_norm=model_type == "qwen3", **rope,
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
    if spec.qk_norm:
        s.update(q_norm=(spec.head_dim,), k_norm=(spec.head_dim,))
    return s


def param_shapes(spec: ModelSpec, layer_shapes: dict[str, tuple] | None = None) -> dict:
    """The param tree's shapes; `layer_shapes`: each layer's (default: this family's)."""
    layer = _layer_shapes(spec) if layer_shapes is None else layer_shapes
    shapes: dict[str, Any] = {
        "embed": (spec.vocab_size, spec.hidden_size),
        "layers": [dict(layer) for _ in range(spec.num_layers)],
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
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
HF_PREFIX = "model."  # some exports omit it; the loader also tries without


def _fused_rules(spec: ModelSpec, i: int) -> dict[str, Rule]:
    """Phi-3's fused projections: qkv_proj rows are q, k, v; gate_up_proj rows gate, up."""
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    qkv, gate_up = f"model.layers.{i}.self_attn.qkv_proj.weight", f"model.layers.{i}.mlp.gate_up_proj.weight"
    return {"wq": Rule(("layers", i, "wq"), qkv, rows=(0, qd)),
            "wk": Rule(("layers", i, "wk"), qkv, rows=(qd, qd + kvd)),
            "wv": Rule(("layers", i, "wv"), qkv, rows=(qd + kvd, qd + 2 * kvd)),
            "w_gate": Rule(("layers", i, "w_gate"), gate_up, split=(0, 0, 2)),
            "w_up": Rule(("layers", i, "w_up"), gate_up, split=(0, 1, 2))}


def hf_rules(spec: ModelSpec) -> list[Rule]:
    rules = [Rule(("embed",), "model.embed_tokens.weight"),
             Rule(("final_norm",), "model.norm.weight")]
    for i in range(spec.num_layers):
        fused = _fused_rules(spec, i) if spec.model_type == "phi3" else {}
        for name in _layer_shapes(spec):
            rules.append(fused.get(name) or Rule(("layers", i, name), f"model.layers.{i}.{_LAYER_MAP[name]}"))
    if not spec.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight"))
    return rules


def layer_partition(spec: ModelSpec, axis: str, size: int) -> dict[str, P]:
    """PartitionSpec of every layer param a Llama-style layer may have (norms replicated,
    projections Megatron-split when their heads / rows divide by `size`)."""
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
        "wq": col(qd, spec.num_heads), "wk": col(kvd, spec.num_kv_heads),
        "wv": col(kvd, spec.num_kv_heads), "wo": row(qd, spec.num_heads),
        "w_gate": col(f), "w_up": col(f), "w_down": row(f), "bo": P(), "b_down": P(),
    }
    layer.update(bq=vec(layer["wq"]), bk=vec(layer["wk"]), bv=vec(layer["wv"]),
                 b_gate=vec(layer["w_gate"]), b_up=vec(layer["w_up"]))
    return layer


def partition_specs(spec: ModelSpec, axis: str, size: int, layer_names: Any = None) -> dict:
    """PartitionSpecs of the param tree; `layer_names`: each layer's params (default: this
    family's)."""
    every = layer_partition(spec, axis, size)
    names = _layer_shapes(spec) if layer_names is None else layer_names
    layer = {k: every.get(k, P()) for k in names}  # norms: replicated
    out: dict[str, Any] = {"embed": P(), "layers": [dict(layer) for _ in range(spec.num_layers)],
                           "final_norm": P()}
    if not spec.tie_word_embeddings:
        out["lm_head"] = P(axis, None) if size > 1 and spec.vocab_size % size == 0 else P()
    return out


class Block(nnx.Module):
    """One pre-RMSNorm layer; its weights are the Params named in `layer_shapes` (the
    biases only where the spec has them)."""

    layer_shapes = staticmethod(_layer_shapes)
    norm = staticmethod(L.rms_norm)  # of the q/k norms (and Gemma's every norm)

    def __init__(self, spec: ModelSpec, index: int):
        self.spec, self.index = spec, index
        declare_params(self, self.layer_shapes(spec))

    def _bias(self, name: str) -> jax.Array | None:
        param = getattr(self, name, None)
        return None if param is None else param[...]

    def self_attention(self, h: jax.Array, h_q: jax.Array, positions: jax.Array, q_pos: jax.Array | None,
                       layer_cache: Any, block_tables: jax.Array | None,
                       inv_freq: np.ndarray, scale: float, softcap: float = 0.0,
                       lora: LoRA.LayerLora | None = None):
        """q/k/v projections, q/k norms (`spec.qk_norm`), RoPE, attention over this layer's
        window and the output projection -> (out [B, Tq, D], new layer cache). `lora`: the
        adapters' deltas of the projections (see `model_server.models.lora`)."""
        spec, (b, t) = self.spec, positions.shape
        h_, kv_, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, k, v = L.qkv(h, h_q, [self.wq[...], self.wk[...], self.wv[...]],
                        [self._bias("bq"), self._bias("bk"), self._bias("bv")])
        if lora is not None:
            q, k, v = LoRA.add(q, h_q, lora, "wq"), LoRA.add(k, h, lora, "wk"), LoRA.add(v, h, lora, "wv")
        q, k, v = q.reshape(b, -1, h_, hd), k.reshape(b, t, kv_, hd), v.reshape(b, t, kv_, hd)
        if spec.qk_norm:
            q = self.norm(q, self.q_norm[...], spec.norm_eps)
            k = self.norm(k, self.k_norm[...], spec.norm_eps)
        k = L.apply_rope(k, positions, inv_freq)
        q = L.apply_rope(q, positions if q_pos is None else q_pos, inv_freq)
        o, layer_cache = L.attention(q, k, v, positions, layer_cache, block_tables, scale, q_pos,
                                     window=spec.window_of(self.index), softcap=softcap)
        return LoRA.add(L.linear(o, self.wo[...], self._bias("bo")), o, lora, "wo"), layer_cache

    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any, block_tables: jax.Array | None,
                 last_index: jax.Array | None, lora: LoRA.LayerLora | None = None):
        spec = self.spec
        h = L.rms_norm(x, self.attn_norm[...], spec.norm_eps)
        x, h_q, q_pos = L.last_layer_rows(self.index, spec.num_layers, last_index, x, h, positions)
        o, layer_cache = self.self_attention(h, h_q, positions, q_pos, layer_cache, block_tables,
                                             _inv_freq(spec), 1.0 / math.sqrt(spec.head_dim), lora=lora)
        x = x + o
        h = L.rms_norm(x, self.mlp_norm[...], spec.norm_eps)
        return x + (self.mlp(h) if lora is None else self.mlp(h, lora)), layer_cache

    def mlp(self, h: jax.Array, lora: LoRA.LayerLora | None = None) -> jax.Array:
        """The feed-forward part of the layer on its normed input (SwiGLU; a sparse
        mixture of experts in `moe.Block`), with the adapters' deltas (`lora`)."""
        gate, up = L.linears(h, [self.w_gate[...], self.w_up[...]],
                             [self._bias("b_gate"), self._bias("b_up")])
        gate, up = LoRA.add(gate, h, lora, "w_gate"), LoRA.add(up, h, lora, "w_up")
        g = L.ACTIVATIONS[self.spec.activation](gate) * up
        return LoRA.add(L.linear(g, self.w_down[...], self._bias("b_down")), g, lora, "w_down")


@register_family("llama", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM"), hf_prefix=HF_PREFIX, spec_from_hf_config=spec_from_hf_config,
                 param_shapes=param_shapes, hf_rules=hf_rules, partition_specs=partition_specs,
                 to_hf_config=to_hf_config)
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
    return L.rope_inv_freq(spec.rope_dim or spec.head_dim, spec.rope_theta, spec.rope_type, spec.rope_factor,
                           spec.rope_low_freq_factor, spec.rope_high_freq_factor,
                           spec.rope_original_max_position)
