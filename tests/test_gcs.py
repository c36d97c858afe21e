"""common/gcs.py: the one GCS client helper (checkpoints and the admin's blob store use it)."""
from __future__ import annotations

import pytest

from common import gcs


def test_split_url_and_join():
    assert gcs.split_url("gs://bucket/a/b/") == ("bucket", "a/b")
    assert gcs.split_url("gs://bucket") == ("bucket", "")
    assert gcs.join("a/b", "x.json") == "a/b/x.json" and gcs.join("", "x.json") == "x.json"
    assert gcs.is_gcs("gs://b/p") and not gcs.is_gcs("/local/gs://b")
    with pytest.raises(ValueError, match="not a gs:// URL"):
        gcs.split_url("s3://bucket/a")
    with pytest.raises(ValueError, match="without a bucket"):
        gcs.split_url("gs:///a")


def test_checkpoint_errors_for_bad_gcs_paths():
    from model_server.checkpoint import CheckpointError, split_gcs

    with pytest.raises(CheckpointError, match="bad GCS path 'gs:///x'"):
        split_gcs("gs:///x")


def test_one_client_against_the_emulator(gcs_bucket, tmp_path):
    """The client the blob store and the checkpoint mirror use reaches the emulator anonymously."""
    from admin_server.blobstore import open_blobstore
    from model_server.checkpoint import download_gcs_dir

    store = open_blobstore(f"gs://{gcs_bucket}/root")
    store.write("sax/test/state.json", b"{}")
    assert gcs.client().bucket(gcs_bucket).blob("root/sax/test/state.json").download_as_bytes() == b"{}"
    assert (download_gcs_dir(f"gs://{gcs_bucket}/root/sax", tmp_path) / "test" / "state.json").read_bytes() == b"{}"
