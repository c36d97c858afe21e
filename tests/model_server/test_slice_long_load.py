"""A long load on a two-host slice does not make it look dead.

`SliceLeader.load` holds the slice's step lock for the whole load (the followers load in the
same order and cannot run another engine's steps meanwhile), but neither the heartbeat (the
manager's report: statuses and engine counters) nor the side channel's pings and watchdog take
that lock. With a cold compilation cache the load (checkpoint read, every program compiled on
both ranks, the warm-up's collectives) outlasts the heartbeat timeout (the model server's
default, 6 s; the test admin's usual 1.5 s is within what a starved process on a shared
2-core machine misses anyway, whatever it runs): the admin sees the server alive at every look,
with its replica LOADING and then LOADED, and rank 0 never declares its follower lost.
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.cluster import AdminProcess
from tests.model_server.test_slice_cell import MODEL, OVERRIDES, SLICE_ENV, Slice, _servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEAD_AFTER_S = 6.0  # the model server's default heartbeat timeout (3 heartbeats of 2 s)


def test_long_load_keeps_the_slice_alive(tmp_path, tiny_hf_dir):
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root"),
                         extra_args=["--heartbeat-timeout", str(DEAD_AFTER_S)]).start()
    # the side channel's timeout above this machine's worst stalls of a follower compiling
    # (3.2 s seen at load average 28): a follower starved that long reads as hung, by design
    env = {**SLICE_ENV, "SAX_COMPILATION_CACHE": str(tmp_path / "xla-cold"), "SAX_SLICE_TIMEOUT": "10"}
    pair = None
    try:
        pair = Slice(tmp_path, admin.port, "long", env)
        pair.start()
        addr = pair.leader.address
        deadline = time.monotonic() + 60
        while addr not in _servers(admin):
            assert time.monotonic() < deadline, "the slice never registered"
            time.sleep(0.2)
        requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": MODEL, "model_path": "lm.llama", "checkpoint": str(tiny_hf_dir), "replicas": 1,
            "overrides": OVERRIDES}).raise_for_status()
        looks: list[tuple[float, bool, float, str]] = []  # (time, alive, heartbeat age, replica status)
        deadline = time.monotonic() + 600
        while not looks or looks[-1][3] not in ("LOADED", "FAILED", "GONE"):
            assert time.monotonic() < deadline, f"no LOADED replica: {looks[-3:]}"
            srv = _servers(admin).get(addr)  # a dead server leaves the listing
            if srv is None:
                looks.append((time.monotonic(), False, float("inf"), "GONE"))
                continue
            status = next((m["status"] for m in srv["models"] if m["model_id"] == MODEL), "NONE")
            looks.append((time.monotonic(), srv["alive"], srv["last_heartbeat_age_s"], status))
            time.sleep(0.1)
        loading = [t for t, _, _, st in looks if st == "LOADING"]
        span = loading[-1] - loading[0] if loading else 0.0
        print(f"[slice figure] load seen LOADING for {span:.1f} s over {len(loading)} looks; "
              f"largest heartbeat age {max(a for _, _, a, _ in looks):.2f} s")
        assert looks[-1][3] == "LOADED", looks[-3:]
        # the load outlasted several heartbeat timeouts (else this shows nothing), and the
        # server was alive at every look
        assert span > 3 * DEAD_AFTER_S, f"the load took only {span:.1f} s"
        assert all(alive for _, alive, _, _ in looks), [x for x in looks if not x[1]][:3]
        assert "slice failed" not in pair.leader.log()
    finally:
        if pair is not None:
            pair.stop()
        admin.stop()
