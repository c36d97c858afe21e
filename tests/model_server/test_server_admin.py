"""A model server joined to a real admin: loads what is published, reports failures, unloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.cluster import AdminProcess, ModelServerProcess, publish_and_wait, wait_until

pytestmark = pytest.mark.slow


def test_admin_assigns_loads_reports_failures_and_unloads(tmp_path: Path, tiny_compiled: None) -> None:
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

        # A bad checkpoint fails with a clear reason at the admin; the good model keeps serving.
        r = requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": "/sax/test/bad", "model_path": "lm.hf", "checkpoint": str(tmp_path / "missing"),
            "replicas": 1})
        assert r.status_code == 201
        bad = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
            requests.get(f"{admin.url}/models/sax/test/bad", timeout=5).json()), timeout=60, what="failure")
        assert "missing" in bad["last_error"] and ms.address in bad["last_error"]
        assert requests.post(f"{ms.url}/v1/completions", json={"model": "/sax/test/good", "prompt": "hi",
                                                               "max_tokens": 2}).status_code == 200

        requests.delete(f"{admin.url}/models/sax/test/good", timeout=5)
        wait_until(lambda: requests.post(f"{ms.url}/v1/completions", json={
            "model": "/sax/test/good", "prompt": "hi", "max_tokens": 2}).status_code == 404,
            timeout=30, what="unloaded")
    finally:
        ms.stop()
        admin.stop()
