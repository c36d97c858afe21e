"""Cell state operations behind the admin API: publish, update, list, locate.

Each function runs in the caller's session/transaction; a mutation of the
published set also bumps the cell's version so the leader snapshots it.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from admin_server import adapter_placement
from admin_server.adapter_placement import ADAPTER_PATH
from admin_server.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound
from common.naming import (InvalidArgument, check_checkpoint, check_model_path, check_replicas, check_scaling,
                           parse_model_id)
from common.overrides import check_overrides
from admin_server.schema import (CellState, ModelServer, ModelState, Observed, PublishedModel,
                                 Replica, Wanted)
from admin_server.settings import AdminSettings


def bump_version(session: Session, cell: str) -> None:
    session.execute(update(CellState).where(CellState.cell == cell)
                    .values(version=CellState.version + 1))


def cell_version(session: Session, cell: str) -> int:
    """The cell's version as this transaction sees it (after its own bump)."""
    return session.scalar(select(CellState.version).where(CellState.cell == cell)) or 0


def _check_in_cell(settings: AdminSettings, model_id: Any) -> str:
    mid = parse_model_id(model_id)
    if mid.cell != settings.cell_name:
        raise InvalidArgument(f"model {model_id} is not in this admin's cell {settings.cell}")
    return str(mid)


def _get_active(session: Session, model_id: str, *, lock: bool = False) -> PublishedModel:
    stmt = select(PublishedModel).where(PublishedModel.model_id == model_id)
    model = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if model is None or model.state != ModelState.ACTIVE:
        raise NotFound(f"model {model_id} is not published")
    return model


def publish(session: Session, settings: AdminSettings, body: dict[str, Any]) -> PublishedModel:
    model_id = _check_in_cell(settings, body.get("model_id"))
    model_path = check_model_path(body.get("model_path"))
    checkpoint = check_checkpoint(body.get("checkpoint"), settings.checkpoint_roots)
    replicas = check_replicas(body.get("replicas", body.get("num_replicas")), settings.max_replicas)
    overrides = check_overrides(body.get("overrides"))
    lo, hi, idle = check_scaling(replicas, body.get("min_replicas"), body.get("max_replicas"),
                                 body.get("idle_seconds"), settings.max_replicas)
    _check_adapter(session, model_id, model_path, overrides)
    existing = session.get(PublishedModel, model_id, with_for_update=True)
    if existing is not None:
        if existing.state == ModelState.UNPUBLISHING:
            raise Conflict(f"model {model_id} is being unpublished; retry later")
        raise AlreadyExists(f"model {model_id} is already published")
    model = PublishedModel(
        model_id=model_id, cell=settings.cell_name, model_path=model_path, checkpoint=checkpoint,
        requested_replicas=replicas, min_replicas=lo, max_replicas=hi, idle_seconds=idle,
        target_replicas=replicas, scale_reason=f"published with {replicas} replicas", scaled_at=time.time(),
        overrides=overrides, uuid=str(uuid.uuid4()), generation=1,
        state=ModelState.ACTIVE, failures=0)
    session.add(model)
    bump_version(session, settings.cell_name)
    session.flush()
    return model




def _check_adapter(session: Session, model_id: str, model_path: str, overrides: dict[str, Any]) -> None:
    """An adapter (lm.lora) names a published base model that is not an adapter; only adapters
    name a base."""
    base_id = overrides.get("base")
    if model_path != ADAPTER_PATH:
        if base_id is not None:
            raise InvalidArgument(f"override base is only for {ADAPTER_PATH} adapters")
        return
    if base_id is None:
        raise InvalidArgument(f"{ADAPTER_PATH} needs the override base: the model id of a published base model")
    if base_id == model_id:
        raise InvalidArgument("an adapter cannot be its own base")
    base = session.get(PublishedModel, base_id)
    if base is None or base.state != ModelState.ACTIVE:
        raise InvalidArgument(f"base model {base_id} is not published")
    if base.model_path == ADAPTER_PATH:
        raise InvalidArgument(f"base model {base_id} is itself an adapter")
    if not (base.overrides or {}).get("max_loras"):
        raise InvalidArgument(f"base model {base_id} was published without LoRA adapters "
                              f"(publish it with the override max_loras)")


