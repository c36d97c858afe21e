"""The reconciler against simulated model servers over real HTTP (no JAX)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cluster import AdminProcess, wait_until
from tests.sim_servers import SimServer

pytestmark = pytest.mark.slow
GiB = 1 << 30


def detail(url: str) -> list[dict[str, Any]]:
    return requests.get(f"{url}/models?detail=1", timeout=10).json()["models"]


def converged(url: str, expect: dict[str, int] | None = None) -> bool:
    models = detail(url)
    if expect is not None and {m["model_id"]: m["max_replicas"] for m in models} != expect:
        return False
    for m in models:
        ready = [r["address"] for r in m["replicas"]
                 if r["status"] == "LOADED" and r["wanted"] == "LOADED" and r["generation"] == m["generation"]]
        if len(ready) != m["max_replicas"] or len(set(ready)) != len(ready):
            return False
        if len(m["replicas"]) != m["max_replicas"]:  # nothing left over
            return False
    return True


class MemoryWatch:
    """Samples every server's loaded memory while the test runs; records any overflow."""

    def __init__(self, servers: list[SimServer]) -> None:
        self.servers = servers
        self.overflows: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for s in list(self.servers):
                claimed = sum(m["ram"] for m in list(s.models.values()))
                if claimed > s.memory_bytes:
                    self.overflows.append(f"{s.address}: {claimed} > {s.memory_bytes}")

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def test_ten_servers_mixed_memory_converge_through_failures(tmp_path: Path, pg_url: str) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root"), db_url=pg_url).start()
    mems = [4, 4, 8, 8, 8, 12, 16, 16, 24, 32]
    servers = [SimServer(admin.url, f"10.0.0.{i}:10001", m * GiB).start() for i, m in enumerate(mems)]
    watch = MemoryWatch(servers)
    try:
        sizes = {"xl": (20, 1), "l": (12, 2), "m": (6, 3), "s": (3, 3), "xs": (1, 4), "t1": (2, 2), "t2": (2, 2)}
        for name, (gib, replicas) in sizes.items():
            r = requests.post(f"{admin.url}/models", timeout=10, json={
                "model_id": f"/sax/test/{name}", "model_path": "test.tiny", "checkpoint": "None",
                "replicas": replicas, "overrides": {"ram": gib * GiB}})
            assert r.status_code == 201, r.text
        expect = {f"/sax/test/{n}": r for n, (_, r) in sizes.items()}
        wait_until(lambda: converged(admin.url, expect), timeout=30, what="initial convergence")

        # Kill three servers, including the only ones big enough for some replicas.
        for victim in [s for s in servers if s.memory_bytes in (32 * GiB, 8 * GiB)][:3]:
            victim.kill()
            servers.remove(victim)
        wait_until(lambda: converged(admin.url, expect), timeout=30, what="convergence after kills")

        # Add two servers, scale up and down, roll one model to a new checkpoint.
        for i in (20, 21):
            servers.append(SimServer(admin.url, f"10.0.1.{i}:10001", 32 * GiB).start())
        requests.patch(f"{admin.url}/models/sax/test/xs", json={"replicas": 6}, timeout=10)
        requests.patch(f"{admin.url}/models/sax/test/s", json={"replicas": 1}, timeout=10)
        requests.patch(f"{admin.url}/models/sax/test/m", json={"checkpoint": "/ckpt/m-v2"}, timeout=10)
        requests.delete(f"{admin.url}/models/sax/test/t2", timeout=10)
        expect.update({"/sax/test/xs": 6, "/sax/test/s": 1})
        del expect["/sax/test/t2"]
        wait_until(lambda: converged(admin.url, expect), timeout=30, what="convergence after changes")
        m = next(m for m in detail(admin.url) if m["model_id"] == "/sax/test/m")
        assert m["generation"] == 2 and {r["checkpoint"] for r in m["replicas"]} == {"/ckpt/m-v2"}
        # Every model server holds exactly what the admin says it does.
        for s in servers:
            held = {k for k, v in s.models.items() if v["status"] == "LOADED"}
            want = {(mm["model_id"], r["generation"]) for mm in detail(admin.url)
                    for r in mm["replicas"] if r["address"] == s.address}
            assert held == want, s.address
    finally:
        watch.stop()
        for s in servers:
            s.kill()
        admin.stop()
    assert watch.overflows == []


