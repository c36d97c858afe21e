"""The blob store (GCS, here the emulator) goes away under a running admin.

SQL is the authority: publishes keep succeeding while the emulator is down, and the leader
keeps its lease and its cadence. When the emulator is back on the same address (empty: it
keeps everything in memory, so the bucket is created again) the snapshot
`<root>/sax/<cell>/state.json` catches up with every published model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from tests.cluster import AdminProcess, GcsEmulator, create_bucket, wait_until
from tests.faults.harness import publish, record

pytestmark = pytest.mark.slow

BUCKET = "sax-outage"
PREFIX = "cells"


def _snapshot_models() -> list[str] | None:
    """Model ids in the snapshot, read through google-cloud-storage; None when absent."""
    from google.api_core import exceptions

    from common.gcs import client as gcs_client

    try:
        raw = gcs_client().bucket(BUCKET).blob(f"{PREFIX}/sax/test/state.json").download_as_bytes(timeout=5)
    except (exceptions.NotFound, requests.RequestException, exceptions.GoogleAPIError):
        return None
    return [m["model_id"] for m in json.loads(raw)["models"]]


def _stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def test_blob_store_outage(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator = GcsEmulator().start()
    admin = None
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        create_bucket(emulator.host, BUCKET)
        admin = AdminProcess(tmp_path, root=f"gs://{BUCKET}/{PREFIX}", db_url=pg_url,
                             env={"STORAGE_EMULATOR_HOST": emulator.host, "SAX_SNAPSHOT_WAIT": "2"}).start()
        models = []
        for name in ("a", "b"):
            assert publish(admin.url, f"/sax/test/{name}", 0).status_code == 201
            models.append(f"/sax/test/{name}")
        wait_until(lambda: _snapshot_models() == models, timeout=30, what="the first snapshot")
        lease = requests.get(f"{admin.url}/leader", timeout=5).json()

        emulator.stop()
        down = time.monotonic()
        slowest = 0.0
        for name in ("c", "d", "e"):
            t0 = time.monotonic()
            r = publish(admin.url, f"/sax/test/{name}", 0)
            slowest = max(slowest, time.monotonic() - t0)
            assert r.status_code == 201, r.text
            assert r.json()["snapshot"]["behind"] is True, r.json()  # the answer says so
            models.append(f"/sax/test/{name}")
        # Each waits for the snapshot SAX_SNAPSHOT_WAIT (2 s) at most, then answers.
        assert slowest < 2 + 3, f"a publish took {slowest:.1f}s with the blob store down"
        assert requests.get(f"{admin.url}/models", timeout=10).json()["models"] == models
        # The leader keeps trying (and failing) to write the snapshot, and keeps leading meanwhile.
        time.sleep(4)
        stats = _stats(admin.url)
        assert stats["snapshot_version"] < stats["version"]
        now = requests.get(f"{admin.url}/leader", timeout=5).json()
        assert now["valid"] and (now["holder"], now["epoch"]) == (lease["holder"], lease["epoch"]), \
            f"the leader lost its lease during the blob-store outage: {lease} -> {now}"
        assert publish(admin.url, "/sax/test/f", 0).status_code == 201
        models.append("/sax/test/f")
        record("blob store outage: slowest publish while it was down", slowest, "s")

        emulator.start()                  # same port; an empty emulator
        create_bucket(emulator.host, BUCKET)
        up = time.monotonic()
        wait_until(lambda: _snapshot_models() == models, timeout=60, interval=0.2,
                   what="the snapshot catching up with every model")
        caught_up = time.monotonic() - up
        wait_until(lambda: (lambda s: s["snapshot_version"] == s["version"])(_stats(admin.url)), timeout=10,
                   what="snapshot_version == version")
        record("blob store outage: outage length", up - down, "s")
        record("blob store outage: store back -> snapshot holds every model", caught_up, "s")
    finally:
        if admin is not None:
            admin.stop()
        emulator.stop()
