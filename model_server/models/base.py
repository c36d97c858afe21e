"""The families' table and the forward contract used by the batching engine (the spec:
spec.py; the paged KV cache, ``init_cache``: kv.py).

Contract (all functions are pure and jit-friendly; `spec` is static/hashable):

* ``forward(spec, params, tokens, positions, cache, block_tables)`` ->
  ``(logits[B, T, V] float32, new_cache)``; ``make_forward(spec)`` closes over `spec` and
  returns the 5-argument function ``f(params, tokens, positions, cache, block_tables)`` meant
  for ``jax.jit(f, donate_argnums=(3,))`` (jit once, at load, and reuse the jitted object).

  - ``tokens``/``positions`` are ``int32[B, T]``; ``block_tables`` is ``int32[B, K]``.
  - The k/v of token ``(b, t)`` is written at position ``positions[b, t]`` of row b's
    sequence (through its table), and the token attends to every position ``<=
    positions[b, t]`` of it: its cached prefix and the tokens of this call (causal by
    absolute position, so stale data beyond the current position is never seen). A decode
    step is ``T == 1``; a prefill chunk is T tokens after a cached prefix of any length.
    Padding tokens after a chunk's real ones write garbage at later positions of their own
    blocks, overwritten before anything attends to them; writes past the table or to ids
    out of the pool's range (a table's padding) are dropped.
  - Two rows of one call must not write the same block (shared blocks are full, read-only).
  - ``cache=None`` runs without any cache (attention within the given tokens only, causal by
    position); ``new_cache`` is then ``None``. Useful for scoring and embeddings.

* ``forward_last(spec, params, tokens, positions, cache, block_tables, last_index[B])`` ->
  ``(logits[B, V] float32, new_cache)``: logits of one token per row only (prefill: the last
  real token of the chunk), skipping the [B, T, V] projection and, in the last layer, all but
  the other tokens' keys and values; ``make_forward_last(spec)`` likewise.

* ``hidden_states(...)`` (same arguments) -> ``(hidden[B, T, D], new_cache)``: the final
  normalised hidden states without the vocabulary projection (for ``embed``);
  ``forward(..., return_hidden=True)`` returns ``(logits, new_cache, hidden)``.

Each family (`llama.Llama`, `gemma.Gemma`, `moe.MoE`, `gpt2.GPT2`) is a Flax NNX module. Its state is
held as a plain pytree, the params (dicts, and a list for the layers): checkpoints load, shard and save that
tree, and each family maps Hugging Face tensor names to it in one table (`hf_rules`). The
module is split once per spec (`graphdef`); `bind` merges its graph with a param tree, inside
the engine's `jax.jit`ted programs, so the merge happens when they trace, never per call.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The spec and the cache live in their own modules (imported one way: they know nothing of
# this one); their names stay reachable as `base.X`, the contract the rest of the code reads.
from model_server.models.kv import (KVCache, cache_partition_spec, cache_shardings, init_cache,  # noqa: F401
                                    kv_bytes_per_token, kv_cache_bytes, pool_sharding)
from model_server.models.spec import FAMILY_NAMES, ModelConfigError, ModelSpec, dtype_of  # noqa: F401

Params = Any  # nested dict/list of arrays

# --------------------------------------------------------------------------- sizes

def param_shapes(spec: ModelSpec) -> Params:
    """Pytree of shape tuples, the same structure as the params."""
    return family_class(spec).param_shapes(spec)


def abstract_params(spec: ModelSpec, dtype: Any, shardings: Params | None = None) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` (e.g. the restore target of an Orbax checkpoint)."""
    shapes = param_shapes(spec)
    dt = jnp.dtype(dtype)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes, is_leaf=_is_shape)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh), shapes,
                        shardings, is_leaf=_is_shape)


def param_count(spec: ModelSpec) -> int:
    leaves = jax.tree.leaves(param_shapes(spec), is_leaf=_is_shape)
    return int(sum(math.prod(s) for s in leaves))


def param_bytes(spec: ModelSpec, dtype: Any = "bfloat16", quantization: Optional[str] = None) -> int:
    """Bytes the params take in `dtype`; with `quantization` ('int8'), the quantized ones at
    one byte each plus their float32 scales (see quant.py)."""
    if quantization is None:
        return param_count(spec) * dtype_of(dtype).itemsize
    from model_server.models import quant
    return quant.param_bytes(param_shapes(spec), dtype_of(dtype).itemsize)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


# --------------------------------------------------------------------------- modules

