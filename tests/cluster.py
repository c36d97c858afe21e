"""Helpers to run the cell's real processes in tests.

Their infrastructure (PostgreSQL, the GCS emulator) is in tests/infra.py and the network
helpers in tests/netutil.py; both are re-exported here, where most tests import them from."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Self

import requests

from tests.infra import (PG_ADMIN_URL, GcsEmulator, PrivatePostgres, create_bucket, gcs_emulator,  # noqa: F401
                         postgres_bin_dir, postgres_database, private_postgres)
from tests.netutil import TcpProxy, free_port, recv_request, serve_connections, wait_http, wait_until  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


class Proc:
    """A child process of the cell, in its own process group, with its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.args, self.env, self.log_path, self.cwd = args, env, log_path, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.cwd or REPO, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the whole process group (gunicorn master and workers alike)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP the whole process group: a hung process (its sockets stay open)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused group cannot act on SIGTERM
            except ProcessLookupError:
                pass
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
            except ProcessLookupError:
                pass
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ServedProc(Proc):
    """A part serving HTTP on 127.0.0.1:`port`; `start` waits until its /healthz answers."""
    port: int
    health_timeout = 30.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, wait: bool = True) -> Self:
        super().start()
        if wait:
            wait_http(f"{self.url}/healthz", timeout=self.health_timeout, proc=self.proc)
        return self


class AdminProcess(ServedProc):
    def __init__(self, tmp: Path, *, root: str, db_url: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 name: str = "admin"):
        self.port = port or free_port()
        args = [sys.executable, "-m", "admin_server", "--port", str(self.port), "--host", "127.0.0.1",
                "--root", root, "--heartbeat-interval", "0.3", "--heartbeat-timeout", "1.5",
                "--lease-ttl", "2", "--reconcile-interval", "0.2", "--retry-backoff", "0.5",
                *(["--db-url", db_url, "--migrate"] if db_url else []), *(extra_args or [])]
        super().__init__(args, env or {}, tmp / f"{name}-{self.port}.log")


TINY_OVERRIDES = {"num_slots": 4, "max_seq_len": 128, "max_queue": 16}


class ModelServerProcess(ServedProc):
    """`python -m model_server` joined to an admin (or with static --model entries)."""
    health_timeout = 120.0

    def __init__(self, tmp: Path, *, admin: str | None = None, port: int | None = None,
                 models: list[str] | None = None, overrides: dict | None = None,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.port = port or free_port()
        args = [sys.executable, "-m", "model_server", "--port", str(self.port), "--host", "127.0.0.1",
                "--advertise", f"127.0.0.1:{self.port}", "--heartbeat-interval", "0.3",
                *(["--admin", admin] if admin else [])]
        for m in models or []:
            args += ["--model", m]
        for k, v in (overrides or {}).items():
            args += ["--override", f"{k}={v}"]
        super().__init__(args + (extra_args or []), env or {}, tmp / f"model-server-{self.port}.log")



def publish_and_wait(admin_url: str, model_id: str, replicas: int = 1, *, model_path: str = "test.tiny",
                     checkpoint: str = "None", overrides: dict | None = None, timeout: float = 240) -> dict:
    r = requests.post(f"{admin_url}/models", timeout=10, json={
        "model_id": model_id, "model_path": model_path, "checkpoint": checkpoint, "replicas": replicas,
        "overrides": TINY_OVERRIDES if overrides is None else overrides})
    assert r.status_code == 201, r.text
    return wait_until(lambda: (lambda d: d if d["active_replicas"] >= replicas else None)(
        requests.get(f"{admin_url}/models{model_id}", timeout=10).json()), timeout=timeout,
        interval=0.2, what=f"{model_id} ready")


def warm_compilation_cache(overrides: dict | None = None) -> None:
    """Loads test.tiny once in a subprocess so the session's XLA cache holds its programs:
    model servers started afterwards load in seconds instead of compiling for a minute."""
    code = ("import json, sys; from model_server.__main__ import enable_compilation_cache; "
            "import os; enable_compilation_cache(os.environ['SAX_COMPILATION_CACHE']); "
            "from model_server.manager import default_loader; "
            "m, e = default_loader('test.tiny', None, json.loads(sys.argv[1]), None); e.stop()")
    subprocess.run([sys.executable, "-c", code, json.dumps(overrides or TINY_OVERRIDES)], check=True,
                   timeout=600, cwd=REPO)


class FrontendProcess(ServedProc):
    """`python -m http_frontend` (gunicorn) in front of the admin at `admin` (a port on
    127.0.0.1, or a host:port)."""

    def __init__(self, tmp: Path, admin: int | str, *flags: str, name: str = "frontend",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        address = f"127.0.0.1:{admin}" if isinstance(admin, int) else admin
        args = [sys.executable, "-m", "http_frontend", "--port", str(self.port), "--host", "127.0.0.1",
                "--admin", address, *flags]
        super().__init__(args, env or {}, tmp / f"{name}-{self.port}.log")


@contextmanager
def admin_and_frontend(tmp: Path) -> Iterator[tuple["AdminProcess", "FrontendProcess"]]:
    """An admin and a one-worker frontend in front of it; both stopped after."""
    admin = AdminProcess(tmp, root=str(tmp / "root")).start()
    frontend = None
    try:
        frontend = FrontendProcess(tmp, admin.port, "--workers", "1").start()
        yield admin, frontend
    finally:
        if frontend is not None:
            frontend.stop()
        admin.stop()


@contextmanager
def small_cell(tmp: Path) -> Iterator[tuple["AdminProcess", "ModelServerProcess", "FrontendProcess"]]:
    """`admin_and_frontend` and one model server joined to the admin; all stopped after."""
    with admin_and_frontend(tmp) as (admin, frontend):
        ms = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}")
        try:
            ms.start()
            yield admin, ms, frontend
        finally:
            ms.stop()


def wait_loaded(admin_url: str, model_id: str, timeout: float = 600) -> dict:
    """The model's detail once a replica is active or its load failed (asserts the former)."""
    d = wait_until(lambda: (lambda d: d if d["active_replicas"] >= 1 or d["last_error"] else None)(
        requests.get(f"{admin_url}/models{model_id}", timeout=10).json()), timeout=timeout, interval=0.5,
        what=f"{model_id} ready")
    assert d["active_replicas"] >= 1, d
    return d


def sse_events(resp: requests.Response) -> list:
    """The `data:` payloads of an SSE answer, decoded ("[DONE]" kept as a string)."""
    out: list = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` at `url`/metrics whose labels include `labels`."""
    import re

    total = 0.0
    text = requests.get(f"{url}/metrics", timeout=10).text
    for m in re.finditer(r"^([^\s{#]+)\{([^}]*)\} (\S+)$", text, re.M):
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


