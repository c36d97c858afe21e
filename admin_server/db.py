"""Database engine, sessions and migrations.

SQLite gets WAL, a busy timeout, foreign keys and BEGIN IMMEDIATE (so two
writers queue instead of failing on a lock upgrade); on PostgreSQL a
connection lost to a server restart is retried once on a fresh one, and with
`timeout_s` no statement, lock wait or connect lasts longer (a request then
fails with 503 instead of hanging behind a stuck lock or an unreachable host).
"""
from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str, *, pool_size: int = 10, timeout_s: float | None = None) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping (a round trip per checkout, a fifth of a heartbeat's cost): after a
    # database restart the first statement on a dead connection fails, SQLAlchemy
    # then invalidates the whole pool, and callers retry (see `retrying`).
    connect_args = {}
    if timeout_s:
        ms = int(timeout_s * 1000)
        connect_args = {"connect_timeout": max(1, round(timeout_s)),
                        "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
                        # a peer gone silent (a cut network) ends the connection too
                        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                        "keepalives_count": 3, "tcp_user_timeout": ms}
    return create_engine(url, pool_size=pool_size, max_overflow=2 * pool_size, pool_recycle=1800,
                         connect_args=connect_args)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Runs Alembic migrations up to `revision`."""
    cfg = alembic_config(url)
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def schema_is_current(engine: Engine) -> tuple[bool, str | None, str | None]:
    """Returns (is_at_head, current revision, head revision)."""
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current == head, current, head


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