def declare_params(module: nnx.Module, shapes: dict[str, tuple]) -> None:
    """Give `module` one `nnx.Param` per entry of `shapes` (zeros: the modules are only ever
    built abstractly, by `graphdef`; their values come from a param tree)."""
    for name, shape in shapes.items():
        setattr(module, name, nnx.Param(jnp.zeros(shape, jnp.float32)))


def abstract_module(spec: ModelSpec) -> nnx.Module:
    """The family's module for `spec` with abstract params (shapes only, no memory)."""
    cls = family_class(spec)
    return nnx.eval_shape(lambda: cls(spec))


class DecoderModel(nnx.Module, abc.ABC):
    """A decoder-only transformer as an NNX module: token embedding, the layers' `Block`s in
    order, final norm. A family subclasses it with its `Block` class, `embed_tokens`,
    `final_norm_of` and `logits`; its top-level params are those of `param_shapes` but the
    layers'.

    The class is also the family's whole contract with loading and sharding: its name, the HF
    architectures it serves, how a config.json becomes a `ModelSpec`, its param shapes, its
    HF tensor-name table and its partition specs. `@register_family(...)` gives a subclass
    these and enters it in the table `family_class` and `spec_from_hf_config` read.
    """

    #: Implementation family name (`ModelSpec.family`).
    family: ClassVar[str]
    #: Hugging Face `architectures[0]` values this family serves.
    architectures: ClassVar[tuple[str, ...]]
    #: Prefix of the HF tensor names (some exports omit it; the loader tries both).
    hf_prefix: ClassVar[str] = ""
    #: config.json writer for a spec (test checkpoints, benchmarks); None: this family has none.
    to_hf_config: ClassVar[Optional[Callable[[ModelSpec], dict]]] = None
    Block: ClassVar[type[nnx.Module]]

    @staticmethod
    @abc.abstractmethod
    def spec_from_hf_config(cfg: dict, architecture: str) -> ModelSpec:
        """The spec of an HF config.json of `architecture`; ModelConfigError for what we cannot serve."""

    @staticmethod
    @abc.abstractmethod
    def param_shapes(spec: ModelSpec) -> dict:
        """Pytree of shape tuples: the family's param tree for `spec`."""

    @staticmethod
    @abc.abstractmethod
    def hf_rules(spec: ModelSpec) -> list:
        """The `hfmap.Rule`s mapping HF tensor names to params (and back)."""

    @staticmethod
    @abc.abstractmethod
    def partition_specs(spec: ModelSpec, axis: str, size: int) -> dict:
        """PartitionSpec per param for tensor parallelism over mesh axis `axis` of `size`."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        declare_params(self, {k: v for k, v in type(self).param_shapes(spec).items() if k != "layers"})
        self.layers = nnx.List([self.Block(spec, i) for i in range(spec.num_layers)])

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Optional[KVCache],
                 block_tables: Optional[jax.Array], last_index: Optional[jax.Array] = None,
                 lora: Any = None):
        """(final-normed hidden [B, T, D], new cache or None); with `last_index` the hidden
        state of token `last_index[b]` only, [B, 1, D] (see `hidden_states`). `lora`: a
        `model_server.models.lora.Lora` (adapter stack and per-row index; Llama family only)."""
        x = self.embed_tokens(tokens, positions)
        new_cache: Optional[KVCache] = [] if cache is not None else None
        for i, block in enumerate(self.layers):
            extra = {} if lora is None else {"lora": lora.layer(i)}
            x, layer_cache = block(x, positions, None if cache is None else cache[i], block_tables,
                                   last_index, **extra)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.final_norm_of(x), new_cache

    @abc.abstractmethod
    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Input embeddings [B, T, D] of `tokens` at `positions`."""

    @abc.abstractmethod
    def final_norm_of(self, x: jax.Array) -> jax.Array:
        """The final norm of the last layer's output."""

    @abc.abstractmethod
    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary projection, float32: [B, T, D] -> [B, T, V]."""


_FAMILIES: dict[str, type[DecoderModel]] = {}
_BY_ARCHITECTURE: dict[str, type[DecoderModel]] = {}


def register_family(name: str, architectures: Sequence[str], *, spec_from_hf_config: Callable,
                    param_shapes: Callable, hf_rules: Callable, partition_specs: Callable,
                    hf_prefix: str = "", to_hf_config: Optional[Callable] = None
                    ) -> Callable[[type[DecoderModel]], type[DecoderModel]]:
    """Class decorator: give a `DecoderModel` subclass its family contract (the functions become
    its static methods) and enter it under `name` and its HF `architectures`."""

    def register(cls: type[DecoderModel]) -> type[DecoderModel]:
        taken = {a: _BY_ARCHITECTURE[a].family for a in architectures if a in _BY_ARCHITECTURE}
        if name in _FAMILIES or taken:
            raise ValueError(f"family {name!r} or architectures {taken} registered twice")
        cls.family, cls.architectures, cls.hf_prefix = name, tuple(architectures), hf_prefix
        for attr, fn in (("spec_from_hf_config", spec_from_hf_config), ("param_shapes", param_shapes),
                         ("hf_rules", hf_rules), ("partition_specs", partition_specs)):
            setattr(cls, attr, staticmethod(fn))
        cls.to_hf_config = staticmethod(to_hf_config) if to_hf_config is not None else None
        abc.update_abstractmethods(cls)
        if cls.__abstractmethods__:
            raise TypeError(f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} abstract")
        _FAMILIES[name] = cls
        FAMILY_NAMES.add(name)
        for arch in cls.architectures:
            _BY_ARCHITECTURE[arch] = cls
        return cls

    return register


def families() -> tuple[str, ...]:
    """Registered family names."""
    return tuple(sorted(_FAMILIES))


def architectures() -> dict[str, str]:
    """Hugging Face architecture -> family name, for every registered family."""
    return {arch: cls.family for arch, cls in sorted(_BY_ARCHITECTURE.items())}


def family_class(spec_or_family: ModelSpec | str) -> type[DecoderModel]:
    """The registered `DecoderModel` subclass of a spec (or of a family name)."""
    family = spec_or_family if isinstance(spec_or_family, str) else spec_or_family.family
    cls = _FAMILIES.get(family)
    if cls is None:
        raise ModelConfigError(f"unknown model family {family!r}; registered: {', '.join(families())}")
    return cls


def hf_config_of(spec: ModelSpec) -> dict:
    """A config.json for `spec` (families with a writer: see `DecoderModel.to_hf_config`)."""
    writer = family_class(spec).to_hf_config
    if writer is None:
        raise ModelConfigError(f"the {spec.family} family has no config.json writer")
    return writer(spec)


@functools.lru_cache(maxsize=64)
def graphdef(spec: ModelSpec) -> nnx.GraphDef:
    """The static graph of the family's module for `spec`."""
    return nnx.split(abstract_module(spec))[0]


