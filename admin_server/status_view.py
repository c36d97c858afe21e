"""What the HTML status pages show, read from the cell's tables in one session.

Plain dicts for the templates (status_pages.py renders them); nothing here writes.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_server import state
from admin_server.errors import NotFound
from admin_server.schema import ModelServer, Observed, PublishedModel, Replica, Wanted
from admin_server.settings import AdminSettings

def wanted(detail: dict[str, Any]) -> int:
    """Replicas the model should have now: the autoscaler's target within [min, max], or more
    for a base whose LoRA adapters need them."""
    return int(detail.get("effective_replicas", detail.get("target_replicas", detail["max_replicas"])))


def _holds_memory(r: Replica) -> bool:
    """A replica the reconciler counts against its server's memory (reconciler.plan)."""
    return r.wanted == Wanted.LOADED or r.observed != Observed.NONE


def model_summary(detail: dict[str, Any]) -> str:
    """One word for a model's state: the admin's (IDLE, LOADING, DEGRADED, READY), or FAILED
    while no replica serves and a load failed."""
    state = detail.get("state") or ("READY" if detail["active_replicas"] >= wanted(detail) else "LOADING")
    failed = "FAILED" in [r["status"] for r in detail["replicas"]] or detail.get("last_error")
    if state == "LOADING" and failed:
        return "FAILED"
    return state


def _server_memory(session: Session) -> dict[str, int]:
    """Accelerator bytes held per server: each replica's own figure, else its model's."""
    used: dict[str, int] = {}
    rows = session.execute(select(Replica, PublishedModel.memory_bytes)
                           .join(PublishedModel, PublishedModel.model_id == Replica.model_id)).all()
    for r, model_bytes in rows:
        if _holds_memory(r):
            used[r.server_address] = used.get(r.server_address, 0) + max(r.memory_bytes or 0, model_bytes or 0)
    return used


def _with_memory(server: dict[str, Any], used: dict[str, int]) -> dict[str, Any]:
    total = server["memory_bytes"] or 0
    held = used.get(server["address"], 0)
    return {**server, "memory_used": held, "memory_free": max(total - held, 0),
            "memory_fraction": min(held / total, 1.0) if total else 0.0}


def cell_page(session: Session, settings: AdminSettings, lease: dict[str, Any] | None) -> dict[str, Any]:
    models = []
    for m in state.list_models(session, settings, settings.cell_name):
        detail = state.model_detail(session, settings, m)
        detail["summary"], detail["wanted"] = model_summary(detail), wanted(detail)
        models.append(detail)
    used = _server_memory(session)
    servers = [_with_memory(s, used) for s in state.list_servers(session, settings)]
    stats = state.stats(session, settings)
    return {"cell": settings.cell, "lease": lease, "models": models, "servers": servers,
            "version": stats["version"], "snapshot_version": stats["snapshot_version"]}


def _iso(value: float | datetime | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    elif value.tzinfo is None:  # SQLite hands back naive UTC datetimes
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def model_page(session: Session, settings: AdminSettings, model_id: str) -> dict[str, Any]:
    detail = state.get_detail(session, settings, model_id)
    detail["summary"] = model_summary(detail)
    detail["wanted"] = wanted(detail)
    model = session.get(PublishedModel, detail["model_id"])
    assert model is not None
    now = time.time()
    replicas = session.scalars(select(Replica).where(Replica.model_id == model.model_id)).all()
    # The model's recent changes: its own publish/update times and each replica's history,
    # newest first (the tables keep when a row appeared and when it last changed).
    changes: list[tuple[float, str]] = []
    created = model.created_at.replace(tzinfo=model.created_at.tzinfo or timezone.utc).timestamp()
    updated = model.updated_at.replace(tzinfo=model.updated_at.tzinfo or timezone.utc).timestamp()
    changes.append((created, f"published ({model.requested_replicas} replicas, generation 1)"))
    if updated - created > 1:
        changes.append((updated, f"last changed (generation {model.generation}, {model.requested_replicas} replicas wanted)"))
    for r in replicas:
        changes.append((r.created_at, f"replica on {r.server_address} (generation {r.generation}) assigned"))
        if r.updated_at - r.created_at > 0.001:
            status = state.replica_status(r, now)
            changes.append((r.updated_at, f"replica on {r.server_address} (generation {r.generation}) "
                                          f"is {status}" + (f": {r.error}" if r.error else "")))
    last_scale = detail.get("last_scale") or {}
    if last_scale.get("at"):
        changes.append((last_scale["at"], f"scaled to {detail['wanted']}: {last_scale.get('reason') or ''}"))
    changes.sort(key=lambda c: -c[0])
    detail["changes"] = [{"at": _iso(t), "what": what} for t, what in changes[:30]]
    detail["created_at"], detail["updated_at"] = _iso(model.created_at), _iso(model.updated_at)
    return detail


def server_page(session: Session, settings: AdminSettings, address: str) -> dict[str, Any]:
    server = session.get(ModelServer, address)
    if server is None or server.cell != settings.cell_name:
        raise NotFound(f"server {address} is not in this cell")
    (listed,) = [s for s in state.list_servers(session, settings) if s["address"] == address]
    now = time.time()
    rows = session.execute(select(Replica, PublishedModel.memory_bytes)
                           .join(PublishedModel, PublishedModel.model_id == Replica.model_id)
                           .where(Replica.server_address == address)
                           .order_by(Replica.model_id, Replica.generation.desc())).all()
    replicas = [{"model_id": r.model_id, "generation": r.generation, "status": state.replica_status(r, now),
                 "wanted": r.wanted, "checkpoint": r.checkpoint, "error": r.error,
                 "memory_bytes": max(r.memory_bytes or 0, mb or 0) if _holds_memory(r) else r.memory_bytes,
                 "load_time_s": r.load_time_s, "updated_at": _iso(r.updated_at)} for r, mb in rows]
    out = _with_memory(listed, _server_memory(session))
    out.update(replicas=replicas, first_seen=_iso(server.first_seen), last_heartbeat=_iso(server.last_heartbeat),
               boot_id=server.boot_id)
    return out
