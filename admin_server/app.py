"""Flask app factory for the admin server."""
from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from admin_server.blobstore import BlobStore, open_blobstore
from admin_server.db import make_engine, migrate, schema_is_current, session_factory
from admin_server.heartbeats import HeartbeatRecorder
from admin_server.leader import LeaderLoop
from admin_server.settings import MAX_BODY_BYTES, AdminSettings
from admin_server.snapshot import ensure_cell

log = logging.getLogger(__name__)


@dataclass
class AdminContext:
    settings: AdminSettings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore
    leader: LeaderLoop | None
    heartbeats: HeartbeatRecorder
    poll_interval_s: float = 0.2

    def wake_leader(self) -> None:
        if self.leader:
            self.leader.wake()


def prepare_database(settings: AdminSettings) -> None:
    """Migrates the embedded database, or checks that an external one is at head."""
    if settings.migrate_on_start:
        migrate(settings.database_url)
        return
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        ok, current, head = schema_is_current(engine)
    finally:
        engine.dispose()
    if not ok:
        raise SystemExit(f"database schema is at {current}, expected {head}: run `saxutil migrate`")


def create_app(settings: AdminSettings | None = None, *, prepare: bool = True) -> Flask:
    settings = settings or AdminSettings.from_env()
    if prepare:
        prepare_database(settings)
    engine = make_engine(settings.database_url, pool_size=settings.threads, timeout_s=settings.db_timeout_s)
    store = open_blobstore(settings.root)
    ensure_cell(engine, store, settings.cell_name)
    leader = LeaderLoop(engine, store, settings) if settings.run_leader else None
    app = Flask("admin_server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    heartbeats = HeartbeatRecorder(engine, settings)
    app.extensions["sax_admin"] = AdminContext(settings, engine, session_factory(engine), store, leader,
                                               heartbeats)
    from admin_server.api import bp
    from admin_server.metrics import bp as metrics_bp
    from admin_server.status_pages import bp as status_bp
    app.register_blueprint(bp)
    app.register_blueprint(status_bp)
    app.register_blueprint(metrics_bp)
    atexit.register(heartbeats.stop)
    if leader:
        leader.start()
        atexit.register(leader.stop)
    return app
