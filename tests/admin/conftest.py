from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from flask import Flask

from admin_server.app import create_app
from admin_server.settings import AdminSettings


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Builds admin apps in-process (SQLite under tmp_path unless db_url is given)."""
    apps: list[Flask] = []

    def make(**overrides) -> Flask:  # type: ignore[no-untyped-def]
        settings = AdminSettings(**{"root": str(tmp_path / "root"), "reconcile_interval_s": 0.1,
                                    "heartbeat_interval_s": 0.2, "lease_ttl_s": 2.0,
                                    "retry_backoff_s": 0.2, **overrides})
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        ctx = app.extensions["sax_admin"]
        ctx.heartbeats.stop()
        if ctx.leader:
            ctx.leader.stop()
        ctx.engine.dispose()
