"""Model paths this server can serve, and loading (model_path, checkpoint, overrides).

model paths:
  lm.hf     any supported HF architecture (from config.json `architectures`)
  lm.gpt2   GPT2LMHeadModel only
  lm.llama  LlamaForCausalLM / MistralForCausalLM only
  lm.qwen2  Qwen2ForCausalLM only
  lm.qwen3  Qwen3ForCausalLM only
  lm.gemma  Gemma2ForCausalLM / Gemma3ForCausalLM only
  lm.phi3   Phi3ForCausalLM only
  lm.qwen3_moe  Qwen3MoeForCausalLM only
  lm.mixtral    MixtralForCausalLM only
  test.tiny random-weight 2-layer Llama-style model with a built-in tokenizer;
            checkpoint must be None (deterministic on every server)
  lm.lora   a PEFT LoRA adapter directory over the loaded base model its override `base`
            names (a Llama / Mistral / Qwen2 published with max_loras > 0); see lora_model
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional

import jax

from model_server import checkpoint as ckpt_lib
from model_server.checkpoint import CheckpointError
from model_server.knobs import OverrideError, ServingKnobs, parse_overrides
from model_server.models import base, gemma, gpt2, llama, moe
from model_server.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "OverrideError", "ModelPathError", "ModelPathEntry", "LoadedModel",
    "REGISTRY", "list_model_paths", "lookup", "validate", "load_model", "estimate_memory_bytes",
]


class ModelPathError(ValueError):
    """Unknown model_path, or a checkpoint that this model_path does not accept."""


@dataclasses.dataclass(frozen=True)
class ModelPathEntry:
    """One servable model path: the `DecoderModel` family that serves it, or a built-in model."""

    name: str
    description: str
    #: the registered family class; None for lm.hf (any family) and built-in models
    family: Optional[type[base.DecoderModel]] = None
    #: the HF architectures accepted, a subset of the family's (None: all of its, or any for lm.hf)
    only: Optional[frozenset[str]] = None
    #: random-weight test model built in code (checkpoint must be None)
    builtin: Optional[str] = None

    def __post_init__(self) -> None:
        if self.family is not None and self.only is not None and not self.only <= set(self.family.architectures):
            raise ValueError(f"{self.name}: {sorted(self.only)} not all served by family {self.family.family!r}")

    @property
    def architectures(self) -> Optional[frozenset[str]]:
        """Accepted HF architectures; None = any registered one. Ignored for built-in models."""
        if self.only is not None:
            return self.only
        return frozenset(self.family.architectures) if self.family is not None else None


def _path(name: str, description: str, family: type[base.DecoderModel], *only: str) -> ModelPathEntry:
    return ModelPathEntry(name, description, family, frozenset(only) if only else None)


REGISTRY: dict[str, ModelPathEntry] = {
    e.name: e for e in [
        ModelPathEntry("lm.hf", "Hugging Face causal LM (architecture from config.json)"),
        _path("lm.gpt2", "GPT-2", gpt2.GPT2),
        _path("lm.llama", "Llama / Mistral", llama.Llama, "LlamaForCausalLM", "MistralForCausalLM"),
        _path("lm.qwen2", "Qwen2", llama.Llama, "Qwen2ForCausalLM"),
        _path("lm.qwen3", "Qwen3", llama.Llama, "Qwen3ForCausalLM"),
        _path("lm.gemma", "Gemma 2 / Gemma 3 (text)", gemma.Gemma),
        _path("lm.phi3", "Phi-3", llama.Llama, "Phi3ForCausalLM"),
        _path("lm.qwen3_moe", "Qwen3-MoE", moe.MoE, "Qwen3MoeForCausalLM"),
        _path("lm.mixtral", "Mixtral", moe.MoE, "MixtralForCausalLM"),
        ModelPathEntry("test.tiny", "tiny random-weight Llama-style test model", builtin="tiny"),
        ModelPathEntry("lm.lora", "PEFT LoRA adapter over a loaded base model (override base)"),
    ]
}


def list_model_paths() -> list[str]:
    """Servable model paths (for the server's heartbeat description)."""
    return sorted(REGISTRY)


def lookup(model_path: str) -> ModelPathEntry:
    entry = REGISTRY.get(model_path)
    if entry is None:
        raise ModelPathError(
            f"unknown model_path {model_path!r}; this server serves {', '.join(list_model_paths())}")
    return entry


def _norm_checkpoint(checkpoint: Optional[str]) -> Optional[str]:
    if checkpoint is None or (isinstance(checkpoint, str) and checkpoint.strip() in ("", "None", "none")):
        return None
    return str(checkpoint)


def validate(model_path: str, checkpoint: Optional[str], overrides: Optional[Mapping[str, Any]] = None
             ) -> ServingKnobs:
    """Cheap checks without touching the checkpoint; returns the parsed (unresolved) knobs."""
    entry = lookup(model_path)
    checkpoint = _norm_checkpoint(checkpoint)
    if entry.builtin is not None and checkpoint is not None:
        raise ModelPathError(f"{model_path} has built-in random weights; its checkpoint must be None")
    if entry.builtin is None and checkpoint is None:
        raise ModelPathError(f"{model_path} needs a checkpoint (None is only for test.* model paths)")
    return parse_overrides(overrides)


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the engine: spec, params on device, tokenizer and serving knobs."""

    model_path: str
    checkpoint: Optional[str]
    spec: base.ModelSpec
    params: Any
    tokenizer: Tokenizer
    knobs: ServingKnobs  # resolved: every field set
    mesh: Optional[jax.sharding.Mesh] = None
    load_seconds: float = 0.0
    source_format: str = "builtin"  # "builtin" | "hf" | "orbax"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.spec.eos_token_ids

    @property
    def dtype(self) -> str:
        return self.knobs.dtype  # type: ignore[return-value]

    def forward_fn(self, return_hidden: bool = False) -> Callable:
        """`f(params, tokens, positions, cache, block_tables)`; see `model_server.models.base`."""
        return base.make_forward(self.spec, return_hidden=return_hidden)

    def forward_last_fn(self) -> Callable:
        """`f(params, tokens, positions, cache, block_tables, last_index)` -> ([B, V], cache)."""
        return base.make_forward_last(self.spec)

    def hidden_fn(self) -> Callable:
        return base.make_hidden_fn(self.spec)

    def cache_sharding(self) -> Optional[jax.sharding.Sharding]:
        if self.mesh is None:
            return None
        axis = self.mesh.axis_names[0]
        return jax.sharding.NamedSharding(
            self.mesh, base.cache_partition_spec(self.spec, axis, self.mesh.shape[axis]))

    def num_blocks(self) -> int:
        return self.knobs.num_blocks(self.spec)

    def init_cache(self) -> base.KVCache:
        return base.init_cache(self.spec, self.num_blocks(), self.knobs.block_size, self.dtype,
                               self.cache_sharding())

    def param_bytes(self) -> int:
        """The params' bytes, and the LoRA adapter stack's when adapters are enabled."""
        from model_server.models import lora

        stack = lora.stack_bytes(self.spec, self.knobs.max_loras, self.knobs.max_lora_rank) if self.knobs.max_loras else 0
        return base.param_bytes(self.spec, self.dtype) + stack

    def kv_cache_bytes(self) -> int:
        return base.kv_cache_bytes(self.spec, self.num_blocks() * self.knobs.block_size, self.dtype)

    def memory_bytes(self) -> int:
        """Accelerator memory for params + KV cache (for the heartbeat / placement)."""
        return self.param_bytes() + self.kv_cache_bytes()

    def stats(self) -> dict[str, Any]:
        return {"load_seconds": round(self.load_seconds, 3), "format": self.source_format,
                "param_bytes": self.param_bytes(), "kv_cache_bytes": self.kv_cache_bytes(),
                "memory_bytes": self.memory_bytes(), "architecture": self.spec.architecture,
                "knobs": self.knobs.to_dict()}

    def unload(self) -> None:
        """Free device buffers now rather than at garbage collection."""
        for leaf in jax.tree.leaves(self.params):
            if isinstance(leaf, jax.Array):
                leaf.delete()
        self.params = None


def _check_architecture(entry: ModelPathEntry, spec: base.ModelSpec, checkpoint: str) -> None:
    accepted = entry.architectures
    if accepted is not None and (spec.architecture not in accepted
                                 or base.family_class(spec) is not entry.family):
        raise CheckpointError(
            f"{checkpoint} holds a {spec.architecture}, but {entry.name} serves "
            f"{', '.join(sorted(accepted))} (use lm.hf for any architecture)")


def _place(params: Any, spec: base.ModelSpec, mesh: Optional[jax.sharding.Mesh]) -> Any:
    shardings = ckpt_lib.param_shardings(spec, mesh)
    if shardings is None:
        return jax.device_put(params)
    return jax.device_put(params, shardings)


def load_model(model_path: str, checkpoint: Optional[str], overrides: Optional[Mapping[str, Any]] = None,
               *, mesh: Optional[jax.sharding.Mesh] = None, cache_dir: Optional[str] = None) -> LoadedModel:
    """Resolve and load a model. Raises ModelPathError, OverrideError or CheckpointError."""
    t0 = time.monotonic()
    knobs = validate(model_path, checkpoint, overrides)
    entry = lookup(model_path)
    checkpoint = _norm_checkpoint(checkpoint)
    if entry.builtin == "tiny":
        from model_server.models import tiny

        spec = tiny.spec()
        knobs = knobs.resolve(spec.max_seq_len_limit)
        params = _place(tiny.params(knobs.dtype), spec, mesh)
        tokenizer = Tokenizer(tiny.build_hf_tokenizer())
        fmt = "builtin"
    else:
        assert checkpoint is not None
        ckpt = ckpt_lib.open_checkpoint(checkpoint, cache_dir=cache_dir)
        _check_architecture(entry, ckpt.spec, checkpoint)
        knobs = knobs.resolve(ckpt.spec.max_seq_len_limit)
        try:
            tokenizer = load_tokenizer(ckpt.path)
        except TokenizerError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from e
        spec = ckpt.spec
        if not spec.eos_token_ids and tokenizer.eos_token_id is not None:
            spec = dataclasses.replace(spec, eos_token_ids=(tokenizer.eos_token_id,))
            ckpt.spec = spec
        if tokenizer.vocab_size > spec.vocab_size:
            raise CheckpointError(f"{checkpoint}: tokenizer has {tokenizer.vocab_size} tokens but the "
                                  f"model only {spec.vocab_size}")
        params = ckpt_lib.load_params(ckpt, knobs.dtype, mesh=mesh)
        fmt = ckpt.format
    model = LoadedModel(model_path, checkpoint, spec, params, tokenizer, knobs, mesh,
                        time.monotonic() - t0, fmt)
    log.info("loaded %s (%s, %s) in %.2fs: %.1f MB params + %.1f MB KV cache", model_path,
             checkpoint, fmt, model.load_seconds, model.param_bytes() / 1e6, model.kv_cache_bytes() / 1e6)
    return model


def estimate_memory_bytes(model_path: str, checkpoint: Optional[str],
                          overrides: Optional[Mapping[str, Any]] = None, *,
                          platform: Optional[str] = None) -> int:
    """Params + KV cache bytes a load would take, reading only the checkpoint's config files."""
    knobs = validate(model_path, checkpoint, overrides)
    entry = lookup(model_path)
    if model_path == "lm.lora":  # the adapter's weights (its base holds the device stack)
        from pathlib import Path

        from model_server.adapters import WEIGHTS
        f = Path(str(checkpoint)) / WEIGHTS[0]
        return f.stat().st_size if not ckpt_lib.is_gcs(str(checkpoint)) and f.is_file() else 0
    if entry.builtin == "tiny":
        from model_server.models import tiny

        spec = tiny.spec()
    else:
        spec = ckpt_lib.read_spec(_norm_checkpoint(checkpoint))  # type: ignore[arg-type]
        _check_architecture(entry, spec, str(checkpoint))
    knobs = knobs.resolve(spec.max_seq_len_limit, platform)
    from model_server.models import lora

    return (base.param_bytes(spec, knobs.dtype)
            + (lora.stack_bytes(spec, knobs.max_loras, knobs.max_lora_rank) if knobs.max_loras else 0)
            + base.kv_cache_bytes(spec, knobs.num_blocks(spec) * knobs.block_size, knobs.dtype))
