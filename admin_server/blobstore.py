"""The blob store under SAX_ROOT: a local directory or a GCS bucket prefix.

One small interface (read/write/delete whole objects by relative path), so
the snapshot code never knows which one it has. GCS goes through
google-cloud-storage (`common.gcs`) and honours STORAGE_EMULATOR_HOST (anonymous
credentials against an emulator). `timeout` bounds one call, retries included
(a local directory has nothing to wait for and ignores it).
"""
from __future__ import annotations

import os
import tempfile
from typing import Protocol

from common import gcs


class BlobStoreError(RuntimeError):
    """The blob store could not be reached or refused an operation."""


class BlobStore(Protocol):
    url: str

    def read(self, path: str, *, timeout: float | None = None) -> bytes | None: ...

    def write(self, path: str, data: bytes, *, timeout: float | None = None) -> None: ...

    def delete(self, path: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _full(self, path: str) -> str:
        full = os.path.normpath(os.path.join(self.root, path))
        if not full.startswith(self.root + os.sep):
            raise BlobStoreError(f"path {path!r} escapes the blob store root")
        return full

    def read(self, path: str, *, timeout: float | None = None) -> bytes | None:
        try:
            with open(self._full(path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, *, timeout: float | None = None) -> None:
        full = self._full(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)  # atomic: readers see the old or the new file
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._full(path))
        except FileNotFoundError:
            pass


class GcsBlobStore:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.bucket_name, self.prefix = gcs.split_url(url)
        self.timeout_s = timeout_s
        self._bucket = gcs.client().bucket(self.bucket_name)

    def _limits(self, timeout: float | None) -> tuple[float, object]:
        """(per-request timeout, retry policy) for one call of at most `timeout` seconds."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        t = self.timeout_s if timeout is None else max(0.1, min(timeout, self.timeout_s))
        # The library retries for two minutes by default: bound its retries by our timeout.
        return t, DEFAULT_RETRY.with_timeout(t)

    def _blob(self, path: str):  # type: ignore[no-untyped-def]
        return self._bucket.blob(gcs.join(self.prefix, path))

    def read(self, path: str, *, timeout: float | None = None) -> bytes | None:
        from google.api_core import exceptions

        t, retry = self._limits(timeout)
        try:
            return self._blob(path).download_as_bytes(timeout=t, retry=retry)
        except exceptions.NotFound:
            return None
        except Exception as e:  # network errors, 5xx
            raise BlobStoreError(f"reading {self.url}/{path}: {e}") from e

    def write(self, path: str, data: bytes, *, timeout: float | None = None) -> None:
        t, retry = self._limits(timeout)
        try:
            self._blob(path).upload_from_string(data, content_type="application/json", timeout=t, retry=retry)
        except Exception as e:
            raise BlobStoreError(f"writing {self.url}/{path}: {e}") from e

    def delete(self, path: str) -> None:
        from google.api_core import exceptions

        t, retry = self._limits(None)
        try:
            self._blob(path).delete(timeout=t, retry=retry)
        except exceptions.NotFound:
            pass
        except Exception as e:
            raise BlobStoreError(f"deleting {self.url}/{path}: {e}") from e


def open_blobstore(root: str) -> BlobStore:
    return GcsBlobStore(root) if gcs.is_gcs(root) else LocalBlobStore(root)
