"""GPT-2: learned position embeddings, pre-LayerNorm, fused qkv (split at load), GELU MLP.

HF GPT-2 uses Conv1D, whose weights are [in, out]; ours are [out, in] (as every family's),
so they are transposed at load. The fused c_attn [D, 3D] is split into wq/wk/wv so that
heads shard cleanly. Embeddings are always tied. `GPT2` is the Flax NNX module; its params
are the tree `param_shapes` describes (see base.bind).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model_server.models import layers as L
from model_server.models.base import DecoderModel, ModelConfigError, ModelSpec, declare_params, register_family
from model_server.models.hfmap import Rule

MODEL_TYPES = ("gpt2",)


def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
    d = int(cfg.get("n_embd", cfg.get("hidden_size", 768)))
    heads = int(cfg.get("n_head", cfg.get("num_attention_heads", 12)))
    if d % heads:
        raise ModelConfigError(f"n_embd {d} is not a multiple of n_head {heads}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in L.ACTIVATIONS:
        raise ModelConfigError(f"unsupported activation_function {act!r}")
    if cfg.get("add_cross_attention"):
        raise ModelConfigError("GPT-2 with cross attention is not supported")
    return ModelSpec(
        family="gpt2", model_type="gpt2", architecture=architecture,
        vocab_size=int(cfg.get("vocab_size", 50257)), hidden_size=d,
        num_layers=int(cfg.get("n_layer", cfg.get("num_hidden_layers", 12))),
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        intermediate_size=int(cfg.get("n_inner") or 4 * d),
        max_position_embeddings=int(cfg.get("n_positions", cfg.get("max_position_embeddings", 1024))),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), activation=act,
        tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
        attn_scale_weights=bool(cfg.get("scale_attn_weights", True)),
        attn_scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
    )


def to_hf_config(spec: ModelSpec) -> dict:
    """A config.json dict for `spec` (GPT2LMHeadModel), used to export test and bench models."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": spec.vocab_size,
        "n_embd": spec.hidden_size, "n_head": spec.num_heads, "n_layer": spec.num_layers,
        "n_inner": spec.intermediate_size, "n_positions": spec.max_position_embeddings,
        "layer_norm_epsilon": spec.norm_eps, "activation_function": spec.activation,
        "eos_token_id": spec.eos_token_ids[0] if spec.eos_token_ids else None, "dtype": "float32",
    }


def _layer_shapes(spec: ModelSpec) -> dict[str, tuple]:
    d, f = spec.hidden_size, spec.intermediate_size
    return {
        "attn_norm": (d,), "attn_norm_b": (d,),
        "wq": (d, d), "wk": (d, d), "wv": (d, d), "bq": (d,), "bk": (d,), "bv": (d,),
        "wo": (d, d), "bo": (d,),
        "mlp_norm": (d,), "mlp_norm_b": (d,),
        "w_fc": (f, d), "b_fc": (f,), "w_proj": (d, f), "b_proj": (d,),
    }


def param_shapes(spec: ModelSpec) -> dict:
    return {
        "embed": (spec.vocab_size, spec.hidden_size),
        "pos_embed": (spec.max_position_embeddings, spec.hidden_size),
        "layers": [_layer_shapes(spec) for _ in range(spec.num_layers)],
        "final_norm": (spec.hidden_size,), "final_norm_b": (spec.hidden_size,),
    }


HF_PREFIX = "transformer."  # the original `gpt2` repo omits it; the loader tries both


def hf_rules(spec: ModelSpec) -> list[Rule]:
    """The one HF -> ours mapping for GPT-2."""
    rules = [Rule(("embed",), "transformer.wte.weight"),
             Rule(("pos_embed",), "transformer.wpe.weight"),
             Rule(("final_norm",), "transformer.ln_f.weight"),
             Rule(("final_norm_b",), "transformer.ln_f.bias")]
    for i in range(spec.num_layers):
        pre = f"transformer.h.{i}."
        for j, n in enumerate("qkv"):
            rules.append(Rule(("layers", i, f"w{n}"), pre + "attn.c_attn.weight", True, split=(1, j, 3)))
            rules.append(Rule(("layers", i, f"b{n}"), pre + "attn.c_attn.bias", split=(0, j, 3)))
        rules += [
            Rule(("layers", i, "attn_norm"), pre + "ln_1.weight"),
            Rule(("layers", i, "attn_norm_b"), pre + "ln_1.bias"),
            Rule(("layers", i, "wo"), pre + "attn.c_proj.weight", True),
            Rule(("layers", i, "bo"), pre + "attn.c_proj.bias"),
            Rule(("layers", i, "mlp_norm"), pre + "ln_2.weight"),
            Rule(("layers", i, "mlp_norm_b"), pre + "ln_2.bias"),
            Rule(("layers", i, "w_fc"), pre + "mlp.c_fc.weight", True),
            Rule(("layers", i, "b_fc"), pre + "mlp.c_fc.bias"),
            Rule(("layers", i, "w_proj"), pre + "mlp.c_proj.weight", True),
            Rule(("layers", i, "b_proj"), pre + "mlp.c_proj.bias"),
        ]
    return rules


