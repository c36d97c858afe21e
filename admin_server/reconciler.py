"""The leader's reconciler: turns desired state (published models) and observed
state (heartbeats) into replica placements.

:func:`plan` is pure: it reads plain views of the tables and returns a
:class:`Plan`; :func:`reconcile` loads the views, plans, and applies the plan
in one transaction fenced by the leader's epoch.
"""
from __future__ import annotations

import heapq
import logging
import time
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from admin_server import adapter_placement as adapters
from admin_server import scaling
from admin_server.lease import fence
from admin_server.schema import (CellState, ModelServer, ModelState, Observed, PublishedModel,
                                 Replica, Wanted)
from admin_server.settings import AdminSettings
from admin_server.views import ModelView, Plan, ReplicaView, ServerView

log = logging.getLogger(__name__)


LOADED, UNLOADED = Wanted.LOADED, Wanted.UNLOADED
NONE, FAILED, OBS_LOADED = Observed.NONE, Observed.FAILED, Observed.LOADED


SERVER_BACKOFF_FACTOR = 4


def _backoff(settings: AdminSettings, failures: int) -> float:
    return min(settings.retry_backoff_s * (2 ** min(failures, 20)), settings.retry_backoff_max_s)


def _fits(server: ServerView, model: ModelView) -> bool:
    if model.model_path not in server.servable and "*" not in server.servable:
        return False
    chip = model.overrides.get("chip")
    if chip and server.chip not in (chip if isinstance(chip, list) else [chip]):
        return False
    return set(model.overrides.get("constraints") or []) <= set(server.tags)


def _pick(heap: list[tuple[int, str]], free: dict[str, int], count: int, need: int,
          exclude: set[str], avoid: set[str]) -> list[str]:
    """Takes up to `count` servers with the most free memory that fit `need`, skipping
    `exclude` and using `avoid` only as a last resort; charges `need` to those taken.
    Heap entries may be stale (memory taken by another kind of model): those are
    refreshed as they surface; stale values only overstate free memory."""
    chosen: list[str] = []
    fallback: list[str] = []
    popped: list[str] = []
    while heap and len(chosen) < count:
        neg, address = heapq.heappop(heap)
        if -neg != free[address]:
            heapq.heappush(heap, (-free[address], address))
            continue
        popped.append(address)
        if free[address] < need:
            break
        if address in exclude:
            continue
        (fallback if address in avoid else chosen).append(address)
    chosen += fallback[:count - len(chosen)]
    for address in chosen:
        free[address] -= need
    for address in popped:
        heapq.heappush(heap, (-free[address], address))
    return chosen