def test_failed_load_is_retried_elsewhere_and_error_is_visible(tmp_path: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    bad = SimServer(admin.url, "10.0.0.1:1", 8 * GiB, fail_checkpoints={"/ckpt/x"}).start()
    try:
        requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": "/sax/test/lm", "model_path": "test.tiny", "checkpoint": "/ckpt/x", "replicas": 1})
        m = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
            requests.get(f"{admin.url}/models/sax/test/lm", timeout=10).json()), what="failure reported")
        assert "10.0.0.1:1: cannot load checkpoint /ckpt/x" in m["last_error"]
        assert any(r["status"] == "FAILED" and "cannot load" in (r["error"] or "") for r in m["replicas"])
        good = SimServer(admin.url, "10.0.0.2:1", 8 * GiB).start()
        try:
            wait_until(lambda: converged(admin.url), timeout=20, what="retry on the good server")
            m = requests.get(f"{admin.url}/models/sax/test/lm", timeout=10).json()
            assert [r["address"] for r in m["replicas"] if r["status"] == "LOADED"] == ["10.0.0.2:1"]
            assert m["last_error"] is None
        finally:
            good.kill()
    finally:
        bad.kill()
        admin.stop()


def test_server_restart_at_same_address_gets_its_models_back(tmp_path: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    s = SimServer(admin.url, "10.0.0.1:1", 8 * GiB).start()
    try:
        requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": "/sax/test/lm", "model_path": "test.tiny", "checkpoint": "None", "replicas": 1})
        wait_until(lambda: converged(admin.url), what="loaded")
        s.kill()
        s = SimServer(admin.url, "10.0.0.1:1", 8 * GiB).start()  # new boot, nothing loaded
        wait_until(lambda: s.models and converged(admin.url), timeout=20, what="reloaded after restart")
    finally:
        s.kill()
        admin.stop()


def test_restarted_admin_adopts_what_servers_hold_instead_of_reloading(tmp_path: Path) -> None:
    """Admin down past the heartbeat timeout, then back on a wiped database (restored from
    the snapshot): servers keep their models, nothing is unloaded or reloaded."""
    root = str(tmp_path / "root")
    admin = AdminProcess(tmp_path, root=root).start()
    servers = [SimServer(admin.url, f"10.0.0.{i}:1", 8 * GiB).start() for i in range(3)]
    try:
        for name, replicas in (("a", 2), ("b", 1)):
            requests.post(f"{admin.url}/models", timeout=10, json={
                "model_id": f"/sax/test/{name}", "model_path": "test.tiny", "checkpoint": "None",
                "replicas": replicas, "overrides": {"ram": GiB}})
        wait_until(lambda: converged(admin.url), timeout=20, what="loaded")
        wait_until(lambda: (lambda s: s["snapshot_version"] == s["version"])(
            requests.get(f"{admin.url}/stats", timeout=5).json()), what="snapshot")
        held = {s.address: set(s.models) for s in servers}
        admin.kill9()
        for f in (tmp_path / "root" / "sax" / "test").glob("admin.db*"):
            f.unlink()
        import time
        time.sleep(2.0)  # longer than the 1.5 s heartbeat timeout
        admin = AdminProcess(tmp_path, root=root, port=admin.port).start()
        wait_until(lambda: converged(admin.url, {"/sax/test/a": 2, "/sax/test/b": 1}), timeout=20,
                   what="converged after restore")
        time.sleep(1.0)
        assert all(s.unloads == [] for s in servers), [s.unloads for s in servers]
        assert {s.address: set(s.models) for s in servers} == held
    finally:
        for s in servers:
            s.kill()
        admin.stop()