def adapter_models(session: Session, base_id: str, *, lock: bool = False) -> list[PublishedModel]:
    """The published adapters whose base is `base_id`."""
    stmt = select(PublishedModel).where(PublishedModel.model_path == ADAPTER_PATH,
                                        PublishedModel.state == ModelState.ACTIVE)
    rows = session.scalars(stmt.with_for_update() if lock else stmt)
    return sorted((m for m in rows if (m.overrides or {}).get("base") == base_id), key=lambda m: m.model_id)


def adapters_of(session: Session, base_id: str) -> list[str]:
    return [m.model_id for m in adapter_models(session, base_id)]


def _base_replicas(session: Session, model: PublishedModel) -> tuple[int, dict[str, int]]:
    """A base's effective replica count (adapter_placement.base_replicas) and its adapters'
    targets; (its own target, {}) for a model without adapters."""
    ads = adapter_models(session, model.model_id) if (model.overrides or {}).get("max_loras") else []
    if not ads:
        return model.target_replicas, {}
    base_servers = set(session.scalars(select(Replica.server_address).where(
        Replica.model_id == model.model_id, Replica.generation == model.generation,
        Replica.wanted == Wanted.LOADED)))
    holding = set(session.scalars(select(Replica.server_address).where(
        Replica.model_id.in_([a.model_id for a in ads]), Replica.wanted == Wanted.LOADED)))
    targets = {a.model_id: a.target_replicas for a in ads}
    return adapter_placement.base_replicas(model.target_replicas, list(targets.values()),
                                           len(holding & base_servers)), targets


def unpublish(session: Session, settings: AdminSettings, model_id: Any) -> None:
    model = _get_active(session, _check_in_cell(settings, model_id), lock=True)
    needed = adapters_of(session, model.model_id)
    if needed:
        raise FailedPrecondition(f"model {model.model_id} is the base of the published adapter(s) "
                       f"{', '.join(needed)}: unpublish them first")
    model.state = ModelState.UNPUBLISHING
    session.execute(update(Replica).where(Replica.model_id == model.model_id)
                    .values(wanted=Wanted.UNLOADED, updated_at=time.time()))
    holders = select(Replica.server_address).where(Replica.model_id == model.model_id)
    session.execute(update(ModelServer).where(ModelServer.address.in_(holders))
                    .values(assignment_version=ModelServer.assignment_version + 1))
    bump_version(session, settings.cell_name)


def update_model(session: Session, settings: AdminSettings, model_id: Any,
                 body: dict[str, Any]) -> PublishedModel:
    """Changes checkpoint and/or replicas. A new checkpoint starts a new generation
    (new replicas load before old ones unload); a replicas-only change reloads nothing."""
    model = _get_active(session, _check_in_cell(settings, model_id), lock=True)
    if body.get("model_path") not in (None, model.model_path):
        raise InvalidArgument(
            f"update cannot change model_path ({model.model_path} -> {body['model_path']}); "
            "unpublish and publish instead")
    if "overrides" in body and check_overrides(body["overrides"]) != model.overrides:
        raise InvalidArgument("update cannot change overrides; unpublish and publish instead")
    changed = False
    if "checkpoint" in body:
        checkpoint = check_checkpoint(body["checkpoint"], settings.checkpoint_roots)
        if checkpoint != model.checkpoint:
            model.checkpoint = checkpoint
            model.generation += 1
            model.failures, model.retry_after, model.last_error = 0, None, None
            # Its adapters reload over the new base (their old replicas serve until then).
            for adapter in adapter_models(session, model.model_id, lock=True):
                adapter.generation += 1
            changed = True
    replicas = model.requested_replicas
    if body.get("replicas", body.get("num_replicas")) is not None:
        replicas = check_replicas(body.get("replicas", body.get("num_replicas")), settings.max_replicas)
    # A bound not given keeps its value, or follows `replicas` where it was equal to it.
    lo = body.get("min_replicas", replicas if model.min_replicas == model.requested_replicas
                  else min(model.min_replicas, replicas))
    hi = body.get("max_replicas", replicas if model.max_replicas == model.requested_replicas
                  else max(model.max_replicas, replicas))
    lo, hi, idle = check_scaling(replicas, lo, hi, body.get("idle_seconds", model.idle_seconds),
                                 settings.max_replicas)
    if (replicas, lo, hi, idle) != (model.requested_replicas, model.min_replicas, model.max_replicas,
                                    model.idle_seconds):
        target = replicas if replicas != model.requested_replicas else min(max(model.target_replicas, lo), hi)
        if target != model.target_replicas:
            model.scale_reason = f"updated to {replicas} replicas ({lo}..{hi})"
            model.scaled_at = time.time()
        model.requested_replicas, model.min_replicas, model.max_replicas = replicas, lo, hi
        model.idle_seconds, model.target_replicas = idle, target
        model.busy_since = model.calm_since = None
        changed = True
    if changed:
        bump_version(session, settings.cell_name)
    session.flush()
    return model