def plan(now: float, settings: AdminSettings, servers: list[ServerView], models: list[ModelView],
         replicas: list[ReplicaView], *, judge_liveness: bool = True) -> Plan:
    """`judge_liveness=False` (a leader's first heartbeat timeout) declares no server dead:
    servers that could not reach any admin for a while are back before they are judged."""
    p = Plan()
    alive_after = now - settings.dead_after_s if judge_liveness else float("-inf")
    live = {s.address: s for s in servers if s.last_heartbeat >= alive_after}
    p.dead_servers = [s.address for s in servers if s.address not in live]
    by_model = {m.model_id: m for m in models}

    # Replicas that still occupy (or will occupy) a live server, after this pass's changes.
    kept: list[ReplicaView] = []
    for r in replicas:
        if r.server not in live:
            continue  # goes with its server
        model = by_model[r.model_id]
        if r.wanted == LOADED and r.observed == FAILED:
            fails = p.model_failures.get(model.model_id, (model.failures, 0.0, ""))[0] + 1
            backoff = _backoff(settings, fails - 1)
            # The model waits one back-off, then goes elsewhere; this server stays
            # out of its candidates four times as long.
            server_retry_at = now + SERVER_BACKOFF_FACTOR * backoff
            p.failed.append((r.id, server_retry_at))
            p.model_failures[model.model_id] = (fails, now + backoff,
                                                f"{r.server}: {r.error or 'load failed'}")
            p.next_due = min(p.next_due or now + backoff, now + backoff)
            r.wanted, r.retry_after = UNLOADED, server_retry_at
        elif r.wanted == LOADED and model.state != ModelState.ACTIVE:
            p.unload.append(r.id)
            r.wanted = UNLOADED
        if r.wanted == UNLOADED and r.observed == NONE and not (r.retry_after and r.retry_after > now):
            p.delete.append(r.id)
            continue
        kept.append(r)

    free: dict[str, int] = {a: s.memory_bytes for a, s in live.items()}
    for r in kept:
        if r.wanted == LOADED or r.observed != NONE:
            free[r.server] -= max(by_model[r.model_id].need, r.memory_bytes or 0)
    # Per kind of model (path, chip, constraints): a max-heap of servers by free memory.
    heaps: dict[tuple[str, str, tuple[str, ...]], list[tuple[int, str]]] = {}

    holding: dict[str, list[ReplicaView]] = {}
    for r in kept:
        holding.setdefault(r.model_id, []).append(r)

    for model in models:
        if model.state != ModelState.ACTIVE and not holding.get(model.model_id):
            p.drop_models.append(model.model_id)

    active = [m for m in models if m.state == ModelState.ACTIVE]
    active.sort(key=lambda m: (-m.need, m.model_id))  # big models first: they are hardest to fit
    # Models with callers waiting and no server found (and the servers they may not use): evict for them.
    cold: list[tuple[ModelView, set[str]]] = []
    notes: dict[str, str | None] = {}
    for model in active:
        mine = holding.get(model.model_id, [])
        scaled = scaling.autoscale(now, settings, model, mine)
        if scaled is not None:
            p.scale[model.model_id] = scaled
            model.requested, model.busy_since, model.calm_since = (
                scaled.target, scaled.busy_since, scaled.calm_since)
            if scaled.reason:
                model.scaled_at = now
                log.info("scale %s to %d replicas: %s", model.model_id, scaled.target, scaled.reason)
        p.due(scaling.next_due(now, settings, model, mine))
    # What LoRA adapters ask of their bases (more replicas; some kept): after autoscaling.
    bases = adapters.needs(active, holding)
    keep = adapters.protected(bases, holding)
    for model in active:
        mine = holding.get(model.model_id, [])
        notes[model.model_id] = adapters.replicas_note(model, bases.get(model.model_id))
        wanted = [r for r in mine if r.wanted == LOADED]
        beside: set[str] | None = None  # an adapter's candidate servers: those with its base LOADED
        if model.model_path == adapters.ADAPTER_PATH:
            beside, stray = adapters.beside_base(model, by_model.get(adapters.base_of(model) or ""), holding)
            p.unload.extend(r.id for r in wanted if r.id in stray)
            wanted = [r for r in wanted if r.id not in stray]
        want = model.effective
        current = [r for r in wanted if r.generation == model.generation]
        old = [r for r in wanted if r.generation != model.generation]
        loaded_current = sum(1 for r in current if r.observed == OBS_LOADED)
        if loaded_current and model.failures:
            p.model_recovered.append(model.model_id)
        if loaded_current >= want:
            # Fully served: failed placements need no back-off record any more.
            p.delete.extend(r.id for r in mine if r.wanted == UNLOADED and r.observed == NONE)

        # Surplus current-generation replicas: drop those not yet serving first, then the least
        # loaded, least recently used (they drain before they unload).
        surplus = len(current) - want
        # (Base replicas holding wanted adapters are kept: `want` counts them.)
        for r in sorted(current, key=lambda r: (r.id in keep, r.observed == OBS_LOADED, r.running + r.waiting,
                                                scaling.last_used(r), r.id))[:max(surplus, 0)]:
            p.unload.append(r.id)
        # Old generations drain only as new replicas become ready (rolling update).
        keep_old = max(0, min(len(old), want - loaded_current))
        # An old base replica also stays while old adapter replicas on it are wanted.
        for r in sorted(old, key=lambda r: (r.observed == OBS_LOADED, r.id))[:len(old) - keep_old]:
            if r.id not in keep:
                p.unload.append(r.id)

        missing = want - len(current)
        if missing <= 0:
            continue
        if model.retry_after and model.retry_after > now:
            p.next_due = min(p.next_due or model.retry_after, model.retry_after)
            notes[model.model_id] = "backing off after a failed load (see last_error)"
            continue
        if model.model_id in p.model_failures:
            continue  # a replica just failed: back off before placing again
        blocked = {r.server for r in mine if r.retry_after and r.retry_after > now}
        for r in mine:
            if r.retry_after and r.retry_after > now:
                p.next_due = min(p.next_due or r.retry_after, r.retry_after)
        on_server = {r.server for r in mine if r.wanted == LOADED}
        # Not beside a replica of this generation, even one still draining (one row per server).
        exclude = blocked | {r.server for r in mine if r.generation == model.generation}
        if beside is not None:
            exclude |= set(live) - beside
            if not beside:
                notes[model.model_id] = f"waiting for a LOADED replica of its base {adapters.base_of(model)}"
                continue
        key = (model.model_path, repr(model.overrides.get("chip")),
               tuple(sorted(model.overrides.get("constraints") or [])))
        if key not in heaps:
            heaps[key] = [(-free[a], a) for a, s in live.items() if _fits(s, model)]
            heapq.heapify(heaps[key])
        chosen = _pick(heaps[key], free, missing, model.need, exclude, on_server)
        for address in chosen:
            p.add.append({"model_id": model.model_id, "server_address": address,
                          "generation": model.generation, "checkpoint": model.checkpoint})
        if len(chosen) < missing and beside is not None and not beside - exclude - set(chosen):
            notes[model.model_id] = (f"{len(current) + len(chosen)} of {want} placed: waiting for more "
                                     f"LOADED replicas of its base {adapters.base_of(model)}")
        elif len(chosen) < missing:
            notes[model.model_id] = scaling.unplaced_reason(
                model, list(live.values()), free, exclude | set(chosen), _fits)
        if len(chosen) < missing:
            placed = len(current) + len(chosen)
            if placed == 0 or placed < model.floor:
                cold.append((model, exclude | set(chosen)))
    if cold:
        scaling.evict(p, cold, list(live.values()), free, kept, by_model, notes, _fits, keep)
    p.notes = {m: n for m, n in notes.items() if n != by_model[m].placement_note}
    return p


