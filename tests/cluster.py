"""Helpers to run the cell's real processes (and their infrastructure) in tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("SAX_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy in {timeout}s ({last})")


def wait_until(pred, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server; dropped afterwards."""
    import psycopg

    name = f"sax_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator on a free port; yields its host:port (STORAGE_EMULATOR_HOST value)."""
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{host}/storage/v1/b", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator did not start")
                time.sleep(0.1)
        yield host
    finally:
        proc.terminate()
        proc.wait(10)


def create_bucket(emulator_host: str, bucket: str) -> None:
    requests.post(f"{emulator_host}/storage/v1/b", params={"project": "saxplane"},
                  json={"name": bucket}, timeout=5).raise_for_status()


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

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.proc.poll() is None:
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


class AdminProcess(Proc):
    def __init__(self, tmp: Path, *, root: str, db_url: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 name: str = "admin"):
        self.port = port or free_port()
        args = [sys.executable, "-m", "admin_server", "--port", str(self.port), "--host", "127.0.0.1",
                "--root", root, "--heartbeat-interval", "0.3", "--heartbeat-timeout", "1.5",
                "--lease-ttl", "2", "--reconcile-interval", "0.2", "--retry-backoff", "0.5",
                *(["--db-url", db_url, "--migrate"] if db_url else []), *(extra_args or [])]
        super().__init__(args, env or {}, tmp / f"{name}-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "AdminProcess":
        super().start()
        if wait:
            wait_http(f"{self.url}/healthz", proc=self.proc)
        return self


TINY_OVERRIDES = {"num_slots": 4, "max_seq_len": 128, "max_queue": 16}


class ModelServerProcess(Proc):
    """`python -m model_server` joined to an admin (or with static --model entries)."""

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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, wait: bool = True) -> "ModelServerProcess":
        super().start()
        if wait:
            wait_http(f"{self.url}/healthz", timeout=120, proc=self.proc)
        return self


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
