"""PostgreSQL restarts under a running admin (a private server: the shared one is left alone).

First a crash (`pg_ctl stop -m immediate`: no shutdown checkpoint, recovery replays the WAL),
then a clean restart. During each outage the admin answers quickly with 503 and its JSON
error (healthz, publish, list), never hangs; once the database is back the same processes
serve again without a restart: healthz 200 and publishes succeed at the first attempt (on
every gunicorn worker); no acknowledged publish is lost, including the one acknowledged
right before the crash; the leader leads again and the snapshot catches up.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.cluster import AdminProcess, private_postgres, wait_until
from tests.faults.harness import publish, record

pytestmark = pytest.mark.slow

OUTAGE_ANSWER_S = 10.0   # an admin call during the outage must answer within this


def _outage_answers(admin_url: str, attempt: int) -> float:
    """Calls made while the database is down: each a quick 503 with the admin's JSON error."""
    slowest = 0.0
    calls = [("GET", "/healthz", None), ("GET", "/models", None)] + [
        ("POST", "/models", {"model_id": f"/sax/test/during-{attempt}-{i}", "model_path": "test.tiny",
                             "checkpoint": "None", "replicas": 0}) for i in range(4)]
    for method, path, body in calls:
        t0 = time.monotonic()
        r = requests.request(method, admin_url + path, json=body, timeout=OUTAGE_ANSWER_S + 20)
        took = time.monotonic() - t0
        slowest = max(slowest, took)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "UNAVAILABLE", r.text
        assert took < OUTAGE_ANSWER_S, f"{method} {path} took {took:.1f}s during the outage"
    return slowest


def test_postgres_restarts_under_the_admin(tmp_path: Path) -> None:
    with private_postgres() as pg:
        admin = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg.url).start()
        acked: list[str] = []
        try:
            for attempt, mode in enumerate(("immediate", "fast")):
                for i in range(5):
                    model_id = f"/sax/test/m{attempt}-{i}"
                    r = publish(admin.url, model_id, 0)
                    assert r.status_code == 201, r.text
                    acked.append(model_id)
                # The last acknowledgement comes right before the database goes.
                pg.stop(mode)
                down = time.monotonic()
                slowest = _outage_answers(admin.url, attempt)
                record(f"database {mode} stop: slowest admin answer during the outage (503)", slowest, "s")
                pg.start()
                up = time.monotonic()
                wait_until(lambda: requests.get(f"{admin.url}/healthz", timeout=10).status_code == 200,
                           timeout=60, interval=0.1, what="healthz 200 again")
                record(f"database {mode} stop: database back -> admin healthz 200", time.monotonic() - up, "s")
                record(f"database {mode} stop: outage length", up - down, "s")
                # Every worker serves again at once (gunicorn spreads these over its workers).
                for i in range(8):
                    model_id = f"/sax/test/after{attempt}-{i}"
                    r = publish(admin.url, model_id, 0)
                    assert r.status_code == 201, f"publish {i} after the restart: {r.status_code} {r.text}"
                    acked.append(model_id)
                listed = requests.get(f"{admin.url}/models", timeout=10).json()["models"]
                assert not [m for m in acked if m not in listed], "an acknowledged publish was lost"
                assert not [m for m in listed if "/during-" in m], "a publish refused with 503 was applied"

            # A restart between two calls (nobody asks the admin meanwhile): the pooled
            # connections died with the old server; the next calls must still succeed.
            pg.stop("fast")
            pg.start()
            for i in range(8):
                model_id = f"/sax/test/quick-{i}"
                r = publish(admin.url, model_id, 0)
                assert r.status_code == 201, f"publish {i} after a quick restart: {r.status_code} {r.text}"
                acked.append(model_id)
            assert requests.get(f"{admin.url}/healthz", timeout=10).status_code == 200

            # The leader leads again and the snapshot catches up with everything.
            wait_until(lambda: requests.get(f"{admin.url}/leader", timeout=5).json().get("valid"), timeout=30,
                       what="a valid lease")
            wait_until(lambda: (lambda s: s["snapshot_version"] == s["version"])(
                requests.get(f"{admin.url}/stats", timeout=10).json()), timeout=30, what="the snapshot")
        finally:
            admin.stop()
