"""The cell's infrastructure in tests: PostgreSQL databases (on the shared server or a private
one a test may crash) and the GCS emulator."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from tests.netutil import free_port

PG_ADMIN_URL = os.environ.get("SAX_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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