def partition_specs(spec: ModelSpec, axis: str, size: int) -> dict:
    heads_ok = size > 1 and spec.num_heads % size == 0
    ffn_ok = size > 1 and spec.intermediate_size % size == 0
    # [out, in]: column-parallel splits axis 0, row-parallel axis 1
    col_h, row_h = (P(axis, None), P(None, axis)) if heads_ok else (P(), P())
    col_f, row_f = (P(axis, None), P(None, axis)) if ffn_ok else (P(), P())
    vec_h, vec_f = (P(axis) if heads_ok else P()), (P(axis) if ffn_ok else P())
    layer = {
        "attn_norm": P(), "attn_norm_b": P(), "mlp_norm": P(), "mlp_norm_b": P(),
        "wq": col_h, "wk": col_h, "wv": col_h, "bq": vec_h, "bk": vec_h, "bv": vec_h,
        "wo": row_h, "bo": P(), "w_fc": col_f, "b_fc": vec_f, "w_proj": row_f, "b_proj": P(),
    }
    return {"embed": P(), "pos_embed": P(), "layers": [dict(layer) for _ in range(spec.num_layers)],
            "final_norm": P(), "final_norm_b": P()}


class Block(nnx.Module):
    """One pre-LayerNorm layer; its weights are the Params named in `_layer_shapes`."""

    def __init__(self, spec: ModelSpec, index: int):
        self.spec, self.index = spec, index
        declare_params(self, _layer_shapes(spec))

    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Any, block_tables: jax.Array | None,
                 last_index: jax.Array | None):
        spec, (b, t) = self.spec, positions.shape
        h_, hd = spec.num_heads, spec.head_dim
        scale = 1.0 / math.sqrt(hd) if spec.attn_scale_weights else 1.0
        if spec.attn_scale_by_layer:
            scale /= float(self.index + 1)
        h = L.layer_norm(x, self.attn_norm[...], self.attn_norm_b[...], spec.norm_eps)
        x, h_q, q_pos = L.last_layer_rows(self.index, spec.num_layers, last_index, x, h, positions)
        q, k, v = L.qkv(h, h_q, [self.wq[...], self.wk[...], self.wv[...]],
                        [self.bq[...], self.bk[...], self.bv[...]])
        q, k, v = q.reshape(b, -1, h_, hd), k.reshape(b, t, h_, hd), v.reshape(b, t, h_, hd)
        o, layer_cache = L.attention(q, k, v, positions, layer_cache, block_tables, scale, q_pos)
        x = x + L.linear(o, self.wo[...], self.bo[...])
        h = L.layer_norm(x, self.mlp_norm[...], self.mlp_norm_b[...], spec.norm_eps)
        up = L.ACTIVATIONS[spec.activation](L.linear(h, self.w_fc[...], self.b_fc[...]))
        return x + L.linear(up, self.w_proj[...], self.b_proj[...]), layer_cache


@register_family("gpt2", ("GPT2LMHeadModel",), hf_prefix=HF_PREFIX, spec_from_hf_config=spec_from_hf_config,
                 param_shapes=param_shapes, hf_rules=hf_rules, partition_specs=partition_specs,
                 to_hf_config=to_hf_config)
class GPT2(DecoderModel):
    """GPT-2 as a Flax NNX module; `base.bind` merges it with a param tree."""

    Block = Block

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        pos = jnp.clip(positions, 0, self.spec.max_position_embeddings - 1)
        return (jnp.take(self.embed[...], tokens, axis=0, mode="clip")
                + jnp.take(self.pos_embed[...], pos, axis=0))

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        return L.layer_norm(x, self.final_norm[...], self.final_norm_b[...], self.spec.norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return L.linear(hidden, self.embed[...], out_dtype=jnp.float32)
