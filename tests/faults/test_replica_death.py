"""A serving replica dies (kill -9) under load.

32 clients send non-streaming completions through the frontend and six more keep long
streams going while one of the model's two replicas is killed. No non-streaming request
fails (those on the dead replica are retried elsewhere before their first byte); every
stream that was mid-flight on it ends with an error event and `[DONE]`, none hangs; the
admin places a new replica on the third server and the frontend sends traffic to it. (Once
the admin has placed it, the 32 clients make way for 4, so that the new replica's load is not
starved of CPU on a two-core machine.)

To be sure some streams are mid-flight on the victim when it dies, it is frozen first
(SIGSTOP) until a stream is seen stalled on it, then killed.
"""
from __future__ import annotations

import time

import pytest

from tests.cluster import metric, wait_until
from tests.faults.conftest import HEARTBEAT_TIMEOUT_S, MODEL, FaultCell
from tests.faults.harness import Load, StreamLoad, record

pytestmark = pytest.mark.slow

STALL_S = 1.5   # a stream with no event for this long while the victim is frozen is on the victim


def _served(url: str) -> float:
    return metric(url, "vllm:request_success_total", model_name=MODEL)


def test_replica_death_under_load(fault_cell: FaultCell) -> None:
    c = fault_cell
    c.ensure_servers(3)
    holders = c.settled(MODEL, 2)
    victim = c.server(holders[0])
    third = next(s for s in c.running() if s.address not in holders)

    load = Load(c.frontend.url, MODEL, clients=32).start()
    recovery: Load | None = None
    streams = StreamLoad(c.frontend.url, MODEL, clients=6, max_tokens=100).start()
    try:
        wait_until(lambda: load.ok_count() >= 64 and sum(s.end == "done" for s in streams.snapshot()) >= 3,
                   timeout=120, what="the load running")
        # Freeze the victim until a stream is stalled on it (streams on the other replica keep moving).
        frozen: list = []
        silent = killed = 0.0
        for _ in range(10):
            # Freeze only once a stream has had its first event (past the replica's queue): a stream
            # still queued says nothing about where it runs.
            wait_until(lambda: any(s.in_progress and s.last_event is not None for s in streams.snapshot()),
                       timeout=30, interval=0.02, what="a stream in flight")
            victim.pause()
            silent = time.monotonic()
            time.sleep(STALL_S + 0.5)
            now = time.monotonic()
            frozen = [s for s in streams.snapshot()
                      if s.in_progress and s.last_event is not None and now - s.last_event >= STALL_S]
            if frozen:
                break
            victim.resume()
            time.sleep(1.0)
        assert frozen, "no stream was ever in flight on the victim"
        streams.stop_starting()
        victim.kill9()
        killed = time.monotonic()

        # Streams: all end (bounded read timeout, no hang); those on the victim with an error event.
        streams.join(timeout=60)
        everything = streams.snapshot()
        broken = [s.end for s in everything if s.end not in ("done", "error")]
        assert not broken, broken
        for s in frozen:
            assert s.end == "error", f"a stream stalled on the killed replica ended {s.end!r}"
            err = s.error_event()
            assert err["error"]["code"] == "stream_error" and err["error"]["type"] == "server_error", err
            assert s.events[-1][1] == "[DONE]"
            assert s.ended_at is not None and s.ended_at - killed < 15, "the error came late"
        errored = [s for s in everything if s.end == "error"]
        record("replica death: streams mid-flight on the killed replica / ended with an error event",
               f"{len(frozen)} / {len(errored)}")
        record("replica death: streams in all", len(everything))

        # The admin notices the death (heartbeat timeout) and places a replica on the third server.
        wait_until(lambda: any(r["address"] == third.address for r in c.detail()["replicas"]),
                   timeout=HEARTBEAT_TIMEOUT_S + 30, interval=0.1, what="a replica placed on the third server")
        placed_s = time.monotonic() - silent
        time.sleep(max(0.0, killed + 3.0 - time.monotonic()))  # 32 clients for 3 s after the kill at least
        load.stop()
        assert not load.failures, load.summary()
        record("replica death: non-streaming requests (32 clients)", load.summary())
        recovery = Load(c.frontend.url, MODEL, clients=4).start()

        # It loads, the admin routes to it, and the frontend sends it traffic.
        wait_until(lambda: third.address in c.locate(MODEL), timeout=180, interval=0.1,
                   what="the new replica routable")
        replaced_s = time.monotonic() - silent
        assert victim.address not in c.locate(MODEL)
        before = _served(third.url)
        wait_until(lambda: _served(third.url) >= before + 20, timeout=60, interval=0.2,
                   what="the frontend sending requests to the new replica")
        served_s = time.monotonic() - silent
        # Times from the victim's last breath (frozen, then killed `killed - silent` s later).
        record("replica death: victim frozen -> killed", killed - silent, "s")
        record("replica death: victim silent -> new replica placed (heartbeat timeout 3 s)", placed_s, "s")
        record("replica death: victim silent -> new replica LOADED and routable", replaced_s, "s")
        record("replica death: victim silent -> new replica answering frontend traffic", served_s, "s")
    finally:
        streams.stop_starting()
        load.stop()
        if recovery is not None:
            recovery.stop()
        victim.resume()
    assert not load.failures, load.summary()
    assert recovery is not None and not recovery.failures, recovery.summary()
    record("replica death: requests while the new replica loaded (4 clients)", recovery.summary())
    retries = metric(c.frontend.url, "sax_frontend_retries_total", model=MODEL, replica=victim.address)
    record("replica death: frontend retries on the killed replica", int(retries))
    assert sorted(c.locate(MODEL)) == sorted([holders[1], third.address])
