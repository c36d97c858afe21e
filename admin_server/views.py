"""Plain views of the cell's tables that the leader's pure planning reads (reconciler.plan,
scaling, adapter_placement), and the :class:`Plan` it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from admin_server import scaling

@dataclass
class ServerView:
    address: str
    chip: str
    memory_bytes: int
    tags: list[str]
    servable: list[str]
    last_heartbeat: float


@dataclass
class ModelView:
    model_id: str
    model_path: str
    checkpoint: str | None
    generation: int
    requested: int              # the target replica count (autoscaled between min and max)
    overrides: dict[str, Any]
    state: str
    memory_bytes: int | None
    failures: int
    retry_after: float | None
    min_replicas: int = -1      # -1: the same as `requested` (a fixed count)
    max_replicas: int = -1
    idle_seconds: float = 300.0
    busy_since: float | None = None
    calm_since: float | None = None
    demand_at: float | None = None
    scaled_at: float | None = None
    placement_note: str | None = None
    # Base models: replicas its LoRA adapters need (adapter_placement.needs), set each pass.
    adapter_need: int = 0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            self.min_replicas = self.requested
        if self.max_replicas < 0:
            self.max_replicas = self.requested

    @property
    def effective(self) -> int:
        """The replicas placed: its own target, or more where its adapters need them."""
        return max(self.requested, self.adapter_need)

    @property
    def floor(self) -> int:
        """Replicas eviction leaves it: its minimum, or what its adapters need."""
        return max(self.min_replicas, self.adapter_need)

    @property
    def need(self) -> int:
        """Accelerator bytes one replica needs: the `ram` override, else what a server reported."""
        return int(self.overrides.get("ram") or self.memory_bytes or 0)


@dataclass
class ReplicaView:
    id: int
    model_id: str
    server: str
    generation: int
    wanted: str
    observed: str
    error: str | None
    retry_after: float | None
    memory_bytes: int | None
    running: int = 0
    waiting: int = 0
    last_used_at: float | None = None
    created_at: float = 0.0


@dataclass
class Plan:
    dead_servers: list[str] = field(default_factory=list)
    add: list[dict[str, Any]] = field(default_factory=list)        # new replica rows
    unload: list[int] = field(default_factory=list)                # replica ids -> wanted UNLOADED
    delete: list[int] = field(default_factory=list)                # replica ids to drop
    failed: list[tuple[int, float]] = field(default_factory=list)  # (replica id, retry_after)
    model_failures: dict[str, tuple[int, float, str]] = field(default_factory=dict)
    model_recovered: list[str] = field(default_factory=list)
    drop_models: list[str] = field(default_factory=list)
    scale: dict[str, scaling.Scaled] = field(default_factory=dict)    # model id -> new target
    notes: dict[str, str | None] = field(default_factory=dict)        # model id -> placement note
    # Earliest time a back-off ends: the next pass that could act on its own.
    next_due: float | None = None

    def empty(self) -> bool:
        return not any((self.dead_servers, self.add, self.unload, self.delete, self.failed,
                        self.model_failures, self.model_recovered, self.drop_models, self.scale,
                        self.notes))

    def due(self, when: float | None) -> None:
        if when is not None:
            self.next_due = min(self.next_due or when, when)