def bind(spec: ModelSpec, params: Params) -> nnx.Module:
    """The family's module with `params` as its weights (the arrays are used, not copied)."""
    state = {**params, "layers": dict(enumerate(params["layers"]))}
    return nnx.merge(graphdef(spec), state)


# --------------------------------------------------------------------------- forward

def hidden_states(spec: ModelSpec, params: Params, tokens: jax.Array, positions: jax.Array,
                  cache: Optional[KVCache], block_tables: Optional[jax.Array], *,
                  last_index: Optional[jax.Array] = None, lora: Any = None):
    """Final normalised hidden states [B, T, D] and the updated cache. With `last_index` [B],
    only token `last_index[b]` of each row: [B, 1, D]; the last layer then computes the other
    tokens' keys and values only (for the cache). `lora`: adapters (see DecoderModel)."""
    return bind(spec, params)(tokens, positions, cache, block_tables, last_index, lora)


def logits_from_hidden(spec: ModelSpec, params: Params, hidden: jax.Array) -> jax.Array:
    """Vocabulary projection in float32 accumulation: [B, T, D] -> [B, T, V] float32."""
    return bind(spec, params).logits(hidden)


def forward(spec: ModelSpec, params: Params, tokens: jax.Array, positions: jax.Array,
            cache: Optional[KVCache], block_tables: Optional[jax.Array], *,
            return_hidden: bool = False):
    """(logits [B,T,V] float32, new_cache) or, with return_hidden, (logits, new_cache, hidden)."""
    hidden, new_cache = hidden_states(spec, params, tokens, positions, cache, block_tables)
    logits = logits_from_hidden(spec, params, hidden)
    if return_hidden:
        return logits, new_cache, hidden
    return logits, new_cache


@functools.lru_cache(maxsize=64)
def make_forward(spec: ModelSpec, *, return_hidden: bool = False) -> Callable:
    """`f(params, tokens, positions, cache, block_tables)`; jit it with `donate_argnums=(3,)`.

    Jit the returned function once and keep the jitted object: every `jax.jit(...)` call
    makes a new wrapper (the same function object is returned for the same spec).
    """
    return functools.partial(forward, spec, return_hidden=return_hidden)


