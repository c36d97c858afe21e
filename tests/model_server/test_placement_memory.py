"""Placement memory estimates on real-shaped configs: `registry.estimate_memory_bytes` (read
from config.json alone, what the admin places by) equals what a load really allocates, params
(every expert of an MoE) and KV pool, for sliding-window, mixed local/global and MoE models.

The KV pool is not window-bounded yet: every layer's pool holds `num_blocks` blocks, sized for
`num_slots` sequences of `max_seq_len` (a windowed layer's blocks behind its window stay held
until the sequence ends), so the estimate counts the same, `max_seq_len` per layer.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from model_server import registry  # noqa: E402
from model_server.checkpoint import open_checkpoint  # noqa: E402
from model_server.models import base  # noqa: E402
from tests import moe_checkpoints  # noqa: E402

OVERRIDES = {"num_slots": 3, "max_seq_len": 48, "dtype": "float32"}


@pytest.fixture(scope="module")
def checkpoints(torch_models, tmp_path_factory) -> dict:
    """{name: (torch model, dir)}: Mistral with a window, Gemma 2, Gemma 3 (5:1), Qwen3-MoE, Mixtral."""
    out = {n: torch_models[n] for n in ("mistral_sw", "gemma2", "gemma3")}
    for name in ("qwen3_moe", "mixtral"):
        out[name] = moe_checkpoints.build(name, tmp_path_factory.mktemp(name))
    return out


def _nbytes(tree) -> int:
    return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", ["mistral_sw", "gemma2", "gemma3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("kv_dtype", [None, "bfloat16"])
def test_estimate_equals_what_a_load_allocates(checkpoints, name, kv_dtype):
    torch_model, path = checkpoints[name]
    overrides = {**OVERRIDES, **({"kv_cache_dtype": kv_dtype} if kv_dtype else {})}
    spec = open_checkpoint(path).spec
    # every parameter counted, the experts of every sparse layer included
    assert base.param_count(spec) == sum(p.numel() for p in torch_model.parameters())
    loaded = registry.load_model("lm.hf", str(path), overrides)
    params = _nbytes(loaded.params)
    cache = loaded.init_cache()
    kv = _nbytes(cache)
    est = registry.estimate_memory_bytes("lm.hf", str(path), overrides, platform="cpu")
    assert est == params + kv == loaded.memory_bytes()
    assert loaded.param_bytes() == params and loaded.kv_cache_bytes() == kv
    # the pool: every layer, num_slots sequences of max_seq_len (+ one block per slot)
    bs = loaded.knobs.block_size
    blocks = OVERRIDES["num_slots"] * (-(-OVERRIDES["max_seq_len"] // bs) + 1)
    item = np.dtype(jax.numpy.dtype(loaded.knobs.kv_cache_dtype)).itemsize
    assert kv == spec.num_layers * 2 * blocks * bs * spec.num_kv_heads * spec.head_dim * item
    assert len(cache) == spec.num_layers


def test_windowed_specs(checkpoints):
    """The windows per layer of the configs the estimates above cover."""
    specs = {n: open_checkpoint(p).spec for n, (_, p) in checkpoints.items()}
    assert [specs["mistral_sw"].window_of(i) for i in range(2)] == [8, 8]
    assert [specs["gemma2"].window_of(i) for i in range(3)] == [8, None, 8]
    assert [specs["gemma3"].window_of(i) for i in range(7)] == [6] * 5 + [None, 6]
    assert specs["qwen3_moe"].moe_layers == (1,) and specs["mixtral"].moe_layers == (0, 1)
