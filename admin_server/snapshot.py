"""Snapshots of the published models in the blob store (`sax/<cell>/state.json`).

SQL is the authority; the snapshot is the disaster-recovery copy. The leader
writes it whenever the cell's version moves past the last snapshot, after
checking its epoch; an admin that starts on an empty database restores from it.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from admin_server.blobstore import BlobStore, BlobStoreError
from admin_server.lease import LeaseLost, fence
from admin_server.naming import DEFAULT_IDLE_SECONDS
from admin_server.schema import CellState, ModelState, PublishedModel

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def snapshot_path(cell: str) -> str:
    return f"sax/{cell}/state.json"


def _model_record(m: Any) -> dict[str, Any]:
    return {"model_id": m.model_id, "model_path": m.model_path,
            "checkpoint": m.checkpoint, "replicas": m.requested_replicas,
            "min_replicas": m.min_replicas, "max_replicas": m.max_replicas, "idle_seconds": m.idle_seconds,
            "overrides": m.overrides or {}, "uuid": m.uuid, "generation": m.generation}


class SnapshotDeadline(BlobStoreError):
    """Not enough of the holder's lease left to write the snapshot safely."""


def write_snapshot(engine: Engine, store: BlobStore, cell: str, lease_name: str, holder: str,
                   epoch: int, *, deadline: float | None = None) -> bool:
    """Writes the snapshot if the cell changed since the last one. Returns True if written.

    No transaction is open during the blob-store calls (a slow or unreachable store must
    not hold the lease row, which the leader renews, nor a connection). The write is fenced
    instead: the epoch is checked right before it, it must be done by `deadline` (the
    end of this holder's lease on its own monotonic clock, a margin before anyone else
    may take the lease, so no new leader's snapshot can come in between), and
    `snapshot_version` moves in a fenced transaction after it."""
    def left() -> float | None:
        """A blob-store call's timeout: half the time left, since the library's retries stop at
        their timeout but the attempt then in flight may take as long again."""
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0.1:
            raise SnapshotDeadline("the lease ends before the snapshot could be written")
        return remaining / 2

    with engine.connect() as conn:
        cs = conn.execute(select(CellState.version, CellState.snapshot_version)
                          .where(CellState.cell == cell)).first()
        if cs is None or cs.version <= cs.snapshot_version:
            return False
        models = conn.execute(select(PublishedModel).where(
            PublishedModel.cell == cell, PublishedModel.state == ModelState.ACTIVE.value)
            .order_by(PublishedModel.model_id)).all()
        version = cs.version
    existing = store.read(snapshot_path(cell), timeout=left())
    if existing:
        prior = json.loads(existing)
        if prior.get("epoch", 0) > epoch:
            raise LeaseLost(f"snapshot was written at epoch {prior['epoch']} > ours ({epoch})")
    doc = {"format": FORMAT_VERSION, "cell": f"/sax/{cell}", "epoch": epoch, "version": version,
           "written_at": time.time(), "models": [_model_record(m) for m in models]}
    with engine.begin() as conn:
        fence(conn, lease_name, holder, epoch)  # still leader, right before writing
    store.write(snapshot_path(cell), json.dumps(doc, indent=1, sort_keys=True).encode(), timeout=left())
    with engine.begin() as conn:
        fence(conn, lease_name, holder, epoch)
        conn.execute(update(CellState).where(CellState.cell == cell, CellState.snapshot_version < version)
                     .values(snapshot_version=version))
    log.info("wrote snapshot of %d models (version %d, epoch %d) to %s/%s", len(models), version,
             epoch, store.url, snapshot_path(cell))
    return True


def ensure_cell(engine: Engine, store: BlobStore, cell: str) -> int:
    """Creates the cell's row on first start; on an empty database restores published
    models from the snapshot. Returns the number of models restored."""
    with engine.connect() as conn:
        if conn.execute(select(CellState.cell).where(CellState.cell == cell)).first():
            return 0
    raw = store.read(snapshot_path(cell))  # outside the transaction: may be slow
    doc = json.loads(raw) if raw else None
    try:
        with engine.begin() as conn:
            if conn.execute(select(CellState.cell).where(CellState.cell == cell)).first():
                return 0
            has_models = conn.execute(select(PublishedModel.model_id)
                                      .where(PublishedModel.cell == cell).limit(1)).first()
            restored = 0
            version = 0
            if doc and not has_models:
                version = int(doc.get("version", 0))
                rows = [{"model_id": m["model_id"], "cell": cell, "model_path": m["model_path"],
                         "checkpoint": m.get("checkpoint"), "requested_replicas": m["replicas"],
                         "min_replicas": m.get("min_replicas", m["replicas"]),
                         "max_replicas": m.get("max_replicas", m["replicas"]),
                         "idle_seconds": m.get("idle_seconds", DEFAULT_IDLE_SECONDS),
                         "target_replicas": m["replicas"],
                         "overrides": m.get("overrides") or {}, "uuid": m["uuid"],
                         "generation": m.get("generation", 1), "state": ModelState.ACTIVE.value,
                         "failures": 0} for m in doc.get("models", [])]
                if rows:
                    conn.execute(insert(PublishedModel), rows)
                restored = len(rows)
            conn.execute(insert(CellState).values(
                cell=cell, version=version, snapshot_version=version,
                restored_from=(f"{store.url}/{snapshot_path(cell)}" if restored else None)))
    except IntegrityError:
        return 0  # another process created the cell concurrently
    if restored:
        log.warning("restored %d published models of /sax/%s from %s", restored, cell, store.url)
    return restored
