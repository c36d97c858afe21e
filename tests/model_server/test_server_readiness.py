"""Readiness per model while another model loads: its checkpoint comes from a GCS emulator that
is paused (SIGSTOP) until the test lets it answer, so the load stays LOADING for as long as the
test looks at it."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests

from tests.cluster import TINY_OVERRIDES, GcsEmulator, ModelServerProcess, create_bucket, wait_http

pytestmark = pytest.mark.slow
READY, LOADING = "/sax/test/lm", "/sax/test/gs"


def complete(url: str, model: str) -> requests.Response:
    return requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "The rain in Spain", "max_tokens": 6, "temperature": 0})


def test_ready_is_503_while_loading_and_the_server_keeps_serving(
        tmp_path: Path, tiny_hf_dir: Path, tiny_compiled: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_server.checkpoint import upload_dir_to_gcs

    emulator = GcsEmulator().start()
    ms = None
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        create_bucket(emulator.host, "ckpt")
        upload_dir_to_gcs(tiny_hf_dir, "gs://ckpt/tiny")
        os.kill(emulator.proc.pid, signal.SIGSTOP)  # the download hangs until SIGCONT
        # Loads run one at a time, in order: test.tiny first, then the gs:// checkpoint.
        ms = ModelServerProcess(tmp_path, models=[f"{READY}=test.tiny:None", f"{LOADING}=lm.hf:gs://ckpt/tiny"],
                                overrides=TINY_OVERRIDES, env={"SAX_CHECKPOINT_CACHE": str(tmp_path / "cache")})
        ms.start()
        wait_http(f"{ms.url}/ready{READY}", timeout=240, proc=ms.proc)

        r = requests.get(f"{ms.url}/ready{LOADING}", timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["code"] == "model_not_ready" and "LOADING" in r.json()["error"]
        assert requests.get(f"{ms.url}/healthz", timeout=10).json()["models"] == {
            f"{READY}@1": "LOADED", f"{LOADING}@1": "LOADING"}
        r = complete(ms.url, LOADING)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert [m["id"] for m in requests.get(f"{ms.url}/v1/models", timeout=10).json()["data"]] == [READY]
        served = complete(ms.url, READY)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 6
        assert requests.get(f"{ms.url}/ready{READY}", timeout=10).json()["status"] == "LOADED"
        assert requests.get(f"{ms.url}/ready{LOADING}", timeout=10).status_code == 503  # still loading

        os.kill(emulator.proc.pid, signal.SIGCONT)
        wait_http(f"{ms.url}/ready{LOADING}", timeout=240, proc=ms.proc)
        assert requests.get(f"{ms.url}/ready{LOADING}", timeout=10).json() == {
            "model_id": LOADING, "generation": 1, "status": "LOADED"}
        loaded = complete(ms.url, LOADING)
        assert loaded.status_code == 200  # the same weights as test.tiny: the same greedy answer
        assert loaded.json()["choices"][0]["text"] == served.json()["choices"][0]["text"]
    finally:
        if emulator.proc is not None:
            os.kill(emulator.proc.pid, signal.SIGCONT)
        if ms is not None:
            ms.stop()
        emulator.stop()
