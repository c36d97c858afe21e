"""The slice's side channel sees a lost rank: kill -9 (its socket closes) at once, a frozen
one (SIGSTOP: its socket stays open, its pings stop) within the timeout; sends then fail and
replies stop being awaited. A real follower process on the other end."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from model_server.slice import SliceConfig
from model_server.slice.channel import LeaderChannel
from tests.cluster import REPO, free_port

FOLLOWER = """
import sys
from model_server.slice.channel import FollowerChannel
ch = FollowerChannel("127.0.0.1", int(sys.argv[1]), 1, timeout_s=30)
while True:
    msg = ch.recv()
    if msg[0] == "load":
        ch.send(("built", msg[1], None))
"""


def _pair(timeout_s: float):
    port = free_port()
    lost: list[tuple[float, str]] = []
    done = threading.Event()

    def on_lost(reason: str) -> None:
        lost.append((time.monotonic(), reason))
        done.set()

    leader = LeaderChannel(port, 1, timeout_s=timeout_s, on_lost=on_lost, host="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(port)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    leader.accept_all(30)
    return leader, proc, lost, done


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_lost_rank_is_noticed(how: str) -> None:
    leader, proc, lost, done = _pair(timeout_s=2.0)
    try:
        leader.send(("load", 7, None))
        assert leader.wait_replies("built", 7, 10) == {1: None}
        time.sleep(3.0)  # idle but alive: pings keep it in
        assert not lost
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        assert done.wait(10)
        took = lost[0][0] - t0
        if how == "kill":
            assert "is gone" in lost[0][1] and took < 1.0, lost
        else:
            assert "stopped answering" in lost[0][1] and 1.5 < took < 4.0, lost
        with pytest.raises(ConnectionError):
            leader.send(("ops", []))
        with pytest.raises(ConnectionError):
            leader.wait_replies("built", 8, 10)
        assert len(lost) == 1
    finally:
        proc.kill()
        proc.wait()
        leader.close()


def test_slice_flags() -> None:
    assert SliceConfig.parse(None) is None and SliceConfig.parse("1") is None
    cfg = SliceConfig.parse("2", "1", "10.0.0.1:8476")
    assert (cfg.hosts, cfg.rank, cfg.coordinator) == (2, 1, "10.0.0.1:8476")
    auto = SliceConfig.from_env({"SAX_SLICE_HOSTS": "auto", "LWS_WORKER_INDEX": "3"})
    assert auto.hosts is None and auto.rank == 3
    env = SliceConfig.from_env({"SAX_SLICE_HOSTS": "4", "SAX_SLICE_RANK": "0", "SAX_COORDINATOR": "h:1",
                                "SAX_SLICE_TIMEOUT": "2"})
    assert env.timeout_s == 2.0 and env.jax_heartbeat_timeout_s >= 12
    assert SliceConfig.from_env({"SAX_SLICE_HOSTS": "4"}, hosts="2", rank="1", coordinator="x:9").hosts == 2
    for bad in (("2", None, "h:1"), ("2", "2", "h:1"), ("2", "0", "nohost"), ("0", "0", "h:1")):
        with pytest.raises(ValueError):
            SliceConfig.parse(*bad)


def test_leader_stall_is_not_a_lost_rank() -> None:
    """Rank 0 itself not running for longer than the timeout (here: a busy main thread keeping
    the GIL, as a load can) does not make it declare the live follower lost."""
    leader, proc, lost, done = _pair(timeout_s=1.0)
    interval = sys.getswitchinterval()
    try:
        time.sleep(1.0)
        sys.setswitchinterval(10.0)  # the other threads of this process wait for the GIL
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            pass
        sys.setswitchinterval(interval)
        time.sleep(2.0)
        assert not lost, lost
        os.kill(proc.pid, signal.SIGSTOP)  # still noticed when it is the follower that stops
        assert done.wait(10) and "stopped answering" in lost[0][1]
    finally:
        sys.setswitchinterval(interval)
        proc.kill()
        proc.wait()
        leader.close()
