"""How many replicas a model wants now, whom to evict for a cold model, and why a wanted
replica has no server: the leader's pure decisions beside :func:`reconciler.plan`.

Autoscaling reads the load each server reports per replica (requests running and queued,
when it last served one). A model scales

* up by one when the requests queued per wanted replica (one still loading counts) stay
  above `scale_up_waiting` for `scale_up_window_s` (then the window starts again);
* down by one when the remaining replicas could carry the load (`scale_down_load` running
  plus queued requests each) for the model's `idle_seconds`; to zero (min_replicas 0)
  after `idle_seconds` without any request;
* from zero to one when a caller asks for it (`demand_at`, set by the admin's /demand).

Eviction: a model with callers waiting and no replica yet (or fewer than its minimum) that
fits on no server frees memory by unloading least-recently-used replicas of other models
above their `min_replicas` on one server that could then hold it; it is placed once the
server reports them gone, so memory is never overcommitted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from admin_server.schema import Observed, Wanted
from admin_server.settings import AdminSettings

if TYPE_CHECKING:
    from admin_server.views import ModelView, ReplicaView, ServerView

log = logging.getLogger("admin_server.reconciler")  # decisions log beside the passes that make them
LOADED, UNLOADED = Wanted.LOADED, Wanted.UNLOADED
NONE, OBS_LOADED = Observed.NONE, Observed.LOADED


@dataclass
class Scaled:
    """The model's new autoscaling columns (written when they differ from the stored ones)."""
    target: int
    busy_since: float | None
    calm_since: float | None
    reason: str | None = None   # set when the target moved

    def columns(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"target_replicas": self.target, "busy_since": self.busy_since,
                               "calm_since": self.calm_since}
        if self.reason:
            out.update(scale_reason=self.reason, scaled_at=now)
        return out


def last_used(r: "ReplicaView") -> float:
    """When the replica last served a request (its creation if it never did)."""
    return r.last_used_at or r.created_at


def autoscale(now: float, settings: AdminSettings, model: "ModelView",
              mine: list["ReplicaView"]) -> Scaled | None:
    """The model's target after this pass (None when nothing changes). `mine`: its replicas."""
    current = [r for r in mine if r.wanted == LOADED and r.generation == model.generation]
    ready = [r for r in current if r.observed == OBS_LOADED]
    target = min(max(model.requested, model.min_replicas), model.max_replicas)
    reason = None if target == model.requested else f"kept within {model.min_replicas}..{model.max_replicas}"
    busy_since, calm_since = model.busy_since, model.calm_since
    if target == 0 and model.max_replicas > 0 and model.demand_at and model.demand_at > (model.scaled_at or 0):
        target, reason = 1, "a call is waiting for a replica (load on demand)"
    queued = sum(r.waiting for r in ready)
    load = sum(r.running + r.waiting for r in ready)
    # Per wanted replica: one still loading counts as capacity on its way.
    busy = bool(ready) and queued / max(len(current), 1) > settings.scale_up_waiting
    if busy and target < model.max_replicas:
        busy_since = busy_since or now
        if now - busy_since >= settings.scale_up_window_s:
            reason = (f"{queued} requests queued on {len(ready)} ready replicas ({len(current)} wanted) for "
                      f"{now - busy_since:.0f}s (scale-up target {settings.scale_up_waiting:g} per replica)")
            target, busy_since = target + 1, None
    elif not busy:
        busy_since = None
    calm = (target > model.min_replicas and not busy and reason is None
            and load <= settings.scale_down_load * (target - 1))
    if calm:
        calm_since = calm_since or now
        used = max([last_used(r) for r in mine] + [model.demand_at or 0.0, model.scaled_at or 0.0])
        quiet_since = max(calm_since, used) if target == 1 else calm_since
        if now - quiet_since >= model.idle_seconds:
            reason = (f"no request for {now - quiet_since:.0f}s (idle_seconds {model.idle_seconds:g})"
                      if target == 1 else
                      f"load {load} fits on {target - 1} replicas for {now - quiet_since:.0f}s "
                      f"(idle_seconds {model.idle_seconds:g})")
            target, calm_since = target - 1, None
    else:
        calm_since = None
    if (target, busy_since, calm_since) == (model.requested, model.busy_since, model.calm_since):
        return None
    return Scaled(target, busy_since, calm_since, reason)


def next_due(now: float, settings: AdminSettings, model: "ModelView", mine: list["ReplicaView"]) -> float | None:
    """When a window of this model's ends (a pass must then look again, load unchanged or not)."""
    due = []
    if model.busy_since:
        due.append(model.busy_since + settings.scale_up_window_s)
    if model.calm_since:
        used = max([last_used(r) for r in mine] + [model.demand_at or 0.0, model.scaled_at or 0.0])
        due.append(max(model.calm_since, used if model.requested == 1 else 0.0) + model.idle_seconds)
    return min(due) if due else None


