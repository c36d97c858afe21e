"""The fault suites' shared cell and the summary of measured figures.

`fault_cell` (one per package run, shared by the suites that leave a working cell behind):
two admins on one fresh PostgreSQL database behind a Service stand-in (`TcpProxy`, which
model servers and the frontend use as their admin address), three model servers and a
frontend (gunicorn, two workers), with `/sax/test/lm` published at two replicas (test.tiny
at the session's cached shapes).

What a suite kills it restores (a new admin after the leader's death, a new model server
when one is short); suites that break the database or the blob store start their own admin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.cluster import (TINY_OVERRIDES, AdminProcess, FrontendProcess, ModelServerProcess, TcpProxy,
                           postgres_database, publish_and_wait, wait_http, wait_until)
from tests.faults.harness import FIGURES, admin_get, locate

MODEL = "/sax/test/lm"
# test.tiny's shapes; a queue deep enough that one replica can take every client of the load
# tests while the other is gone (a refusal there would be a failed request).
OVERRIDES = {**TINY_OVERRIDES, "max_queue": 64}
HEARTBEAT_TIMEOUT_S = 3.0   # generous on two busy cores: no server is declared dead by mistake
ADMIN_ARGS = ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)]


@dataclass
class FaultCell:
    tmp: Path
    db_url: str
    service: TcpProxy                 # "the admin Service": what servers and frontends talk to
    admins: list[AdminProcess]
    servers: list[ModelServerProcess]
    frontend: FrontendProcess
    procs: list[Any] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        return f"http://{self.service.address}"

    def start_admin(self, name: str) -> AdminProcess:
        a = AdminProcess(self.tmp, root=str(self.tmp / "root"), db_url=self.db_url, extra_args=ADMIN_ARGS,
                         name=name).start()
        self.admins.append(a)
        self.procs.append(a)
        return a

    def live_admins(self) -> list[AdminProcess]:
        return [a for a in self.admins if a.proc is not None and a.proc.poll() is None]

    def start_server(self) -> ModelServerProcess:
        s = ModelServerProcess(self.tmp, admin=self.service.address, extra_args=["--threads", "96"])
        self.servers.append(s)
        self.procs.append(s.start())
        return s

    def ensure_servers(self, n: int) -> None:
        while len(self.running()) < n:
            self.start_server()

    def server(self, address: str) -> ModelServerProcess:
        return next(s for s in self.servers if s.address == address)

    def locate(self, model_id: str = MODEL) -> list[str]:
        return locate(self.admin_url, model_id)

    def detail(self, model_id: str = MODEL) -> dict[str, Any]:
        return admin_get(self.admin_url, f"/models{model_id}")

    def alive(self) -> list[str]:
        return [s["address"] for s in admin_get(self.admin_url, "/servers")["servers"] if s["alive"]]

    def running(self) -> list[ModelServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def settled(self, model_id: str = MODEL, replicas: int = 2) -> list[str]:
        """Waits until `model_id` has exactly `replicas` replicas, all LOADED and routed to, and
        every running server is alive; returns the replicas' addresses."""
        running = {s.address for s in self.running()}

        def ok() -> list[str] | None:
            reps = self.detail(model_id)["replicas"]
            if len(reps) != replicas or any(r["status"] != "LOADED" or r["wanted"] != "LOADED" for r in reps):
                return None
            if not running <= set(self.alive()):
                return None
            where = sorted(self.locate(model_id))
            return where if len(where) == replicas else None
        return wait_until(ok, timeout=240, interval=0.2, what=f"{model_id} settled at {replicas} replicas")

    def unpublish(self, model_id: str) -> None:
        r = requests.delete(f"{self.admin_url}/models{model_id}", timeout=10)
        assert r.status_code in (200, 404), r.text


def leader_pgid(admin_url: str) -> int | None:
    """Process group (= AdminProcess pid) of the admin whose worker holds a valid lease."""
    lease = requests.get(f"{admin_url}/leader", timeout=5).json()
    if not lease.get("valid"):
        return None
    try:
        return os.getpgid(int(lease["holder"].split(":")[1]))
    except ProcessLookupError:
        return None


@pytest.fixture(scope="package")
def fault_cell(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator[FaultCell]:
    tmp = tmp_path_factory.mktemp("fault-cell")
    with postgres_database() as db_url:
        service = TcpProxy()
        cell = FaultCell(tmp, db_url, service, [], [], None)  # type: ignore[arg-type]
        try:
            first = cell.start_admin("admin-a")
            wait_until(lambda: leader_pgid(first.url) == first.pid, timeout=30, what="the first admin leading")
            cell.start_admin("admin-b")
            service.set_backends([a.url.removeprefix("http://") for a in cell.admins])
            for _ in range(3):
                s = ModelServerProcess(tmp, admin=service.address, extra_args=["--threads", "96"])
                cell.servers.append(s)
                cell.procs.append(s.start(wait=False))
            cell.frontend = FrontendProcess(tmp, service.address, "--workers", "2", "--threads", "64").start()
            cell.procs.append(cell.frontend)
            for s in cell.servers:
                wait_http(f"{s.url}/healthz", timeout=120, proc=s.proc)
            publish_and_wait(cell.admin_url, MODEL, 2, overrides=OVERRIDES, timeout=300)
            yield cell
        finally:
            for p in reversed(cell.procs):
                p.stop()
            service.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault suite figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
