"""The admin server as real gunicorn processes: durability, snapshot restore, leader failover."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
import requests

from tests.cluster import PG_ADMIN_URL, AdminProcess, wait_until

pytestmark = pytest.mark.slow


def publish(url: str, name: str, replicas: int = 1, **extra) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(f"{url}/models", timeout=10, json={
        "model_id": f"/sax/test/{name}", "model_path": "test.tiny", "checkpoint": "None",
        "replicas": replicas, **extra})


def models(url: str) -> list[str]:
    return requests.get(f"{url}/models", timeout=10).json()["models"]


def test_publish_is_durable_across_kill9(tmp_path: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    try:
        for i in range(5):
            assert publish(admin.url, f"m{i}").status_code == 201
        admin.kill9()  # right after the acknowledgements
        admin = AdminProcess(tmp_path, root=str(tmp_path / "root"), port=admin.port).start()
        assert models(admin.url) == [f"/sax/test/m{i}" for i in range(5)]
    finally:
        admin.stop()


def _recreate_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


@pytest.mark.parametrize("backend", ["local+sqlite", "gcs+postgres"])
def test_restore_from_snapshot_after_database_wipe(backend: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    if backend == "local+sqlite":
        root, db_url, env = str(tmp_path / "root"), None, {}
    else:
        bucket = request.getfixturevalue("gcs_bucket")
        root, db_url = f"gs://{bucket}/cells", request.getfixturevalue("pg_url")
        env = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    admin = AdminProcess(tmp_path, root=root, db_url=db_url, env=env).start()
    try:
        assert publish(admin.url, "a", 2, overrides={"num_slots": 4}).status_code == 201
        assert publish(admin.url, "b").status_code == 201
        assert publish(admin.url, "c").status_code == 201
        requests.patch(f"{admin.url}/models/sax/test/b", json={"checkpoint": "/ckpt/v2"}, timeout=10)
        requests.delete(f"{admin.url}/models/sax/test/c", timeout=10)
        before = requests.get(f"{admin.url}/models?detail=1", timeout=10).json()["models"]
        wait_until(lambda: (lambda s: s["snapshot_version"] == s["version"])(
            requests.get(f"{admin.url}/stats", timeout=10).json()), what="snapshot")
        admin.stop()
        if db_url is None:
            for f in (tmp_path / "root" / "sax" / "test").glob("admin.db*"):
                f.unlink()
        else:
            _recreate_pg_database(db_url)
        admin = AdminProcess(tmp_path, root=root, db_url=db_url, env=env, port=admin.port).start()
        after = requests.get(f"{admin.url}/models?detail=1", timeout=10).json()["models"]
        keys = ("model_id", "model_path", "checkpoint", "max_replicas", "overrides", "uuid", "generation")
        assert [{k: m[k] for k in keys} for m in after] == [{k: m[k] for k in keys} for m in before]
        assert [m["model_id"] for m in after] == ["/sax/test/a", "/sax/test/b"]
        assert "restored 2 published models" in admin.log()
    finally:
        admin.stop()


def _leader_pgid(url: str) -> int:
    holder = requests.get(f"{url}/leader", timeout=5).json()
    assert holder.get("valid"), holder
    return os.getpgid(int(holder["holder"].split(":")[1]))


def test_two_admins_one_leader_and_failover_after_kill9(tmp_path: Path, pg_url: str) -> None:
    a = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url, name="a").start()
    b = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url, name="b").start()
    try:
        assert publish(a.url, "lm").status_code == 201
        # Place through heartbeats so there is reconcile work, then look at who did it.
        body = {"server": {"address": "127.0.0.1:1", "servable_model_paths": ["test.tiny"],
                           "memory_bytes": 1 << 30, "chip": "cpu", "topology": "1", "device_count": 1}}
        wait_until(lambda: requests.post(f"{b.url}/heartbeat", json=body, timeout=5).json()["desired"],
                   what="placement")
        leader_pgid = _leader_pgid(a.url)
        assert leader_pgid in (a.pid, b.pid)
        leader, follower = (a, b) if leader_pgid == a.pid else (b, a)
        assert "reconcile: +1 replicas" in leader.log()
        assert "reconcile:" not in follower.log() and "became leader" not in follower.log()
        epoch = requests.get(f"{follower.url}/leader", timeout=5).json()["epoch"]

        leader.kill9()
        killed = time.monotonic()
        wait_until(lambda: requests.get(f"{follower.url}/leader", timeout=5).json().get("epoch", 0) > epoch
                   and requests.get(f"{follower.url}/leader", timeout=5).json()["valid"],
                   timeout=15, interval=0.05, what="takeover")
        took = time.monotonic() - killed
        assert took < 2.0 + 1.5, f"takeover took {took:.2f}s with a 2s lease"
        assert _leader_pgid(follower.url) == follower.pid
        assert models(follower.url) == ["/sax/test/lm"]
        # The new leader reconciles: the dead server's replica moves after its timeout.
        assert publish(follower.url, "second").status_code == 201
        wait_until(lambda: any(d["model_id"] == "/sax/test/second" for d in requests.post(
            f"{follower.url}/heartbeat", json=body, timeout=5).json()["desired"]), what="new leader places")
    finally:
        a.stop()
        b.stop()


def _leader_then_follower(tmp_path: Path, pg_url: str) -> tuple[AdminProcess, AdminProcess]:
    """Two admins on one database: `a` started first and leading, then `b`."""
    a = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url, name="a").start()
    wait_until(lambda: requests.get(f"{a.url}/leader", timeout=5).json().get("valid"), what="leader")
    b = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url, name="b").start()
    assert _leader_pgid(b.url) == a.pid
    return a, b


def _leads(admin: AdminProcess) -> bool:
    """Whether one of `admin`'s workers holds a valid lease (False while it moves)."""
    holder = requests.get(f"{admin.url}/leader", timeout=5).json()
    try:
        return bool(holder.get("valid")) and os.getpgid(int(holder["holder"].split(":")[1])) == admin.pid
    except ProcessLookupError:  # the holder named a worker that has exited since
        return False