def load_views(conn, cell: str) -> tuple[list[ServerView], list[ModelView], list[ReplicaView]]:  # type: ignore[no-untyped-def]
    servers = [ServerView(r.address, r.chip, r.memory_bytes, r.tags or [], r.servable_model_paths or [],
                          r.last_heartbeat)
               for r in conn.execute(select(
                   ModelServer.address, ModelServer.chip, ModelServer.memory_bytes, ModelServer.tags,
                   ModelServer.servable_model_paths, ModelServer.last_heartbeat)
                   .where(ModelServer.cell == cell))]
    models = [ModelView(r.model_id, r.model_path, r.checkpoint, r.generation, r.target_replicas,
                        r.overrides or {}, r.state, r.memory_bytes, r.failures, r.retry_after,
                        r.min_replicas, r.max_replicas, r.idle_seconds, r.busy_since, r.calm_since,
                        r.demand_at, r.scaled_at, r.placement_note)
              for r in conn.execute(select(
                  PublishedModel.model_id, PublishedModel.model_path, PublishedModel.checkpoint,
                  PublishedModel.generation, PublishedModel.target_replicas,
                  PublishedModel.overrides, PublishedModel.state, PublishedModel.memory_bytes,
                  PublishedModel.failures, PublishedModel.retry_after, PublishedModel.min_replicas,
                  PublishedModel.max_replicas, PublishedModel.idle_seconds, PublishedModel.busy_since,
                  PublishedModel.calm_since, PublishedModel.demand_at, PublishedModel.scaled_at,
                  PublishedModel.placement_note)
                  .where(PublishedModel.cell == cell))]
    model_ids = {m.model_id for m in models}
    replicas = [ReplicaView(r.id, r.model_id, r.server_address, r.generation, r.wanted, r.observed,
                            r.error, r.retry_after, r.memory_bytes, r.running, r.waiting,
                            r.last_used_at, r.created_at)
                for r in conn.execute(select(
                    Replica.id, Replica.model_id, Replica.server_address, Replica.generation,
                    Replica.wanted, Replica.observed, Replica.error, Replica.retry_after,
                    Replica.memory_bytes, Replica.running, Replica.waiting, Replica.last_used_at,
                    Replica.created_at))
                if r.model_id in model_ids]
    return servers, models, replicas


def touched_servers(p: Plan, replicas: list[ReplicaView]) -> set[str]:
    """Servers whose desired set this plan changes."""
    changed = set(p.unload) | set(p.delete) | {rid for rid, _ in p.failed}
    return {r.server for r in replicas if r.id in changed} | {a["server_address"] for a in p.add}


