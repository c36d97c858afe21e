"""Per-host shard loading on a real 2-process CPU slice (jax.distributed, gloo): each host
reads from the checkpoint only the blocks its own 2 devices hold (counted by the reader), and
the shards equal those of a whole-tensor load (float32 and int8-at-load)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import free_port

WORKER = Path(__file__).with_name("slice_shard_load_worker.py")
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}

pytestmark = pytest.mark.timeout(300)


def _run_pair(ckpt: Path, tmp: Path, quantization: str) -> list[dict]:
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **ENV}
    outs = [tmp / f"rank{r}-{quantization or 'f32'}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(ckpt), coordinator, str(r),
                               quantization, str(outs[r])], env=env) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads(o.read_text()) for o in outs]


def _reference(ckpt: Path, quantization: str) -> dict:
    import jax

    from model_server import checkpoint as ck
    from model_server.models import quant

    params = ck.load_params(ck.open_checkpoint(ckpt), "float32", on_device=False)
    if quantization:
        params = quant.quantize_tree(params)
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_shards_equal(ranks: list[dict], ref: dict) -> None:
    """Every rank holds a shard of every tensor, each equal to its block of a whole-tensor load."""
    for r in ranks:
        assert set(r["shards"]) == set(ref)
        for key, shards in r["shards"].items():
            for bounds, data in shards:
                want = ref[key][tuple(slice(lo, hi) for lo, hi in bounds)]
                np.testing.assert_array_equal(np.asarray(data, want.dtype), want, err_msg=key)


@pytest.mark.parametrize("quantization", ["", "int8"])
def test_each_host_reads_its_own_shards(tiny_hf_dir, tmp_path, quantization):
    ranks = _run_pair(tiny_hf_dir, tmp_path, quantization)
    assert [r["local_devices"] for r in ranks] == [2, 2] and ranks[0]["devices"] == 4
    stored = ranks[0]["stored"]
    # tiny Llama over 4 devices: q/gate/up/lm_head split their output rows, o/down their input
    # columns; k/v (2 kv heads), the embedding and the norms stay replicated
    column = ("q_proj", "gate_proj", "up_proj", "lm_head")
    row = ("o_proj", "down_proj")
    for name, size in stored.items():
        per_host = [r["bytes_read"][name] for r in ranks]
        half = name.split(".")[-2] in column or (name.split(".")[-2] in row and not quantization)
        # int8 scales need whole rows: a row-parallel weight is read in full rows
        assert per_host == ([size // 2] * 2 if half else [size] * 2), (name, per_host, size)
    total = sum(stored.values())
    sharded = sum(v for k, v in stored.items() if k.split(".")[-2] in column + row)
    assert sharded > total // 2
    if not quantization:  # each host reads half of every sharded tensor
        assert [sum(r["bytes_read"].values()) for r in ranks] == [total - sharded // 2] * 2
    # every shard holds the values of a whole-tensor load
    ref = _reference(tiny_hf_dir, quantization)
    _assert_shards_equal(ranks, ref)


def test_orbax_int8_quantized_per_shard(tiny_hf_dir, tmp_path):
    """An Orbax checkpoint restored onto the slice's shardings and quantized there, each host
    its own blocks (row maxima reduced over the devices): every shard equals a whole-tensor
    quantize, the row-parallel (input-sharded) weights included."""
    from model_server.checkpoint import writing
    from model_server import checkpoint as ck

    hf = ck.open_checkpoint(tiny_hf_dir)
    orbax = writing.save_orbax(hf, ck.load_params(hf, "float32", on_device=False),
                               tmp_path / "orbax", "float32")
    ranks = _run_pair(orbax, tmp_path, "int8")
    assert [r["local_devices"] for r in ranks] == [2, 2] and ranks[0]["bytes_read"] == {}
    ref = _reference(tiny_hf_dir, "int8")
    wo = next(k for k in ref if k.endswith("['wo'].q"))
    for r in ranks:  # input-sharded: each device holds a quarter of the columns
        assert {b[-1][1] - b[-1][0] for b, _ in r["shards"][wo]} == {ref[wo].shape[-1] // 4}
    _assert_shards_equal(ranks, ref)


@pytest.mark.parametrize("name,quantization", [("qwen3_moe", "int8"), ("mixtral", "")])
def test_moe_experts_read_per_host(tmp_path, name, quantization):
    """Expert-stacked weights (one stored tensor per expert, experts split over the 4 devices):
    each host reads only its own experts' tensors, and the shards equal a whole-tensor load."""
    pytest.importorskip("torch")
    from tests import moe_checkpoints

    ckpt = moe_checkpoints.build(name, tmp_path / name)[1]
    ranks = _run_pair(ckpt, tmp_path, quantization)
    stored = ranks[0]["stored"]
    experts = {k: v for k, v in stored.items() if ".experts." in k}
    assert experts
    for key, size in experts.items():
        assert sorted(r["bytes_read"][key] for r in ranks) == [0, size], key
    for r in ranks:
        assert sum(r["bytes_read"][k] for k in experts) == sum(experts.values()) // 2
    ref = _reference(ckpt, quantization)
    _assert_shards_equal(ranks, ref)


def test_orbax_int8_on_a_local_mesh(tiny_hf_dir, tmp_path):
    """The same per-shard quantization in one process (every device local): equal to a
    whole-tensor quantize, leaf by leaf."""
    import jax

    from model_server import checkpoint as ck
    from model_server.models import base, quant

    hf = ck.open_checkpoint(tiny_hf_dir)
    ck.save_orbax(hf, ck.load_params(hf, "float32", on_device=False), tmp_path / "orbax", "float32")
    got = ck.load_params(ck.open_checkpoint(tmp_path / "orbax"), "float32",
                         mesh=base.make_mesh(jax.local_devices()), quantization="int8")
    assert quant.is_quantized(got["layers"][0]["wo"]) and not quant.is_quantized(got["final_norm"])
    ref = _reference(tiny_hf_dir, "int8")
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    assert set(flat) == set(ref)
    for key, want in ref.items():
        np.testing.assert_array_equal(flat[key], want, err_msg=key)
