"""Leader failover in the middle of loads on demand and evictions leaves a consistent cell.

Two admin processes on one PostgreSQL database behind a Service stand-in, four simulated
model servers (real heartbeats over HTTP, no JAX) with room for two models each, and
twelve models with min_replicas 0: callers keep asking for models that are not loaded, so
the leader keeps evicting least-recently-used replicas and placing others. The leader is
killed (SIGKILL) while it does; its successor carries on. Throughout, no server holds more
than fits; afterwards every replica the admin knows is one a server holds and vice versa,
and every model asked for last is served.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.admin.test_reconciler_cell import MemoryWatch
from tests.cluster import AdminProcess, TcpProxy, wait_until
from tests.faults.conftest import leader_pgid
from tests.scaling.test_many_models import GiB
from tests.sim_servers import SimServer

pytestmark = pytest.mark.slow


def _models(url: str) -> list[dict[str, Any]]:
    return requests.get(f"{url}/models?detail=1", timeout=10).json()["models"]


def test_leader_killed_during_evictions_leaves_a_consistent_cell(tmp_path: Path, pg_url: str) -> None:
    service = TcpProxy()
    args = ["--heartbeat-timeout", "3"]
    admins = [AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url, extra_args=args,
                           name=f"admin-{i}").start() for i in range(2)]
    service.set_backends([a.url.removeprefix("http://") for a in admins])
    url = f"http://{service.address}"
    servers = [SimServer(url, f"10.1.0.{i}:10001", 2 * GiB, load_delay_s=0.5).start() for i in range(4)]
    watch = MemoryWatch(servers)  # every 50 ms: what each server holds, against its memory
    names = [f"/sax/test/z{i}" for i in range(12)]
    stop = threading.Event()
    asked: list[str] = []

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choice(names)
            try:
                requests.post(f"{url}/demand{name}", timeout=5)
                asked.append(name)
            except requests.RequestException:
                pass  # the admin behind the Service is being replaced
            stop.wait(0.3)

    try:
        for name in names:
            r = requests.post(f"{url}/models", timeout=10, json={
                "model_id": name, "model_path": "test.tiny", "checkpoint": "None", "replicas": 0,
                "min_replicas": 0, "max_replicas": 1, "overrides": {"ram": GiB}})
            assert r.status_code == 201, r.text
        callers = [threading.Thread(target=caller, args=(seed,), daemon=True) for seed in (7, 8)]
        for t in callers:
            t.start()
        wait_until(lambda: any("evicted" in (m["last_scale"]["reason"] or "") for m in _models(url)),
                   timeout=60, what="a first eviction")
        leader = next(a for a in admins if leader_pgid(a.url) == a.pid)
        time.sleep(0.5)  # well into the churn
        leader.kill9()
        service.set_backends([a.url.removeprefix("http://") for a in admins if a is not leader])
        survivor = next(a for a in admins if a is not leader)
        wait_until(lambda: leader_pgid(survivor.url) == survivor.pid, timeout=30, what="a new leader")
        evictions_before = sum("evicted" in (m["last_scale"]["reason"] or "") for m in _models(url))
        # The new leader (which led only after the kill) goes on loading on demand and evicting.
        wait_until(lambda: "(least recently used) for" in survivor.log(), timeout=30,
                   what="an eviction by the new leader")
        time.sleep(2)
        stop.set()
        for t in callers:
            t.join(10)
    finally:
        stop.set()
    try:
        last = asked[-1]
        # Settled: what the admin records is exactly what the servers hold, nothing overcommitted.
        def consistent() -> bool:
            held = {(s.address, k[0]) for s in servers for k, m in s.models.items() if m["status"] == "LOADED"}
            known = {(r["address"], m["model_id"]) for m in _models(url) for r in m["replicas"]
                     if r["wanted"] == "LOADED" and r["status"] == "LOADED"}
            other = [r for m in _models(url) for r in m["replicas"] if r["status"] not in ("LOADED", "UNLOADED")]
            return held == known and not other
        wait_until(consistent, timeout=30, interval=0.3, what="admin and servers agreeing")
        requests.post(f"{url}/demand{last}", timeout=5)
        wait_until(lambda: requests.get(f"{url}/locate{last}", timeout=5).json()["addresses"], timeout=30,
                   what=f"{last} served after the failover")
        for s in requests.get(f"{url}/servers", timeout=10).json()["servers"]:
            assert s["used_memory_bytes"] <= s["memory_bytes"], s
        assert sum(1 for m in _models(url) for r in m["replicas"]) <= 8
    finally:
        watch.stop()
        for s in servers:
            s.kill()
        for a in admins:
            a.stop()
        service.close()
    assert not watch.overflows, watch.overflows[:5]
    assert evictions_before >= 1
