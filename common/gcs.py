"""The one Google Cloud Storage client helper: checkpoints and the admin's blob store use it.

`client()` honours STORAGE_EMULATOR_HOST (anonymous credentials against an emulator, project
from GOOGLE_CLOUD_PROJECT or "saxplane"); `split_url` parses ``gs://bucket/prefix``.
google-cloud-storage is imported on first use, so importing this module costs nothing.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.cloud import storage

SCHEME = "gs://"


def is_gcs(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a GCS location (``gs://...``)."""
    return str(path).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """'gs://bucket/a/b/' -> ('bucket', 'a/b'); ValueError for anything else."""
    if not is_gcs(url):
        raise ValueError(f"not a gs:// URL: {url!r}")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URL without a bucket: {url!r}")
    return bucket, prefix.strip("/")


def join(prefix: str, name: str) -> str:
    """Object name `name` under `prefix` ('' for the bucket's root)."""
    return f"{prefix}/{name}" if prefix else name


def client() -> "storage.Client":
    """A storage client; anonymous when STORAGE_EMULATOR_HOST points at an emulator."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "saxplane"),
                              credentials=AnonymousCredentials())
    return storage.Client()
