"""Both blob store implementations behave alike; GCS runs against gcp-storage-emulator."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from admin_server.blobstore import BlobStoreError, GcsBlobStore, LocalBlobStore, open_blobstore
from tests.cluster import create_bucket, gcs_emulator


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "local":
        return open_blobstore(str(tmp_path / "root"))
    bucket = request.getfixturevalue("gcs_bucket")
    return open_blobstore(f"gs://{bucket}/some/prefix")


def test_read_write_overwrite_delete(store) -> None:  # type: ignore[no-untyped-def]
    assert store.read("sax/test/state.json") is None
    store.write("sax/test/state.json", b'{"a": 1}')
    assert store.read("sax/test/state.json") == b'{"a": 1}'
    store.write("sax/test/state.json", b'{"a": 2}')
    assert store.read("sax/test/state.json") == b'{"a": 2}'
    store.delete("sax/test/state.json")
    store.delete("sax/test/state.json")  # idempotent
    assert store.read("sax/test/state.json") is None


def test_kinds_and_prefix(tmp_path: Path, gcs_bucket: str) -> None:
    assert isinstance(open_blobstore(str(tmp_path)), LocalBlobStore)
    gcs = open_blobstore(f"gs://{gcs_bucket}/p")
    assert isinstance(gcs, GcsBlobStore) and gcs.prefix == "p"
    gcs.write("x.json", b"1")
    from common.gcs import client as gcs_client
    assert gcs_client().bucket(gcs_bucket).blob("p/x.json").download_as_bytes() == b"1"


def test_local_store_refuses_escaping_paths(tmp_path: Path) -> None:
    with pytest.raises(BlobStoreError):
        LocalBlobStore(str(tmp_path)).write("../outside.json", b"x")


def test_gcs_outage_is_a_prompt_blobstore_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with gcs_emulator() as host:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        create_bucket(host, "outage")
        store = GcsBlobStore("gs://outage/x", timeout_s=2)
        store.write("a.json", b"1")
    started = time.monotonic()
    with pytest.raises(BlobStoreError):
        store.write("a.json", b"2")
    with pytest.raises(BlobStoreError):
        store.read("a.json")
    assert time.monotonic() - started < 15