def evict(p: Any, cold: list[tuple["ModelView", set[str]]], live: list["ServerView"], free: dict[str, int],
          kept: list["ReplicaView"], by_model: dict[str, "ModelView"], notes: dict[str, str | None],
          fits: Any, keep: "set[int] | frozenset[int]" = frozenset()) -> None:
    """Adds to plan `p` the unloads (and lower targets) that make room for the `cold` models
    (each with the servers it may not use), and notes what each waits for. Replicas in `keep`
    (bases holding wanted LoRA adapters) are never taken."""
    unloading = set(p.unload)
    wanted_count: dict[str, int] = {}
    for r in kept:
        if r.wanted == LOADED and r.id not in unloading and r.generation == by_model[r.model_id].generation:
            wanted_count[r.model_id] = wanted_count.get(r.model_id, 0) + 1
    for model, exclude in cold:
        usable = [s for s in live if s.address not in exclude]
        victims, note = evict_for(model, usable, free, [r for r in kept if r.id not in keep], by_model,
                                  wanted_count, fits)
        if note:
            notes[model.model_id] = f"{notes[model.model_id]}; {note}" if notes.get(model.model_id) else note
        for r in victims:
            other = by_model[r.model_id]
            r.wanted = UNLOADED
            p.unload.append(r.id)
            wanted_count[r.model_id] -= 1
            other.requested = max(other.requested - 1, other.min_replicas)
            reason = f"evicted from {r.server} (least recently used) for {model.model_id}"
            p.scale[other.model_id] = Scaled(other.requested, None, None, reason)
            log.info("scale %s to %d replicas: %s", other.model_id, other.requested, reason)


def evict_for(model: "ModelView", servers: list["ServerView"], free: dict[str, int],
              kept: list["ReplicaView"], by_model: dict[str, "ModelView"],
              wanted_count: dict[str, int], fits: Any) -> tuple[list["ReplicaView"], str]:
    """Replicas to unload so that `model` fits on one server, and a note saying so.
    Nothing is evicted while memory already being freed (replicas unloading) will do."""
    need = model.need
    candidates = [s for s in servers if fits(s, model) and s.memory_bytes >= need]
    if not candidates:
        return [], ""
    names = {s.address for s in candidates}
    freeing: dict[str, int] = {a: 0 for a in names}
    evictable: list[ReplicaView] = []
    for r in kept:
        if r.server not in names:
            continue
        other = by_model[r.model_id]
        if r.wanted == UNLOADED and r.observed != NONE:
            freeing[r.server] += max(other.need, r.memory_bytes or 0)
        elif (r.wanted == LOADED and r.observed == OBS_LOADED and r.model_id != model.model_id
              and r.generation == other.generation and wanted_count.get(r.model_id, 0) > other.floor):
            evictable.append(r)
    waiting_on = [a for a in sorted(names) if free[a] + freeing[a] >= need]
    if waiting_on:
        return [], f"waiting for memory being freed on {waiting_on[0]}"
    taken: dict[str, list[ReplicaView]] = {a: [] for a in names}
    gained = dict(freeing)
    counts = dict(wanted_count)
    for r in sorted(evictable, key=lambda r: (last_used(r), r.id)):
        if counts[r.model_id] <= by_model[r.model_id].floor:
            continue
        counts[r.model_id] -= 1
        taken[r.server].append(r)
        gained[r.server] += max(by_model[r.model_id].need, r.memory_bytes or 0)
        if free[r.server] + gained[r.server] >= need:
            victims = taken[r.server]
            return victims, (f"evicting {', '.join(v.model_id for v in victims)} (least recently used) "
                             f"on {r.server} to make room")
    return [], ""


def unplaced_reason(model: "ModelView", live: list["ServerView"], free: dict[str, int],
                    placed: set[str], fits: Any) -> str:
    """Why a wanted replica of `model` got no server this pass (`placed`: the servers that
    hold or just got one; replicas of one model go to distinct servers)."""
    if not live:
        return "no live model server in the cell"
    paths = [s for s in live if model.model_path in s.servable or "*" in s.servable]
    if not paths:
        return f"no live server can serve model_path {model.model_path}"
    fitting = [s for s in paths if fits(s, model)]
    if not fitting:
        chip, tags = model.overrides.get("chip"), model.overrides.get("constraints")
        want = " and ".join(x for x in (f"chip {chip}" if chip else "", f"tags {tags}" if tags else "") if x)
        return f"no live server serving {model.model_path} has {want or 'what it needs'}"
    others = [s for s in fitting if s.address not in placed]
    if not others:
        return (f"replicas go to distinct servers and only {len(fitting)} live server"
                f"{'s' if len(fitting) != 1 else ''} can serve {model.model_path}")
    best = max(free[s.address] for s in others)
    return (f"not enough free memory: a replica needs {model.need} bytes, the most free on a "
            f"server that can serve it is {max(best, 0)} bytes")
