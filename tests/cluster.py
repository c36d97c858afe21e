"""Helpers to run the cell's real processes (and their infrastructure) in tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def serve_connections(listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """In a daemon thread: accepts connections on `listener` until it is closed, each one
    served by `serve(conn)` in a thread of its own."""
    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def recv_request(conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes] | None:
    """Reads one HTTP/1.1 request with a Content-Length body from `conn` (after the bytes
    already in `buf`): (head, body, what followed it), or None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    return head, rest[:length], rest[length:]


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


class GcsEmulator:
    """gcp-storage-emulator (in memory) on a fixed port: stop() and start() again on the same
    port to simulate a blob-store outage (its buckets and objects are gone after a restart)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "GcsEmulator":
        exe = Path(sys.executable).with_name("gcp-storage-emulator")
        self.proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(f"{self.host}/storage/v1/b", timeout=1)
                return self
            except requests.RequestException:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("gcp-storage-emulator did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator on a free port; yields its host:port (STORAGE_EMULATOR_HOST value)."""
    emulator = GcsEmulator()
    emulator.start(timeout=20)
    try:
        yield emulator.host
    finally:
        emulator.stop()


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


class FrontendProcess(Proc):
    """`python -m http_frontend` (gunicorn) in front of the admin at `admin` (a port on
    127.0.0.1, or a host:port)."""

    def __init__(self, tmp: Path, admin: int | str, *flags: str, name: str = "frontend",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        address = f"127.0.0.1:{admin}" if isinstance(admin, int) else admin
        args = [sys.executable, "-m", "http_frontend", "--port", str(self.port), "--host", "127.0.0.1",
                "--admin", address, *flags]
        super().__init__(args, env or {}, tmp / f"{name}-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FrontendProcess":
        super().start()
        wait_http(f"{self.url}/healthz", proc=self.proc)
        return self


@contextmanager
def small_cell(tmp: Path) -> Iterator[tuple["AdminProcess", "ModelServerProcess", "FrontendProcess"]]:
    """An admin, one model server joined to it and a one-worker frontend; all stopped after."""
    admin = AdminProcess(tmp, root=str(tmp / "root")).start()
    ms = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}")
    frontend = None
    try:
        ms.start()
        frontend = FrontendProcess(tmp, admin.port, "--workers", "1").start()
        yield admin, ms, frontend
    finally:
        if frontend is not None:
            frontend.stop()
        ms.stop()
        admin.stop()


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


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """A throwaway PostgreSQL server of its own (initdb in a temporary directory, a free port,
    trust auth) that a test may stop, crash and restart without touching the shared one.

    PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
    `postgres` user (through runuser) in a directory it owns."""

    def __init__(self, port: int | None = None) -> None:
        import pwd
        import tempfile

        self.port = port or free_port()
        self.bin = postgres_bin_dir()
        self.base = Path(tempfile.mkdtemp(prefix="sax-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.base.chmod(0o755)
        self._initialized = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of its `postgres` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def start(self) -> "PrivatePostgres":
        if not self._initialized:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "--no-instructions")
            self._initialized = True
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", opts,
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """`fast` (clean shutdown) or `immediate` (a crash: recovery from the WAL at next start)."""
        if self._initialized and (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def cleanup(self) -> None:
        import shutil

        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        yield pg.start()
    finally:
        pg.cleanup()


class TcpProxy:
    """A stand-in for a Kubernetes Service in front of several processes: each accepted
    connection goes to the first backend in `backends` that accepts it; with none (or none
    accepting) the caller's connection is closed at once. `backends` may change at any time,
    as endpoints do when a pod dies."""

    def __init__(self, backends: list[str] | None = None) -> None:
        self.backends = list(backends or [])
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        serve_connections(self._sock, self._serve)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_backends(self, backends: list[str]) -> None:
        self.backends = list(backends)

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        for backend in list(self.backends):
            host, port = backend.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=2)
                upstream.settimeout(None)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return
        with self._lock:
            self._conns.update((client, upstream))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):  # either side gone: both go (a reset reaches the caller)
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(upstream)
        client.close()
        upstream.close()

    def drop_connections(self) -> None:
        """Closes every proxied connection (what callers of a dead pod see)."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()
        self.drop_connections()
