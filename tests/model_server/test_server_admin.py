"""A model server joined to a real admin: loads what is published, reports failures, unloads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from tests.cluster import AdminProcess, ModelServerProcess, publish_and_wait, wait_until

pytestmark = pytest.mark.slow


def _broken_copy(src: Path, out: Path, **config: object) -> Path:
    """A copy of an HF directory whose config.json has `config` changed."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


def test_admin_assigns_loads_reports_failures_and_unloads(tmp_path: Path, tiny_compiled: None,
                                                         tiny_hf_dir: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    ms = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}").start()
    try:
        servers = wait_until(lambda: requests.get(f"{admin.url}/servers", timeout=5).json()["servers"],
                             what="server announced")
        assert servers[0]["address"] == ms.address and "test.tiny" in servers[0]["servable_model_paths"]
        assert servers[0]["chip"] == "cpu" and servers[0]["memory_bytes"] > 0
        detail = publish_and_wait(admin.url, "/sax/test/good")
        assert detail["replicas"][0]["memory_bytes"] > 0 and detail["replicas"][0]["load_time_s"] > 0
        out = requests.post(f"{ms.url}/v1/completions", json={"model": "/sax/test/good", "prompt": "hi",
                                                              "max_tokens": 3}).json()
        assert out["choices"][0]["finish_reason"] in ("stop", "length")

        # Bad checkpoints fail with a clear reason at the admin, their replica FAILED; the good
        # model keeps serving.
        wrong_shape, unknown_arch = _broken_copy(tiny_hf_dir, tmp_path / "shape", intermediate_size=96), \
            _broken_copy(tiny_hf_dir, tmp_path / "arch", architectures=["BertForMaskedLM"])
        for name, checkpoint, reason in [("missing", tmp_path / "missing", "missing"),
                                         ("shape", wrong_shape, "has shape"),
                                         ("arch", unknown_arch, "unknown architecture 'BertForMaskedLM'")]:
            r = requests.post(f"{admin.url}/models", timeout=10, json={
                "model_id": f"/sax/test/{name}", "model_path": "lm.hf", "checkpoint": str(checkpoint),
                "replicas": 1})
            assert r.status_code == 201
            bad = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
                requests.get(f"{admin.url}/models/sax/test/{name}", timeout=5).json()), timeout=60,
                what=f"{name} failure")
            assert reason in bad["last_error"] and ms.address in bad["last_error"], bad
            assert [rep["status"] for rep in bad["replicas"]] == ["FAILED"], bad
            assert requests.post(f"{ms.url}/v1/completions", json={
                "model": "/sax/test/good", "prompt": "hi", "max_tokens": 2}).status_code == 200

        requests.delete(f"{admin.url}/models/sax/test/good", timeout=5)
        wait_until(lambda: requests.post(f"{ms.url}/v1/completions", json={
            "model": "/sax/test/good", "prompt": "hi", "max_tokens": 2}).status_code == 404,
            timeout=30, what="unloaded")
    finally:
        ms.stop()
        admin.stop()


def test_chip_topology_and_tags_from_flags_env_or_detection(tmp_path: Path) -> None:
    """Flags over SAX_CHIP / SAX_TOPOLOGY / SAX_TAGS over what JAX reports (cpu, its device count)."""
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    env = {"SAX_CHIP": "h100", "SAX_TOPOLOGY": "2x4", "SAX_TAGS": "east, spot,", "SAX_MEMORY_BYTES": "999",
           "XLA_FLAGS": ""}
    detected = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}", env={
        "SAX_CHIP": "", "SAX_TOPOLOGY": "", "SAX_TAGS": "", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    from_env = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}", env=env)
    from_flags = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}", env=env, extra_args=[
        "--chip", "tpuv5e", "--topology", "2x2", "--tags", "west", "--memory-bytes", "12345"])
    procs = [detected, from_env, from_flags]
    try:
        for p in procs:
            p.start(wait=False)
        servers = wait_until(lambda: (lambda s: s if len(s) == 3 else None)(
            {d["address"]: d for d in requests.get(f"{admin.url}/servers", timeout=5).json()["servers"]}),
            timeout=120, what="three servers announced")
        d = servers[detected.address]
        assert (d["chip"], d["device_count"], d["topology"], d["tags"]) == ("cpu", 2, "2", [])
        assert d["memory_bytes"] > 0
        e = servers[from_env.address]
        assert (e["chip"], e["device_count"], e["topology"], e["tags"], e["memory_bytes"]) == (
            "h100", 1, "2x4", ["east", "spot"], 999)
        f = servers[from_flags.address]
        assert (f["chip"], f["topology"], f["tags"], f["memory_bytes"]) == ("tpuv5e", "2x2", ["west"], 12345)
    finally:
        for p in procs:
            p.stop()
        admin.stop()
