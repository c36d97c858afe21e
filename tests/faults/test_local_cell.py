"""`saxutil up`'s children never outlive it, whatever ends it: kill -9 of saxutil up itself,
SIGHUP (the terminal closed), SIGTERM, and Ctrl-C with the output piped to `tee` (which dies
first, so every later write to the pipe fails). A second `up` on busy ports refuses at once
and names the process that holds them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.cluster import REPO, free_port, wait_until


def up_command(tmp: Path, ports: list[int]) -> list[str]:
    return [sys.executable, "-m", "saxutil", "up", "--root", str(tmp / "root"), "--admin-port", str(ports[0]),
            "--model-server-port", str(ports[1]), "--frontend-port", str(ports[2]), "--timeout", "120"]


def started(log: Path) -> bool:
    return log.exists() and "HTTP frontend" in log.read_text(errors="replace")


def saxutil_up(tmp: Path, ports: list[int], *, tee: bool) -> tuple[subprocess.Popen, Path]:
    """`saxutil up` in a session of its own (a terminal's stand-in), output to a file or through
    `| tee`; returns once all three children serve."""
    log = tmp / "up.log"
    cmd = up_command(tmp, ports)
    if tee:
        shell = " ".join(cmd) + f" 2>&1 | tee {log}"
        proc = subprocess.Popen(["bash", "-c", shell], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL)
    else:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: started(log) or proc.poll() is not None, timeout=180, interval=0.2, what="cell started")
    assert started(log), log.read_text()
    return proc, log


def children_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_gone(procs: list[psutil.Process], ports: list[int], timeout: float = 60) -> float:
    t0 = time.monotonic()
    wait_until(lambda: not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
               timeout=timeout, interval=0.2, what="every cell process gone")
    took = time.monotonic() - t0
    for port in ports:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    return took


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-9", "SIGHUP", "SIGTERM", "tee-and-ctrl-c"])
def test_children_never_outlive_saxutil_up(tmp_path: Path, how: str) -> None:
    ports = [free_port() for _ in range(3)]
    proc, log = saxutil_up(tmp_path, ports, tee=how.startswith("tee"))
    try:
        cell = children_of(proc.pid)
        assert len([p for p in cell if "-m" in p.cmdline()]) >= 3, [p.cmdline() for p in cell]
        if how == "kill-9":
            os.kill(proc.pid, signal.SIGKILL)
        elif how == "tee-and-ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: bash, saxutil and tee alike
        else:
            os.kill(proc.pid, getattr(signal, how))
        took = assert_all_gone(cell, ports)
        print(f"[fault figure] saxutil up, {how}: every child gone after {took:.1f} s")
    finally:
        for p in children_of(proc.pid) if proc.poll() is None else []:
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_busy_ports_are_refused_naming_their_holder(tmp_path: Path) -> None:
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                               "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('up', flush=True); "
                               "time.sleep(120)", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        ports = [free_port(), free_port(), port]
        t0 = time.monotonic()
        r = subprocess.run(up_command(tmp_path, ports), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert f"port {port} (frontend) is in use by pid {holder.pid}" in r.stderr, r.stderr
        assert "is ready" not in r.stdout and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
        assert time.monotonic() - t0 < 30  # refused before starting anything
        assert not (tmp_path / "root" / "logs" / "admin.log").exists()
    finally:
        holder.kill()
