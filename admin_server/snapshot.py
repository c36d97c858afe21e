"""Snapshots of the published models in the blob store (`sax/<cell>/state.json`).

SQL is the authority; the snapshot is the disaster-recovery copy. The leader
writes it whenever the cell's version moves past the last snapshot, after
checking its epoch. A publish, update or unpublish is answered only once the
snapshot holds its version (`wait_for_snapshot`, bounded: while the blob store
is out the answer says the snapshot is behind instead), so no acknowledged
change is lost with the database. An admin that starts on an empty database,
or on one older than the snapshot (a restored dump), restores the published set
from it.
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
from common.naming import DEFAULT_IDLE_SECONDS
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
            PublishedModel.cell == cell, PublishedModel.state == ModelState.ACTIVE)
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


def versions(engine: Engine, cell: str) -> tuple[int, int]:
    """The cell's (version, snapshot_version)."""
    with engine.connect() as conn:
        row = conn.execute(select(CellState.version, CellState.snapshot_version)
                           .where(CellState.cell == cell)).first()
    return (row.version, row.snapshot_version) if row else (0, 0)


def wait_for_snapshot(engine: Engine, cell: str, version: int, timeout_s: float,
                      leader: Any = None, poll_s: float = 0.05) -> dict[str, Any]:
    """Waits (at most `timeout_s`) until the snapshot holds `version`, which a change just
    committed; `leader` (this process's LeaderLoop) is asked to write it now if it leads, and
    ends the wait early when its last snapshot failed and its next try is past the deadline.
    Returns what the answer tells the caller: {"version", "snapshot_version", "behind"}."""
    deadline = time.monotonic() + timeout_s
    if leader is not None:
        leader.snapshot_soon()
    while True:
        _, written = versions(engine, cell)
        if written >= version:
            return {"version": version, "snapshot_version": written, "behind": False}
        if time.monotonic() >= deadline or (leader is not None and leader.snapshot_failing_past(deadline)):
            log.warning("answering a change at version %d before the snapshot holds it (snapshot at %d): "
                        "the blob store is unreachable or no admin leads", version, written)
            return {"version": version, "snapshot_version": written, "behind": True}
        time.sleep(poll_s)


def _restore_rows(cell: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model_id": m["model_id"], "cell": cell, "model_path": m["model_path"],
             "checkpoint": m.get("checkpoint"), "requested_replicas": m["replicas"],
             "min_replicas": m.get("min_replicas", m["replicas"]),
             "max_replicas": m.get("max_replicas", m["replicas"]),
             "idle_seconds": m.get("idle_seconds", DEFAULT_IDLE_SECONDS),
             "target_replicas": m["replicas"],
             "overrides": m.get("overrides") or {}, "uuid": m["uuid"],
             "generation": m.get("generation", 1), "state": ModelState.ACTIVE,
             "failures": 0} for m in doc.get("models", [])]


def _catch_up(engine: Engine, store: BlobStore, cell: str, doc: dict[str, Any]) -> int:
    """The database is older than the snapshot (a dump restored after the snapshot was
    written): the published set becomes the snapshot's. Models the snapshot does not hold are
    unpublished (the reconciler unloads them); models it holds are inserted or brought to
    their snapshot values. Returns the number of models the snapshot holds."""
    rows = {r["model_id"]: r for r in _restore_rows(cell, doc)}
    version = int(doc.get("version", 0))
    with engine.begin() as conn:
        cs = conn.execute(select(CellState.version).where(CellState.cell == cell).with_for_update()).first()
        if cs is None or cs.version >= version:
            return 0  # another process caught up first
        present = {m.model_id: m for m in conn.execute(
            select(PublishedModel).where(PublishedModel.cell == cell)).all()}
        for model_id, m in present.items():
            if model_id not in rows and m.state == ModelState.ACTIVE:
                conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id)
                             .values(state=ModelState.UNPUBLISHING))
        for model_id, row in rows.items():
            if model_id in present:  # brought to the snapshot's publication (uuid, generation, ...)
                conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id)
                             .values(**{k: v for k, v in row.items() if k != "model_id"}))
            else:
                conn.execute(insert(PublishedModel), [row])
        conn.execute(update(CellState).where(CellState.cell == cell).values(
            version=version, snapshot_version=version, restored_from=f"{store.url}/{snapshot_path(cell)}"))
    log.warning("the database (version %d) was older than the snapshot (version %d): restored the %d "
                "published models of /sax/%s from %s", cs.version, version, len(rows), cell, store.url)
    return len(rows)


def ensure_cell(engine: Engine, store: BlobStore, cell: str) -> int:
    """Creates the cell's row on first start; on an empty database, or one older than the
    snapshot, restores published models from the snapshot. Returns the number restored."""
    with engine.connect() as conn:
        known = conn.execute(select(CellState.version).where(CellState.cell == cell)).first()
    raw = store.read(snapshot_path(cell))  # outside the transaction: may be slow
    doc = json.loads(raw) if raw else None
    if known is not None:
        if doc and int(doc.get("version", 0)) > known.version:
            return _catch_up(engine, store, cell, doc)
        return 0
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
                rows = _restore_rows(cell, doc)
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