def forward_last(spec: ModelSpec, params: Params, tokens: jax.Array, positions: jax.Array,
                 cache: Optional[KVCache], block_tables: Optional[jax.Array], last_index: jax.Array,
                 lora: Any = None):
    """Prefill variant: logits only at token `last_index[b]` of each row -> ([B, V] float32, cache).

    Skips the [B, T, V] projection (large for big vocabularies and long buckets) and, in the
    last layer, everything but the keys and values of the other tokens.
    """
    last, new_cache = hidden_states(spec, params, tokens, positions, cache, block_tables,
                                    last_index=last_index, lora=lora)  # [B, 1, D]
    return logits_from_hidden(spec, params, last)[:, 0, :], new_cache


@functools.lru_cache(maxsize=64)
def make_forward_last(spec: ModelSpec) -> Callable:
    """`f(params, tokens, positions, cache, block_tables, last_index)`; see `forward_last`."""
    return functools.partial(forward_last, spec)


@functools.lru_cache(maxsize=64)
def make_hidden_fn(spec: ModelSpec) -> Callable:
    """`f(params, tokens, positions, cache, block_tables) -> (hidden, new_cache)`."""
    return functools.partial(hidden_states, spec)


# --------------------------------------------------------------------------- sharding

def param_partition_specs(spec: ModelSpec, axis: str = "tp", axis_size: int = 1) -> Params:
    """PartitionSpec per param for Megatron-style tensor parallelism over mesh axis `axis`.

    Column-parallel projections split their output (heads / ffn) dimension, row-parallel
    ones their input dimension; a dimension not divisible by `axis_size` stays replicated.
    """
    return family_class(spec).partition_specs(spec, axis, axis_size)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, axis: str = "tp") -> jax.sharding.Mesh:
    """One-dimensional tensor-parallel mesh over `devices` (default: all local devices)."""
    devs = np.array(list(devices) if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(devs, (axis,))


# --------------------------------------------------------------------------- HF config

def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def spec_from_hf_config(config: dict, generation_config: Optional[dict] = None) -> ModelSpec:
    """ModelSpec from a Hugging Face config.json (+ generation_config.json for eos ids)."""
    archs = config.get("architectures") or []
    if not archs:
        raise ModelConfigError("config.json has no 'architectures' entry")
    arch = archs[0]
    cls = _BY_ARCHITECTURE.get(arch)
    if cls is None:
        raise ModelConfigError(
            f"unknown architecture {arch!r} (config.json architectures); supported: "
            f"{', '.join(sorted(_BY_ARCHITECTURE))}")
    spec = cls.spec_from_hf_config(config, arch)
    gen = generation_config or {}
    eos = _id_list(config.get("eos_token_id"))
    for token in _id_list(gen.get("eos_token_id")):
        if token not in eos:
            eos.append(token)
    eos = [e for e in eos if 0 <= e < spec.vocab_size]
    bos = gen.get("bos_token_id", config.get("bos_token_id"))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    bos = int(bos) if isinstance(bos, int) and 0 <= bos < spec.vocab_size else None
    pad = int(pad) if isinstance(pad, int) and 0 <= pad < spec.vocab_size else None
    return dataclasses.replace(spec, eos_token_ids=tuple(eos), bos_token_id=bos, pad_token_id=pad)


def random_params(spec: ModelSpec, seed: int = 0, dtype: Any = "float32") -> Params:
    """Deterministic random params from numpy's PCG64 (identical on every machine).

    Norm weights are 1, biases small, matrices N(0, 1/fan_in), embeddings N(0, 1). Matrices
    are [out, in]; they are drawn [in, out] and transposed, so the values stay those of the
    earlier [in, out] layout.
    """
    rng = np.random.default_rng(seed)
    dt = dtype_of(dtype)

    def build(tree: Any, name: str = "") -> Any:
        if isinstance(tree, dict):
            return {k: build(v, k) for k, v in tree.items()}
        if isinstance(tree, list):
            return [build(v, name) for v in tree]
        shape = tree
        if "norm" in name and not name.endswith("_b"):
            arr = np.ones(shape, np.float32)
        elif len(shape) == 1:
            arr = rng.standard_normal(shape, dtype=np.float32) * 0.02
        elif name in ("embed", "pos_embed"):
            arr = rng.standard_normal(shape, dtype=np.float32)
        else:
            arr = (rng.standard_normal(shape[::-1], dtype=np.float32) / np.float32(math.sqrt(shape[1]))).T
        return np.ascontiguousarray(arr.astype(dt))

    return build(param_shapes(spec))
