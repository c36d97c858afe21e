"""Admin server configuration: one frozen dataclass read from SAX_* variables.

CLI flags (see ``__main__``) are applied over the environment with
:meth:`AdminSettings.from_env`'s keyword overrides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.naming import parse_cell
from common.settings import ADMIN_PORT, DEFAULT_CELL, Env, with_flags

DEFAULT_ROOT = "./sax-root"


MAX_BODY_BYTES = 1 << 20   # admin requests are small JSON documents: 413 past this

@dataclass(frozen=True)
class AdminSettings:
    cell: str = DEFAULT_CELL
    root: str = DEFAULT_ROOT
    db_url: str | None = None
    host: str = "0.0.0.0"
    port: int = ADMIN_PORT
    workers: int = 2
    threads: int = 32
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float | None = None  # default: 3 heartbeat intervals
    lease_ttl_s: float = 10.0
    reconcile_interval_s: float = 1.0
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 60.0
    max_replicas: int = 1024
    # Autoscaling (see reconciler.autoscale): one replica more when the requests queued per
    # ready replica stay above `scale_up_waiting` for `scale_up_window_s`; one fewer when the
    # others could carry the load (`scale_down_load` running + queued requests per replica)
    # for the model's idle_seconds; zero after idle_seconds without a request (min 0).
    scale_up_waiting: float = 1.0
    scale_up_window_s: float = 10.0
    scale_down_load: float = 1.0
    db_timeout_s: float = 30.0   # PostgreSQL: longest statement, lock wait or connect of a request
    snapshot_wait_s: float = 5.0  # a change is answered once the snapshot holds it, or after this long
    admin_token: str | None = None
    cluster_token: str | None = None
    checkpoint_roots: tuple[str, ...] = field(default=())
    auto_migrate: bool | None = None  # default: only for SQLite
    run_leader: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", f"/sax/{parse_cell(self.cell)}")

    @property
    def cell_name(self) -> str:
        return self.cell.rsplit("/", 1)[1]

    @property
    def dead_after_s(self) -> float:
        return self.heartbeat_timeout_s or 3 * self.heartbeat_interval_s

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        if self.root.startswith("gs://"):
            raise ValueError("SAX_ROOT is on GCS: set SAX_DB_URL (the embedded SQLite needs a local root)")
        path = os.path.abspath(os.path.join(self.root, "sax", self.cell_name, "admin.db"))
        return f"sqlite:///{path}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "AdminSettings":
        e = Env(env)
        base = cls(
            cell=e.text("SAX_CELL", DEFAULT_CELL),
            root=e.text("SAX_ROOT", DEFAULT_ROOT),
            db_url=e.text("SAX_DB_URL"),
            port=e.integer("SAX_ADMIN_PORT", cls.port),
            workers=e.integer("SAX_ADMIN_WORKERS", cls.workers),
            threads=e.integer("SAX_ADMIN_THREADS", cls.threads),
            heartbeat_interval_s=e.number("SAX_HEARTBEAT_INTERVAL", cls.heartbeat_interval_s),
            heartbeat_timeout_s=e.number("SAX_HEARTBEAT_TIMEOUT") or None,
            lease_ttl_s=e.number("SAX_LEASE_TTL", cls.lease_ttl_s),
            reconcile_interval_s=e.number("SAX_RECONCILE_INTERVAL", cls.reconcile_interval_s),
            retry_backoff_s=e.number("SAX_RETRY_BACKOFF", cls.retry_backoff_s),
            retry_backoff_max_s=e.number("SAX_RETRY_BACKOFF_MAX", cls.retry_backoff_max_s),
            scale_up_waiting=e.number("SAX_SCALE_UP_WAITING", cls.scale_up_waiting),
            scale_up_window_s=e.number("SAX_SCALE_UP_WINDOW", cls.scale_up_window_s),
            scale_down_load=e.number("SAX_SCALE_DOWN_LOAD", cls.scale_down_load),
            db_timeout_s=e.number("SAX_DB_TIMEOUT", cls.db_timeout_s),
            snapshot_wait_s=e.number("SAX_SNAPSHOT_WAIT", cls.snapshot_wait_s),
            admin_token=e.text("SAX_ADMIN_TOKEN"),
            cluster_token=e.text("SAX_CLUSTER_TOKEN"),
            checkpoint_roots=e.csv("SAX_CHECKPOINT_ROOTS"),
        )
        return with_flags(base, overrides)
