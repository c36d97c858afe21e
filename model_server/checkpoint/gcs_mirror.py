"""Checkpoints on GCS: mirrored into a local cache directory before loading, and uploaded.

The mirror is resumable: files whose size (and CRC32C, when this cache fetched them) already
match are skipped, and a ``.partial`` left by an interrupted download is continued. The client
comes from `common.gcs`, the helper the admin's blob store uses too.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from common import gcs
from model_server.checkpoint.errors import CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV = "SAX_CHECKPOINT_CACHE"
MANIFEST = ".saxplane-download.json"  # name -> crc32c of what was downloaded
#: Bytes per ranged GET of a checkpoint file: the grain of progress lines and of resumption.
DOWNLOAD_CHUNK = 64 << 20
#: Seconds between a file's progress lines (its last chunk is always reported).
PROGRESS_INTERVAL_S = 5.0


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b'); CheckpointError for a malformed URI."""
    try:
        return gcs.split_url(uri)
    except ValueError as e:
        raise CheckpointError(f"bad GCS path {uri!r}: {e}") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saxplane" / "checkpoints")


_download_locks: dict[Path, threading.Lock] = {}
_download_locks_guard = threading.Lock()


def download_gcs_dir(uri: str, dest: str | os.PathLike | None = None, *, client: Any = None) -> Path:
    """Mirror every object under `uri` into `dest` (default: the cache dir); returns `dest`.

    Files already present with the right size (and CRC32C, when this cache fetched them) are
    skipped; a ``.partial`` file left by an interrupted download is continued from its size;
    each file is fetched in ranged chunks, logging its progress, and checked against the
    object's CRC32C. Concurrent calls for one `dest` in this process are serialised.
    """
    bucket_name, prefix = split_gcs(uri)
    dest = Path(dest) if dest is not None else default_cache_dir() / bucket_name / prefix
    with _download_locks_guard:
        lock = _download_locks.setdefault(dest.absolute(), threading.Lock())
    with lock:
        return _download_gcs_dir(uri, bucket_name, prefix, dest, client)


def _download_gcs_dir(uri: str, bucket_name: str, prefix: str, dest: Path, client: Any) -> Path:
    client = client or gcs.client()
    try:
        blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix + "/" if prefix else None)
                 if not b.name.endswith("/")]
    except Exception as e:  # NotFound, Forbidden, connection errors
        raise CheckpointError(f"cannot list {uri}: {e}") from e
    if not blobs:
        raise CheckpointError(f"no checkpoint at {uri}: no objects under that prefix")
    total = sum(b.size or 0 for b in blobs)
    log.info("checkpoint %s: %d files, %.1f MB -> %s", uri, len(blobs), total / 1e6, dest)
    done_bytes, skipped, t0 = 0, 0, time.monotonic()
    manifest_path = dest / MANIFEST
    manifest = _read_manifest(manifest_path)
    for i, blob in enumerate(blobs, 1):
        rel = blob.name[len(prefix) + 1:] if prefix else blob.name
        target = dest / rel
        known = manifest.get(rel)
        if target.is_file() and target.stat().st_size == blob.size and (
                known is None or known == blob.crc32c):
            skipped += 1
            done_bytes += blob.size or 0
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_blob(blob, target, _Progress(f"checkpoint {uri}: [{i}/{len(blobs)}] {rel}",
                                               done_bytes, total))
        manifest[rel] = blob.crc32c
        manifest_path.write_text(json.dumps(manifest))
        done_bytes += blob.size or 0
    log.info("checkpoint %s: downloaded in %.1fs (%d files already present)", uri,
             time.monotonic() - t0, skipped)
    return dest


class _Progress:
    """Logs a download's progress: the file's bytes and the whole checkpoint's, throttled."""

    def __init__(self, what: str, before: int, total: int):
        self.what, self.before, self.total = what, before, total
        self.t0 = self.last = time.monotonic()

    def __call__(self, have: int, size: int) -> None:
        now = time.monotonic()
        if have < size and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        log.info("%s: %.1f/%.1f MB (checkpoint %.1f/%.1f MB, %.1f MB/s)", self.what, have / 1e6,
                 size / 1e6, (self.before + have) / 1e6, self.total / 1e6,
                 have / 1e6 / max(now - self.t0, 1e-6))


def _read_manifest(path: Path) -> dict[str, Optional[str]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _crc32c(path: Path) -> str:
    """Base64 of the big-endian CRC32C of a file, as GCS reports an object's."""
    import base64

    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def _download_blob(blob: Any, target: Path, progress: _Progress) -> None:
    """Fetch `blob` into `target` in ranged chunks through ``target.partial``.

    A ``.partial`` left by an interrupted download is continued from its size; the whole file
    is then checked against the object's CRC32C, and fetched once more from the start if it
    does not match (e.g. the object changed while it was half downloaded).
    """
    partial = target.with_name(target.name + ".partial")
    size = blob.size or 0
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        have = 0
    try:
        for attempt in (1, 2):
            if have:
                log.info("gs://%s/%s: continuing from byte %d of %d", blob.bucket.name, blob.name,
                         have, size)
            with open(partial, "ab" if have else "wb") as f:
                while have < size:
                    blob.download_to_file(f, start=have, end=min(have + DOWNLOAD_CHUNK, size) - 1,
                                          raw_download=True)
                    if f.tell() <= have:
                        raise CheckpointError(f"download of gs://{blob.bucket.name}/{blob.name} "
                                              f"stopped at byte {have} of {size}")
                    have = f.tell()
                    progress(have, size)
            if partial.stat().st_size == size and (blob.crc32c is None or _crc32c(partial) == blob.crc32c):
                break
            log.warning("gs://%s/%s: the downloaded file does not match the object's CRC32C%s",
                        blob.bucket.name, blob.name, "; fetching it again" if attempt == 1 else "")
            have = 0
        else:
            raise CheckpointError(f"download of gs://{blob.bucket.name}/{blob.name} does not match "
                                  f"the object's CRC32C twice")
        os.replace(partial, target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot download gs://{blob.bucket.name}/{blob.name}: {e}") from e


def upload_dir_to_gcs(local: str | os.PathLike, uri: str, *, client: Any = None) -> None:
    bucket_name, prefix = split_gcs(uri)
    client = client or gcs.client()
    bucket = client.bucket(bucket_name)
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = gcs.join(prefix, path.relative_to(root).as_posix())
        bucket.blob(name).upload_from_filename(str(path))
        log.info("uploaded gs://%s/%s", bucket_name, name)


def resolve_local(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory holding the checkpoint (downloading gs:// paths first)."""
    if gcs.is_gcs(path):
        dest = None
        if cache_dir is not None:
            bucket, prefix = split_gcs(str(path))
            dest = Path(cache_dir) / bucket / prefix
        return download_gcs_dir(str(path), dest)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    return p