def replica_status(r: Replica, now: float) -> str:
    """What a user sees for a replica: a failed one stays FAILED while it backs off."""
    if r.wanted == Wanted.UNLOADED and r.observed == Observed.NONE:
        return Observed.FAILED if r.retry_after and r.retry_after > now else Wanted.UNLOADED
    if r.wanted == Wanted.UNLOADED and r.observed == Observed.LOADED:
        return Observed.UNLOADING
    return r.observed


def model_detail(session: Session, settings: AdminSettings, model: PublishedModel) -> dict[str, Any]:
    now = time.time()
    alive_after = now - settings.dead_after_s
    rows = session.execute(
        select(Replica, ModelServer.last_heartbeat)
        .join(ModelServer, ModelServer.address == Replica.server_address)
        .where(Replica.model_id == model.model_id)
        .order_by(Replica.generation.desc(), Replica.server_address)).all()
    replicas = [{
        "address": r.server_address, "status": replica_status(r, now),
        "wanted": r.wanted, "generation": r.generation, "checkpoint": r.checkpoint,
        "error": r.error, "load_time_s": r.load_time_s, "memory_bytes": r.memory_bytes,
        "server_alive": hb >= alive_after,
    } for r, hb in rows]
    active = sum(1 for r, hb in rows if _routable(r) and hb >= alive_after)
    effective, adapter_targets = _base_replicas(session, model)
    extra = {}
    if adapter_targets:
        extra["adapters"] = adapter_targets
        if effective > model.target_replicas:
            extra["replicas_reason"] = adapter_placement.adapters_note(model.target_replicas, effective,
                                                                       adapter_targets)
    return {
        "model_id": model.model_id, "model_path": model.model_path,
        "checkpoint": model.checkpoint if model.checkpoint is not None else "None",
        "max_replicas": model.max_replicas, "active_replicas": active,
        "min_replicas": model.min_replicas, "requested_replicas": model.requested_replicas,
        "target_replicas": model.target_replicas, "effective_replicas": effective,
        "idle_seconds": model.idle_seconds, **extra,
        "state": serving_state(effective, active), "reason": model.placement_note or model.last_error,
        "last_scale": {"reason": model.scale_reason, "at": model.scaled_at},
        "overrides": model.overrides, "uuid": model.uuid, "generation": model.generation,
        "last_error": model.last_error, "replicas": replicas,
    }


def serving_state(wanted: int, active: int) -> str:
    """IDLE (scaled to zero: the next call loads it), LOADING (wanted, none ready yet),
    DEGRADED (fewer ready than wanted) or READY; `wanted`: the effective replica count."""
    if active == 0:
        return "IDLE" if wanted == 0 else "LOADING"
    return "READY" if active >= wanted else "DEGRADED"


def _routable(r: Replica) -> bool:
    return r.wanted == Wanted.LOADED and r.observed == Observed.LOADED


def get_detail(session: Session, settings: AdminSettings, model_id: Any) -> dict[str, Any]:
    return model_detail(session, settings, _get_active(session, _check_in_cell(settings, model_id)))


def list_models(session: Session, settings: AdminSettings, cell: str) -> list[PublishedModel]:
    return list(session.scalars(
        select(PublishedModel).where(PublishedModel.cell == cell,
                                     PublishedModel.state == ModelState.ACTIVE)
        .order_by(PublishedModel.model_id)))


