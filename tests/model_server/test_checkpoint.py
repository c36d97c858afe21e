"""Checkpoint loading: local HF dirs, gs:// through the emulator, Orbax, bad checkpoints."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from common import gcs
from model_server import checkpoint as ck
from model_server import convert, registry
from model_server.checkpoint import CheckpointError, gcs_mirror
from model_server.models import base, tiny

TOKENS = np.array([[5, 17, 42, 99, 7, 250, 3, 11]], np.int32)
POSITIONS = np.arange(TOKENS.shape[1], dtype=np.int32)[None]


def _logits(model: registry.LoadedModel) -> np.ndarray:
    logits, _ = jax.jit(base.make_forward(model.spec))(model.params, TOKENS, POSITIONS, None, None)
    return np.asarray(logits)


@pytest.fixture(scope="module")
def tiny_logits() -> np.ndarray:
    return _logits(registry.load_model("test.tiny", None, {"dtype": "float32"}))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _upload(local: Path, bucket: str, prefix: str) -> str:
    ck.upload_dir_to_gcs(local, f"gs://{bucket}/{prefix}")
    return f"gs://{bucket}/{prefix}"


# --------------------------------------------------------------------------- local HF

def test_local_hf_dir_matches_builtin(tiny_hf_dir, tiny_logits):
    model = registry.load_model("lm.hf", str(tiny_hf_dir), {"dtype": "float32", "num_slots": 2})
    assert model.source_format == "hf"
    assert model.spec.architecture == "LlamaForCausalLM"
    assert model.eos_token_ids == tiny.spec().eos_token_ids
    assert model.tokenizer.vocab_size == tiny.VOCAB_SIZE
    np.testing.assert_array_equal(_logits(model), tiny_logits)
    # the family-asserting path accepts it, the others refuse with a clear message
    registry.load_model("lm.llama", str(tiny_hf_dir))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        registry.load_model("lm.gpt2", str(tiny_hf_dir))


def test_sharded_index_without_prefix(tiny_hf_dir, tmp_path, tiny_logits):
    """Two shards + index, tensor names saved without the `model.` prefix."""
    d = _copy(tiny_hf_dir, tmp_path / "sharded")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n.removeprefix("model."): tensors[n] for n in part}, str(d / fname))
        weight_map.update({n.removeprefix("model."): fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    np.testing.assert_array_equal(_logits(registry.load_model("lm.hf", str(d), {"dtype": "float32"})),
                                  tiny_logits)


def test_bfloat16_load(tiny_hf_dir, tiny_logits):
    model = registry.load_model("lm.hf", str(tiny_hf_dir), {"dtype": "bfloat16"})
    assert jax.tree.leaves(model.params)[0].dtype == jax.numpy.bfloat16
    assert model.memory_bytes() == base.param_bytes(model.spec, "bfloat16") + model.kv_cache_bytes()
    np.testing.assert_allclose(_logits(model), tiny_logits, atol=0.5)


def test_estimate_memory(tiny_hf_dir):
    overrides = {"num_slots": 4, "max_seq_len": 128, "dtype": "float32"}
    est = registry.estimate_memory_bytes("lm.hf", str(tiny_hf_dir), overrides)
    model = registry.load_model("lm.hf", str(tiny_hf_dir), overrides)
    assert est == model.memory_bytes()
    spec = model.spec
    # the pool: room for 4 sequences of 128 positions in blocks of 16, and each slot's own last block
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 16 * (4 * 128 // 16 + 4)
    assert model.kv_cache_bytes() == kv
    assert est == kv + 4 * sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params))


# --------------------------------------------------------------------------- GCS

def test_gcs_load_and_resume(gcs_bucket, tiny_hf_dir, tmp_path, tiny_logits, monkeypatch, caplog):
    uri = _upload(tiny_hf_dir, gcs_bucket, "models/tiny")
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="model_server.checkpoint")
    monkeypatch.setattr(gcs_mirror, "DOWNLOAD_CHUNK", 64 << 10)  # several ranged GETs per weights file
    monkeypatch.setattr(gcs_mirror, "PROGRESS_INTERVAL_S", 0.0)
    model = registry.load_model("lm.hf", uri, {"dtype": "float32"}, cache_dir=str(cache))
    np.testing.assert_array_equal(_logits(model), tiny_logits)
    local = cache / gcs_bucket / "models" / "tiny"
    size = (tiny_hf_dir / "model.safetensors").stat().st_size
    assert (local / "model.safetensors").stat().st_size == size > 3 * (64 << 10)
    progress = [r.getMessage() for r in caplog.records if "model.safetensors: " in r.getMessage()]
    assert len(progress) == -(-size // (64 << 10))  # one line per chunk, within the file
    assert progress[0].startswith(f"checkpoint {uri}: [") and "0.1/" in progress[0]

    # complete files are not fetched again
    calls = []
    real = gcs_mirror._download_blob
    monkeypatch.setattr(gcs_mirror, "_download_blob", lambda blob, target, *a: (calls.append(blob.name), real(blob, target, *a)))
    registry.load_model("lm.hf", uri, cache_dir=str(cache))
    assert calls == []

    # an interrupted download (a .partial with half the bytes) is continued from where it stopped
    weights = local / "model.safetensors"
    data = weights.read_bytes()
    half = len(data) // 2
    weights.unlink()
    (local / "model.safetensors.partial").write_bytes(data[:half])
    caplog.clear()
    model = registry.load_model("lm.hf", uri, {"dtype": "float32"}, cache_dir=str(cache))
    assert calls == ["models/tiny/model.safetensors"]
    assert f"continuing from byte {half} of {len(data)}" in caplog.text and "CRC32C" not in caplog.text
    assert weights.read_bytes() == data
    assert not (local / "model.safetensors.partial").exists()
    np.testing.assert_array_equal(_logits(model), tiny_logits)

    # a .partial whose bytes are not the object's (it changed meanwhile): the continued file
    # fails the CRC32C check and is fetched again whole
    weights.unlink()
    (local / "model.safetensors.partial").write_bytes(bytes(half))
    caplog.clear()
    ck.download_gcs_dir(uri, local)
    assert "does not match the object's CRC32C; fetching it again" in caplog.text
    assert weights.read_bytes() == data

    # an object replaced by one of the same size is fetched again (crc32c differs)
    client = gcs.client()
    client.bucket(gcs_bucket).blob("models/tiny/notes.txt").upload_from_string("aaaa")
    ck.download_gcs_dir(uri, local)
    client.bucket(gcs_bucket).blob("models/tiny/notes.txt").upload_from_string("bbbb")
    ck.download_gcs_dir(uri, local)
    assert (local / "notes.txt").read_text() == "bbbb"


def test_gcs_estimate_reads_config_only(gcs_bucket, tiny_hf_dir):
    uri = _upload(tiny_hf_dir, gcs_bucket, "t")
    est = registry.estimate_memory_bytes("lm.hf", uri, {"num_slots": 2, "dtype": "float32"})
    assert est == registry.estimate_memory_bytes("lm.hf", str(tiny_hf_dir), {"num_slots": 2, "dtype": "float32"})


def test_gcs_missing_checkpoint(gcs_bucket, tmp_path):
    with pytest.raises(CheckpointError, match="no objects"):
        registry.load_model("lm.hf", f"gs://{gcs_bucket}/nothing/here", cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError):
        registry.load_model("lm.hf", "gs://no-such-bucket-xyz/m", cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- Orbax

def test_orbax_round_trip(tiny_hf_dir, tmp_path, tiny_logits):
    out = tmp_path / "orbax"
    assert convert.main([str(tiny_hf_dir), str(out)]) == 0
    assert (out / ck.ORBAX_MARKER).exists() and (out / "params").is_dir()
    assert not list(out.glob("*.safetensors"))
    model = registry.load_model("lm.hf", str(out), {"dtype": "float32"})
    assert model.source_format == "orbax"
    np.testing.assert_array_equal(_logits(model), tiny_logits)
    assert model.tokenizer.encode("hello") == registry.load_model("test.tiny", None).tokenizer.encode("hello")
    # restoring casts to the requested dtype
    bf16 = registry.load_model("lm.llama", str(out), {"dtype": "bfloat16"})
    assert jax.tree.leaves(bf16.params)[0].dtype == jax.numpy.bfloat16
    # converting onto an existing checkpoint refuses
    assert convert.main([str(tiny_hf_dir), str(out)]) == 1
    # stored uncompressed (restores take half the CPU): random weights do not shrink
    stored = sum(f.stat().st_size for f in (out / ck.ORBAX_PARAMS_DIR).rglob("*") if f.is_file())
    assert stored >= base.param_bytes(model.spec, "float32")


def test_checkpoint_load_bench_runs(tmp_path):
    """bench/checkpoint.py on tiny models: every case loads both formats, to the same arrays."""
    from bench import checkpoint as bench

    rows = bench.run(tmp_path, rounds=1, small=True, cold=False)
    assert [r["case"] for r in rows] == ["gpt2 fp32", "llama bf16->fp32", "llama bf16"]
    for row in rows:
        assert set(row["times"]) == {"warm"}
        assert all(t > 0 for ts in row["times"]["warm"].values() for t in ts)
    # bf16 on disk, float32 served: the conversion stores float32
    assert rows[1]["orbax_mb"] > 1.9 * rows[1]["hf_mb"] - 0.1
    assert "| llama bf16 " in bench.format_table(rows)


def test_convert_cli_gcs_to_gcs(gcs_bucket, tiny_hf_dir, tmp_path, tiny_logits):
    src = _upload(tiny_hf_dir, gcs_bucket, "hf/tiny")
    dst = f"gs://{gcs_bucket}/orbax/tiny"
    env = dict(os.environ, JAX_PLATFORMS="cpu", SAX_CHECKPOINT_CACHE=str(tmp_path / "cli-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "model_server.convert", src, dst, "--dtype", "float32"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = registry.load_model("lm.hf", dst, {"dtype": "float32"}, cache_dir=str(tmp_path / "cache"))
    assert model.source_format == "orbax"
    np.testing.assert_array_equal(_logits(model), tiny_logits)


# --------------------------------------------------------------------------- bad checkpoints

def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.load_model("lm.hf", str(tmp_path / "nope"))


def test_missing_config(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        registry.load_model("lm.hf", str(d))


def test_unknown_architecture(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    _edit_config(d, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(CheckpointError, match="unknown architecture 'BertForMaskedLM'"):
        registry.load_model("lm.hf", str(d))


def test_missing_weights(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only safetensors"):
        registry.load_model("lm.hf", str(d))


def test_missing_tensor(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensors missing.*layers\.1\.mlp\.up_proj"):
        registry.load_model("lm.hf", str(d))


def test_wrong_shape(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    _edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        registry.load_model("lm.hf", str(d))


def test_truncated_weights(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        registry.load_model("lm.hf", str(d))


def test_missing_shard(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors"):
        registry.load_model("lm.hf", str(d))


def test_bad_json_and_missing_tokenizer(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "c")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        registry.load_model("lm.hf", str(d))
    d2 = _copy(tiny_hf_dir, tmp_path / "d")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d2 / f).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        registry.load_model("lm.hf", str(d2))


def test_broken_orbax(tiny_hf_dir, tmp_path):
    out = tmp_path / "orbax"
    assert convert.main([str(tiny_hf_dir), str(out)]) == 0
    _edit_config(out, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="Orbax"):
        registry.load_model("lm.hf", str(out))
    shutil.rmtree(out / "params")
    with pytest.raises(CheckpointError, match="params/"):
        registry.load_model("lm.hf", str(out))


def test_orbax_of_the_old_weight_layout_is_refused(tiny_hf_dir, tmp_path):
    """Version-1 conversions hold [in, out] matrices: refused with what to do, never misread."""
    out = tmp_path / "orbax"
    assert convert.main([str(tiny_hf_dir), str(out)]) == 0
    marker = json.loads((out / ck.ORBAX_MARKER).read_text())
    assert marker["version"] == ck.ORBAX_FORMAT_VERSION == 2
    (out / ck.ORBAX_MARKER).write_text(json.dumps(dict(marker, version=1)))
    with pytest.raises(CheckpointError, match="convert the Hugging Face checkpoint again"):
        registry.load_model("lm.hf", str(out))