def test_graceful_stop_releases_the_lease(tmp_path: Path, pg_url: str) -> None:
    a, b = _leader_then_follower(tmp_path, pg_url)
    try:
        a.stop()
        wait_until(lambda: _leads(b), timeout=5, what="takeover after graceful stop")
    finally:
        a.stop()
        b.stop()


SERVER = {"address": "10.9.8.7:10001", "chip": "cpu", "topology": "1", "device_count": 1,
          "memory_bytes": 1 << 34, "servable_model_paths": ["test.tiny"]}


def test_heartbeats_and_chunked_bodies_over_http(tmp_path: Path) -> None:
    """The event-loop heartbeat route of the real process: a full answer, then `unchanged` from
    memory over one keep-alive connection; a publish (sent chunked, with no Content-Length)
    moves the answer; refusals keep the shape."""
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    try:
        http = requests.Session()

        def beat(version: object, models: list[dict[str, object]]) -> dict[str, object]:
            r = http.post(f"{admin.url}/heartbeat", json={"server": SERVER, "models": models,
                                                         "desired_version": version}, timeout=10)
            assert r.status_code == 200 and r.headers["Content-Type"] == "application/json", r.text
            return r.json()

        first = beat(None, [])
        assert first["desired"] == [] and first["cell"] == "/sax/test"
        assert all(beat(first["desired_version"], [])["unchanged"] for _ in range(20))
        spec = json.dumps({"model_id": "/sax/test/hb", "model_path": "test.tiny", "checkpoint": "None",
                           "replicas": 1}).encode()
        r = requests.post(f"{admin.url}/models", data=iter([spec[:10], spec[10:]]), timeout=10)
        assert r.status_code == 201, r.text
        moved = wait_until(lambda: (lambda a: a if not a.get("unchanged") else None)(
            beat(first["desired_version"], [])), timeout=15, what="the assignment to reach the server")
        assert [d["model_id"] for d in moved["desired"]] == ["/sax/test/hb"]
        loaded = [{"model_id": "/sax/test/hb", "generation": 1, "status": "LOADED"}]
        assert beat(moved["desired_version"], loaded)["desired"]  # a new report is written
        wait_until(lambda: beat(moved["desired_version"], loaded).get("unchanged"), timeout=5,
                   what="the fast path")
        located = requests.get(f"{admin.url}/locate/sax/test/hb", timeout=10).json()
        assert located["addresses"] == [SERVER["address"]]
        for method, status, code in (("GET", 405, "METHOD_NOT_ALLOWED"), ("PUT", 405, "METHOD_NOT_ALLOWED")):
            r = http.request(method, f"{admin.url}/heartbeat", timeout=10)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        r = http.post(f"{admin.url}/heartbeat", data=b"[1]", timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "INVALID_ARGUMENT")
        assert beat(moved["desired_version"], loaded)["unchanged"]  # the connection still serves
    finally:
        admin.stop()


def test_sigterm_gives_up_the_lease_before_draining(tmp_path: Path, pg_url: str) -> None:
    """A stopping leader resigns at once, while a long poll still holds it open."""
    a, b = _leader_then_follower(tmp_path, pg_url)
    try:
        assert publish(a.url, "idle", replicas=0).status_code == 201
        version = requests.get(f"{a.url}/locate/sax/test/idle", timeout=5).json()["version"]
        # Longer than the drain is allowed to take (gunicorn's graceful timeout, 10 s).
        def long_poll() -> None:
            try:
                requests.get(f"{a.url}/locate/sax/test/idle", params={"version": version, "timeout": 20},
                             timeout=30)
            except requests.RequestException:
                pass  # cut when the drain runs out

        poll = threading.Thread(target=long_poll)
        poll.start()
        time.sleep(1.5)  # the long poll is in flight
        os.killpg(a.pid, signal.SIGTERM)
        wait_until(lambda: _leads(b), timeout=5, what="takeover while the leader drains")
        assert a.proc is not None and a.proc.poll() is None, "a should still be draining its long poll\n" + a.log()[-3000:]
        poll.join(30)
    finally:
        a.stop()
        b.stop()


def test_a_stuck_lock_is_a_503_not_a_hang(tmp_path: Path, pg_url: str) -> None:
    """With --db-timeout 1, a call waiting behind a lock another session holds answers 503
    UNAVAILABLE after about a second; once the lock goes, everything is there."""
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url,
                         extra_args=["--db-timeout", "1"]).start()
    try:
        assert publish(admin.url, "kept", replicas=0).status_code == 201
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as blocker:
            blocker.execute("LOCK TABLE models IN ACCESS EXCLUSIVE MODE")  # held until the block ends
            for call in (lambda: requests.get(f"{admin.url}/models", timeout=15),
                         lambda: publish(admin.url, "blocked", replicas=0)):
                r = call()
                assert (r.status_code, r.json()["error"]["code"]) == (503, "UNAVAILABLE"), r.text
        assert models(admin.url) == ["/sax/test/kept"]
        assert publish(admin.url, "after", replicas=0).status_code == 201
    finally:
        admin.stop()