def list_servers(session: Session, settings: AdminSettings) -> list[dict[str, Any]]:
    now = time.time()
    servers = session.scalars(select(ModelServer).where(ModelServer.cell == settings.cell_name)
                              .order_by(ModelServer.address)).all()
    replicas = session.execute(select(Replica.server_address, Replica.model_id, Replica.generation,
                                      Replica.wanted, Replica.observed, Replica.retry_after,
                                      Replica.error, Replica.memory_bytes, Replica.running,
                                      Replica.waiting, PublishedModel.overrides,
                                      PublishedModel.memory_bytes.label("model_memory"))
                               .join(PublishedModel, PublishedModel.model_id == Replica.model_id)).all()
    by_server: dict[str, list[dict[str, Any]]] = {}
    used: dict[str, int] = {}
    for r in replicas:
        # What the placement charges the server: a replica holds memory from the moment it is
        # wanted until its server reports it gone.
        charged = r.wanted == Wanted.LOADED or r.observed != Observed.NONE
        need = max(int((r.overrides or {}).get("ram") or r.model_memory or 0), r.memory_bytes or 0)
        used[r.server_address] = used.get(r.server_address, 0) + (need if charged else 0)
        by_server.setdefault(r.server_address, []).append(
            {"model_id": r.model_id, "generation": r.generation,
             "status": replica_status(r, now),  # type: ignore[arg-type]
             "memory_bytes": need if charged else 0, "running": r.running, "waiting": r.waiting})
    return [{
        "address": s.address, "chip": s.chip, "topology": s.topology,
        "device_count": s.device_count, "memory_bytes": s.memory_bytes, "tags": s.tags,
        "servable_model_paths": s.servable_model_paths, "used_memory_bytes": used.get(s.address, 0),
        "last_heartbeat_age_s": round(now - s.last_heartbeat, 3),
        "alive": now - s.last_heartbeat <= settings.dead_after_s,
        "models": by_server.get(s.address, []),
    } for s in servers]


def stats(session: Session, settings: AdminSettings) -> dict[str, Any]:
    cell = settings.cell_name
    n_models = session.scalar(select(func.count()).select_from(PublishedModel).where(
        PublishedModel.cell == cell, PublishedModel.state == ModelState.ACTIVE))
    n_servers = session.scalar(select(func.count()).select_from(ModelServer).where(
        ModelServer.cell == cell))
    by_status = dict(session.execute(select(Replica.observed, func.count())
                                     .group_by(Replica.observed)).all())
    cs = session.get(CellState, cell)
    return {"cell": settings.cell, "models": n_models, "servers": n_servers,
            "replicas_by_observed_status": by_status,
            "version": cs.version if cs else 0,
            "snapshot_version": cs.snapshot_version if cs else 0}


# Placement notes that no waiting mends (a server that can serve the path must join first).
HOPELESS = ("no live server can serve", "no live server serving")


def note_demand(session: Session, settings: AdminSettings, model_id: Any) -> str | None:
    """A data call found no ready replica: the leader loads one (see scaling.autoscale).
    Returns why waiting for one is pointless (max_replicas 0, no server can serve it, its
    loads failed since it last served), or None."""
    model = _get_active(session, _check_in_cell(settings, model_id))
    if model.max_replicas == 0:
        return f"model {model.model_id} is published with max_replicas 0"
    if model.placement_note and model.placement_note.startswith(HOPELESS):
        return f"model {model.model_id} cannot be placed: {model.placement_note}"
    if model.failures:  # failed since it last served: callers hear why now, the leader retries
        return f"model {model.model_id} failed to load: {model.last_error}"
    session.execute(update(PublishedModel).where(PublishedModel.model_id == model.model_id)
                    .values(demand_at=time.time()))
    return None


def locate(session: Session, settings: AdminSettings, model_id: Any) -> dict[str, Any]:
    """Addresses of the model's LOADED replicas on live servers, with a version to long-poll on."""
    model = _get_active(session, _check_in_cell(settings, model_id))
    alive_after = time.time() - settings.dead_after_s
    addresses = sorted(session.scalars(
        select(Replica.server_address)
        .join(ModelServer, ModelServer.address == Replica.server_address)
        .where(Replica.model_id == model.model_id, Replica.wanted == Wanted.LOADED,
               Replica.observed == Observed.LOADED,
               ModelServer.last_heartbeat >= alive_after)).unique())
    digest = hashlib.sha1("\n".join([model.uuid, *addresses]).encode()).hexdigest()[:16]
    return {"model_id": model.model_id, "addresses": addresses, "version": digest,
            "model_path": model.model_path, "overrides": model.overrides}
