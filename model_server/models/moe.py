"""Sparse mixture-of-experts decoders: Qwen3-MoE and Mixtral.

Their attention is the Llama family's (Qwen3-MoE with Qwen3's per-head q/k RMSNorm, Mixtral
with Mistral's optional sliding window); the MLP of each layer in `spec.moe_layers` is the
sparse mixture of experts of `experts.moe_mlp`, the other layers' (Qwen3-MoE's
`mlp_only_layers` and those off its `decoder_sparse_step`) the dense SwiGLU. Checkpoints
store one tensor per expert; the loader stacks them on a leading expert axis (`Rule.index`),
which shards over the mesh for expert parallelism.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from model_server.models import experts as X
from model_server.models import layers as L
from model_server.models import llama
from model_server.models.base import ModelConfigError, ModelSpec, declare_params, register_family
from model_server.models.hfmap import Rule

MODEL_TYPES = ("qwen3_moe", "mixtral")
HF_PREFIX = llama.HF_PREFIX

_DENSE_MLP = ("w_gate", "w_up", "w_down")
#: our expert param -> the per-expert HF tensor, by model_type; and the router's name
_EXPERT_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", {"e_gate": "gate_proj", "e_up": "up_proj", "e_down": "down_proj"},
                  "mlp.experts"),
    "mixtral": ("block_sparse_moe.gate.weight", {"e_gate": "w1", "e_up": "w3", "e_down": "w2"},
                "block_sparse_moe.experts"),
}
#: config.json fields of MoE variants these families do not implement
_UNSUPPORTED = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                "moe_layer_freq", "topk_group", "n_group")


def _int_field(cfg: dict, name: str, default: Any = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"config.json {name} must be an integer, got {value!r}")
    return value


def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
    """The spec of a Qwen3MoeForCausalLM or MixtralForCausalLM config.json."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(f"unsupported model_type {model_type!r} for {architecture} "
                               f"(config.json model_type; supported: {', '.join(MODEL_TYPES)})")
    for name in _UNSUPPORTED:
        if cfg.get(name):
            raise ModelConfigError(f"unsupported mixture-of-experts variant: config.json {name} = "
                                   f"{cfg[name]!r} (shared or grouped experts are not implemented)")
    # The attention and dense parts are Qwen3's and Mistral's.
    dense = llama.spec_from_hf_config({**cfg, "model_type": "qwen3" if model_type == "qwen3_moe" else "mistral"},
                                      architecture)
    layers = dense.num_layers
    top_k = _int_field(cfg, "num_experts_per_tok")
    if model_type == "mixtral":
        num_experts = _int_field(cfg, "num_local_experts", 8)
        width, normalize, sparse = dense.intermediate_size, True, tuple(range(layers))
    else:
        # transformers' Qwen3MoeConfig saves `num_experts` as `num_local_experts`
        num_experts = _int_field(cfg, "num_experts" if "num_experts" in cfg else "num_local_experts", 128)
        width = _int_field(cfg, "moe_intermediate_size")
        normalize = bool(cfg.get("norm_topk_prob", False))
        step = _int_field(cfg, "decoder_sparse_step", 1)
        if step <= 0:
            raise ModelConfigError(f"unsupported decoder_sparse_step {step} (config.json decoder_sparse_step)")
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            raise ModelConfigError(f"config.json mlp_only_layers must be a list of layer indices, got {only!r}")
        sparse = tuple(i for i in range(layers) if i not in only and num_experts > 0 and (i + 1) % step == 0)
    if sparse and not 0 < top_k <= num_experts:
        raise ModelConfigError(f"unsupported num_experts_per_tok {top_k} for {num_experts} experts "
                               f"(config.json num_experts_per_tok)")
    return dataclasses.replace(
        dense, family="moe", model_type=model_type, num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=width, norm_topk_prob=normalize, moe_layers=sparse)


def layer_shapes(spec: ModelSpec, index: int) -> dict[str, tuple]:
    """Layer `index`'s params: Llama's, with the experts in place of the dense MLP in a sparse layer."""
    s = llama._layer_shapes(spec)
    if index not in spec.moe_layers:
        return s
    for name in _DENSE_MLP:
        del s[name]
    e, d, f = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    s.update(router=(e, d), e_gate=(e, f, d), e_up=(e, f, d), e_down=(e, d, f))
    return s


def param_shapes(spec: ModelSpec) -> dict:
    shapes = llama.param_shapes(spec)
    shapes["layers"] = [layer_shapes(spec, i) for i in range(spec.num_layers)]
    return shapes


def hf_rules(spec: ModelSpec) -> list[Rule]:
    router, names, experts = _EXPERT_NAMES[spec.model_type]
    rules = [Rule(("embed",), "model.embed_tokens.weight"), Rule(("final_norm",), "model.norm.weight")]
    for i in range(spec.num_layers):
        pre = f"model.layers.{i}."
        for name, shape in layer_shapes(spec, i).items():
            if name == "router":
                rules.append(Rule(("layers", i, name), pre + router))
            elif name in names:
                rules += [Rule(("layers", i, name), f"{pre}{experts}.{j}.{names[name]}.weight", index=j)
                          for j in range(shape[0])]
            else:
                rules.append(Rule(("layers", i, name), pre + llama._LAYER_MAP[name]))
    if not spec.tie_word_embeddings:
        rules.append(Rule(("lm_head",), "lm_head.weight"))
    return rules


def partition_specs(spec: ModelSpec, axis: str, size: int) -> dict:
    """Attention and dense MLPs tensor-parallel as Llama's; experts split over the devices
    (expert parallelism), the router replicated."""
    every = {**llama.layer_partition(spec, axis, size), "router": P()}
    for name in ("e_gate", "e_up", "e_down"):
        every[name] = X.partition_spec(spec.num_experts, axis, size)
    out = llama.partition_specs(spec, axis, size)
    out["layers"] = [{k: every.get(k, P()) for k in layer_shapes(spec, i)} for i in range(spec.num_layers)]
    return out


class Block(llama.Block):
    """A Llama layer whose MLP is the sparse mixture of experts in `spec.moe_layers`."""

    def __init__(self, spec: ModelSpec, index: int):
        self.spec, self.index = spec, index
        declare_params(self, layer_shapes(spec, index))

    def mlp(self, h: jax.Array) -> jax.Array:
        spec = self.spec
        if self.index not in spec.moe_layers:
            return super().mlp(h)
        return X.moe_mlp(h, self.router[...], self.e_gate[...], self.e_up[...], self.e_down[...],
                         spec.num_experts_per_tok, spec.norm_topk_prob, L.ACTIVATIONS[spec.activation])


@register_family("moe", ("Qwen3MoeForCausalLM", "MixtralForCausalLM"), hf_prefix=HF_PREFIX,
                 spec_from_hf_config=spec_from_hf_config, param_shapes=param_shapes, hf_rules=hf_rules,
                 partition_specs=partition_specs)  # no config.json writer: Llama's would drop the experts
class MoE(llama.Llama):
    """Qwen3-MoE / Mixtral as a Flax NNX module; `base.bind` merges it with a param tree."""

    Block = Block