def apply(conn, p: Plan, now: float, touched: set[str] = frozenset()) -> None:  # type: ignore[no-untyped-def,assignment]
    if p.dead_servers:
        conn.execute(delete(Replica).where(Replica.server_address.in_(p.dead_servers)))
        conn.execute(delete(ModelServer).where(ModelServer.address.in_(p.dead_servers)))
    if p.delete:
        # Conditional: a heartbeat may have reported the replica again in between.
        conn.execute(delete(Replica).where(Replica.id.in_(p.delete), Replica.wanted == UNLOADED,
                                           Replica.observed == NONE))
    for rid, retry_at in p.failed:
        conn.execute(update(Replica).where(Replica.id == rid)
                     .values(wanted=UNLOADED, retry_after=retry_at, updated_at=now))
    for model_id, (fails, retry_at, error) in p.model_failures.items():
        conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id)
                     .values(failures=fails, retry_after=retry_at, last_error=error))
    if p.model_recovered:
        conn.execute(update(PublishedModel).where(PublishedModel.model_id.in_(p.model_recovered))
                     .values(failures=0, retry_after=None, last_error=None))
    if p.unload:
        conn.execute(update(Replica).where(Replica.id.in_(p.unload))
                     .values(wanted=UNLOADED, updated_at=now))
    if p.add:
        conn.execute(insert(Replica), [
            {**a, "wanted": LOADED, "observed": NONE, "created_at": now, "updated_at": now}
            for a in p.add])
    if touched:
        conn.execute(update(ModelServer).where(ModelServer.address.in_(sorted(touched)))
                     .values(assignment_version=ModelServer.assignment_version + 1))
    for model_id, scaled in p.scale.items():
        conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id)
                     .values(**scaled.columns(now)))
    for model_id, note in p.notes.items():
        conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id)
                     .values(placement_note=note))
    if p.drop_models:
        conn.execute(delete(Replica).where(Replica.model_id.in_(p.drop_models)))
        conn.execute(delete(PublishedModel).where(PublishedModel.model_id.in_(p.drop_models),
                                                  PublishedModel.state != ModelState.ACTIVE))


def fingerprint(conn, settings: AdminSettings, now: float) -> tuple[Any, ...]:  # type: ignore[no-untyped-def]
    """A cheap probe of everything that can make a reconcile pass act: the published
    set's version, the newest replica status (or load class) change, the newest call
    waiting for an idle model, the live and dead server counts,
    and the servers' descriptions (their digests). (No hot counter row for heartbeats
    to contend on.)"""
    version = conn.execute(select(CellState.version).where(CellState.cell == settings.cell_name)).scalar()
    descriptions = hash(tuple(conn.execute(
        select(ModelServer.desc_digest).where(ModelServer.cell == settings.cell_name)
        .order_by(ModelServer.address)).scalars()))
    newest = conn.execute(select(func.max(Replica.updated_at))).scalar()
    demand = conn.execute(select(func.max(PublishedModel.demand_at))
                          .where(PublishedModel.cell == settings.cell_name)).scalar()
    dead_before = now - settings.dead_after_s
    servers = conn.execute(select(func.count()).select_from(ModelServer).where(
        ModelServer.cell == settings.cell_name)).scalar_one()
    dead = conn.execute(select(func.count()).select_from(ModelServer).where(
        ModelServer.cell == settings.cell_name, ModelServer.last_heartbeat < dead_before)).scalar_one()
    return (version, newest, servers, dead, descriptions, demand)


class Reconciler:
    """Runs reconcile passes for the leader, skipping those that could not change anything.

    A pass runs when the probe (:func:`fingerprint`) moved, when a back-off ends,
    or at least every `full_pass_s` (a safety net: nothing is known to change unseen).
    """

    def __init__(self, engine: Engine, settings: AdminSettings, full_pass_s: float | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.full_pass_s = full_pass_s or max(60.0, 60 * settings.reconcile_interval_s)
        self._last: tuple[Any, ...] | None = None
        self._last_at = 0.0
        self._next_due: float | None = None
        self._epoch: int | None = None
        self._leader_since = 0.0
        self.passes = 0

    def run(self, lease_name: str, holder: str, epoch: int) -> Plan | None:
        """One pass as the leader at `epoch` (None if skipped). Raises LeaseLost if the lease moved."""
        now = time.time()
        if epoch != self._epoch:
            self._epoch, self._leader_since, self._last = epoch, now, None
        judge = now - self._leader_since >= self.settings.dead_after_s
        with self.engine.begin() as conn:
            fence(conn, lease_name, holder, epoch)
            probe = fingerprint(conn, self.settings, now) + (judge,)
            if (probe == self._last and now - self._last_at < self.full_pass_s
                    and not (self._next_due and now >= self._next_due)):
                return None
            servers, models, replicas = load_views(conn, self.settings.cell_name)
            p = plan(now, self.settings, servers, models, replicas, judge_liveness=judge)
            if not p.empty():
                apply(conn, p, now, touched_servers(p, replicas))
        self.passes += 1
        # After acting, the state moved under our own writes: look again next tick.
        self._last = None if not p.empty() else probe
        self._last_at = now
        self._next_due = p.next_due
        if not p.empty():
            log.info("reconcile: +%d replicas, -%d unloads, %d deleted, %d failed, dead servers %s",
                     len(p.add), len(p.unload), len(p.delete), len(p.failed), p.dead_servers)
        return p
