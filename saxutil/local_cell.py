"""`saxutil up`: a whole local cell in one terminal (admin, model server, frontend).

The children never outlive it: each runs in a process group of its own (stopped as a whole),
asks the kernel for SIGTERM when `saxutil up` dies however it dies (PR_SET_PDEATHSIG: kill -9
included), and SIGINT, SIGTERM, SIGHUP or a broken output pipe (`saxutil up | tee log`, then
Ctrl-C) all stop the cell first and report after, to a terminal that may be gone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil
import requests

from client import sax
from client.overrides import parse_overrides

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the signal handlers and process groups still stop the cell


def _say(message: str, err: bool = False) -> None:
    """Echo that never fails: the terminal or the pipe to `tee` may be gone."""
    try:
        click.echo(message, err=err)
        (sys.stderr if err else sys.stdout).flush()
    except (OSError, ValueError):
        pass


def port_holder(port: int) -> str | None:
    """None when 127.0.0.1:`port` can be bound, else who holds it (pid and command line)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return None
        except OSError:
            pass
    try:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                try:
                    cmd = " ".join(psutil.Process(c.pid).cmdline())[:120]
                except psutil.Error:
                    cmd = "?"
                return f"pid {c.pid} ({cmd})"
    except psutil.AccessDenied:
        pass
    return "another process (not visible to this user)"


class _Child:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def _wait_healthy(child: _Child, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise click.ClickException(f"{child.name} exited; see {child.log_path}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"{child.name} not healthy after {timeout:.0f}s; see {child.log_path}")


@click.command()
@click.option("--root", default="./sax-root", show_default=True, help="SAX_ROOT (SQLite and snapshots).")
@click.option("--admin-port", default=10000, show_default=True)
@click.option("--model-server-port", default=10001, show_default=True)
@click.option("--frontend-port", default=8888, show_default=True)
@click.option("--model-id", default="/sax/test/demo", show_default=True)
@click.option("--model-path", default="test.tiny", show_default=True, help="e.g. lm.hf for a HF directory.")
@click.option("--checkpoint", default="None", show_default=True, help="e.g. a Hugging Face directory on disk.")
@click.option("--override", "overrides", multiple=True, metavar="KEY=JSON",
              help="Override for the demo model, e.g. num_slots=4 (repeatable).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for each step.")
def up(root: str, admin_port: int, model_server_port: int, frontend_port: int, model_id: str,
       model_path: str, checkpoint: str, overrides: tuple[str, ...], timeout: float) -> None:
    """Start a local cell: admin, one model server and the HTTP frontend, then publish a demo model.

    Ctrl-C stops all of them.

    Example: saxutil up --root ./sax-root
    """
    root_path = Path(root).absolute()
    log_dir = root_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cell = "/" + "/".join(model_id.strip("/").split("/")[:2])
    admin = f"localhost:{admin_port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAX_CELL": cell, "SAX_ADMIN": admin}
    py = sys.executable
    children: list[_Child] = []
    interrupted = False

    def stop_all() -> None:
        _say("\nstopping the cell...", err=True)
        for child in reversed(children):
            try:
                child.stop()
            except Exception:  # noqa: BLE001 - the others are stopped whatever happens to one
                pass
        _say("stopped", err=True)

    def on_signal(signum: int, _frame: object) -> None:
        # Only the first Ctrl-C (or SIGTERM, SIGHUP) interrupts: a second one must not cut the
        # stop short, as the children run in their own sessions and nothing else would stop them.
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt

    busy = [f"port {port} ({name}) is in use by {holder}" for name, port in
            (("admin", admin_port), ("model server", model_server_port), ("frontend", frontend_port))
            if (holder := port_holder(port))]
    if busy:
        raise click.ClickException("; ".join(busy) + ": stop it, or choose other ports "
                                   "(--admin-port, --model-server-port, --frontend-port)")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        children.append(_Child("admin", [py, "-m", "admin_server", "--root", str(root_path), "--cell", cell,
                                         "--port", str(admin_port), "--host", "127.0.0.1"], log_dir, env))
        _wait_healthy(children[-1], f"http://localhost:{admin_port}/healthz", timeout)
        _say(f"admin server   http://localhost:{admin_port}  (state in {root_path})")
        children.append(_Child("model-server", [
            py, "-m", "model_server", "--admin", admin, "--port", str(model_server_port), "--host", "127.0.0.1",
            "--advertise", f"localhost:{model_server_port}"], log_dir, env))
        _wait_healthy(children[-1], f"http://localhost:{model_server_port}/healthz", timeout)
        _say(f"model server   http://localhost:{model_server_port}")
        has_frontend = importlib.util.find_spec("http_frontend") is not None
        if has_frontend:
            children.append(_Child("frontend", [py, "-m", "http_frontend", "--admin", admin, "--port",
                                                str(frontend_port), "--host", "127.0.0.1"], log_dir, env))
            _wait_healthy(children[-1], f"http://localhost:{frontend_port}/healthz", timeout)
            _say(f"HTTP frontend  http://localhost:{frontend_port}")
        try:
            sax.Publish(model_id, model_path, checkpoint, 1, parse_overrides(overrides), admin=admin)
        except sax.AlreadyExists:
            pass  # restored from an earlier run's state
        _say(f"publishing {model_id} ({model_path}, {checkpoint})...")
        sax.WaitForReady(model_id, 1, timeout, admin=admin)
        _say(f"{model_id} is ready. Logs in {log_dir}. Try:")
        if has_frontend:
            _say(f"  curl -s localhost:{frontend_port}/generate -d "
                 f"'{{\"model\": \"{model_id}\", \"query\": \"hello\"}}'")
            _say(f"  curl -s localhost:{frontend_port}/v1/completions -H 'Content-Type: application/json' "
                 f"-d '{{\"model\": \"{model_id}\", \"prompt\": \"hello\", \"max_tokens\": 8}}'")
        _say(f"  saxutil --admin {admin} lm.generate {model_id} hello")
        _say("Ctrl-C stops the cell.")
        while all(c.alive() for c in children):
            time.sleep(0.5)
        dead = [c.name for c in children if not c.alive()]
        raise click.ClickException(f"{', '.join(dead)} exited; see {log_dir}")
    except KeyboardInterrupt:
        pass
    finally:
        stop_all()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
