"""LoRA adapters (`lm.lora`, override `base`) in the leader's placement.

An adapter replica serves only beside a LOADED replica of its base, bound to that replica's
generation (the model server attaches it to the newest LOADED generation there). So:

* an adapter is placed only on servers holding a LOADED replica of its base's current
  generation; one left on a server its base is no longer wanted on unloads (to be placed again);
* the base's replica count is max(its own target, what its adapters need): as many as the
  adapter with the most replicas wants, and never fewer than the servers whose base replica
  holds wanted adapter replicas (those replicas are neither surplus nor evictable);
* a rolling update of the base (a new generation) also starts a new generation of each adapter
  (state.update_model); an old-generation base replica stays while old adapter replicas on it
  are wanted, and those drain only as the adapter's new replicas (beside the new base) load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from admin_server.schema import Observed, Wanted
from admin_server.views import ModelView, ReplicaView

ADAPTER_PATH = "lm.lora"
LOADED, OBS_LOADED = Wanted.LOADED, Observed.LOADED


@dataclass
class BaseNeed:
    """What a base's adapters ask of it in one pass."""
    generation: int                                          # the base's current generation
    adapters: dict[str, int] = field(default_factory=dict)  # adapter id -> its target replicas
    servers: set[str] = field(default_factory=set)   # current base replicas holding wanted adapters
    pinned: set[int] = field(default_factory=set)    # old-generation base replica ids holding them

    @property
    def replicas(self) -> int:
        return max([len(self.servers), *self.adapters.values()], default=0)


def base_of(model: ModelView) -> str | None:
    return str(model.overrides.get("base")) if model.model_path == ADAPTER_PATH else None


def base_replicas(own: int, adapter_targets: list[int], holding_servers: int) -> int:
    """A base's effective replica count (also what status pages show)."""
    return max([own, holding_servers, *adapter_targets])


def needs(active: list[ModelView], holding: dict[str, list[ReplicaView]]) -> dict[str, BaseNeed]:
    """Per base model id: what its active adapters (targets already autoscaled) need. Also sets
    each base's `adapter_need`."""
    by_id = {m.model_id: m for m in active}
    out: dict[str, BaseNeed] = {}
    for model in active:
        base = by_id.get(base_of(model) or "")
        if base is None:
            continue
        need = out.setdefault(base.model_id, BaseNeed(base.generation))
        need.adapters[model.model_id] = model.requested
        base_rows = [r for r in holding.get(base.model_id, []) if r.wanted == LOADED]
        for r in holding.get(model.model_id, []):
            if r.wanted != LOADED:
                continue
            beside = [b for b in base_rows if b.server == r.server]
            if any(b.generation == base.generation for b in beside):
                need.servers.add(r.server)
            if r.generation != model.generation:  # may be bound to an old base generation there
                need.pinned.update(b.id for b in beside if b.generation != base.generation)
    for base_id, need in out.items():
        by_id[base_id].adapter_need = need.replicas
    return out


def protected(bases: dict[str, BaseNeed], holding: dict[str, list[ReplicaView]]) -> set[int]:
    """Base replica ids that neither scale-down nor eviction may take: they hold wanted adapters."""
    out: set[int] = set()
    for base_id, need in bases.items():
        out |= need.pinned
        out |= {r.id for r in holding.get(base_id, [])
                if r.server in need.servers and r.generation == need.generation}
    return out


def beside_base(model: ModelView, base: ModelView | None,
                holding: dict[str, list[ReplicaView]]) -> tuple[set[str], set[int]]:
    """An adapter's placement: (servers with a LOADED, wanted replica of its base's current
    generation; ids of the adapter's wanted replicas on servers its base is no longer wanted on:
    they unload, to be placed again beside the base)."""
    rows = holding.get(base.model_id, []) if base is not None else []
    wanted = {r.server for r in rows if r.wanted == LOADED}
    ready = {r.server for r in rows if r.wanted == LOADED and r.observed == OBS_LOADED
             and base is not None and r.generation == base.generation}
    stray = {r.id for r in holding.get(model.model_id, []) if r.wanted == LOADED and r.server not in wanted}
    return ready, stray


def replicas_note(model: ModelView, need: BaseNeed | None) -> str | None:
    """Why a base has more replicas than its own target (None when it does not)."""
    if need is None or need.replicas <= model.requested:
        return None
    return adapters_note(model.requested, need.replicas, need.adapters)


def adapters_note(own: int, effective: int, adapters: dict[str, int]) -> str:
    names = ", ".join(f"{a} ({n})" for a, n in sorted(adapters.items()))
    return f"{effective} replica{'s' if effective != 1 else ''} for its LoRA adapters (its own target is {own}): {names}"
