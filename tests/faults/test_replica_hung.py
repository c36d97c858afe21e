"""A hung replica (SIGSTOP on its process group: sockets open, nothing answers).

Requests that landed on it end within the caller's timeout (the openai SDK) or the
frontend's --upstream-timeout (a 504), never later; after the heartbeat timeout the admin
stops routing to it and the traffic goes to the other replica without a failure. Resumed,
the server rejoins the cell.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests

from tests.cluster import FrontendProcess, wait_until
from tests.faults.conftest import HEARTBEAT_TIMEOUT_S, MODEL, FaultCell
from tests.faults.harness import Load, record

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 2.0
UPSTREAM_TIMEOUT_S = 3.0
SLACK_S = 2.5               # thread scheduling on two busy cores
BURST = 8                   # concurrent calls: least-outstanding routing sends some to each replica


def _sdk_call(url: str, go: threading.Barrier) -> tuple[str, float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    go.wait()
    t0 = time.monotonic()
    try:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
        outcome = "answered"
    except openai.APITimeoutError:
        outcome = "timeout"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    return outcome, time.monotonic() - t0


def _plain_call(url: str, go: threading.Barrier) -> tuple[int, Any, float]:
    go.wait()
    t0 = time.monotonic()
    r = requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4},
                      timeout=UPSTREAM_TIMEOUT_S + 30)
    return r.status_code, r.json(), time.monotonic() - t0


def test_hung_replica_timeouts_and_rotation(fault_cell: FaultCell) -> None:
    c = fault_cell
    holders = c.settled(MODEL, 2)
    victim = c.server(holders[0])
    # A frontend of its own with a short upstream timeout (one worker: one router).
    fe = FrontendProcess(c.tmp, c.service.address, "--workers", "1", "--upstream-timeout",
                         str(UPSTREAM_TIMEOUT_S), name="short-timeout").start()
    load: Load | None = None
    try:
        r = requests.post(f"{fe.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert r.status_code == 200, r.text

        victim.pause()
        stopped = time.monotonic()
        # Two bursts at once: the SDK with its own timeout through the cell's frontend, plain
        # calls through the short-timeout frontend. Some of each land on the hung replica.
        go = threading.Barrier(2 * BURST)
        with ThreadPoolExecutor(2 * BURST) as pool:
            sdk = [pool.submit(_sdk_call, c.frontend.url, go) for _ in range(BURST)]
            plain = [pool.submit(_plain_call, fe.url, go) for _ in range(BURST)]
            sdk_results = [f.result(60) for f in sdk]
            plain_results = [f.result(60) for f in plain]
        # The caller's own timeout is honoured...
        assert all(o in ("answered", "timeout") for o, _ in sdk_results), sdk_results
        timed_out = [s for o, s in sdk_results if o == "timeout"]
        assert timed_out, f"no SDK call landed on the hung replica: {sdk_results}"
        assert max(s for _, s in sdk_results) <= CLIENT_TIMEOUT_S + SLACK_S, sdk_results
        # ...and so is the frontend's --upstream-timeout: a 504 in the OpenAI envelope.
        assert all(code == 200 or (code == 504 and body["error"]["code"] == "upstream_timeout")
                   for code, body, _ in plain_results), plain_results
        gateway = [s for code, _, s in plain_results if code == 504]
        assert gateway, f"no call landed on the hung replica: {plain_results}"
        assert all(UPSTREAM_TIMEOUT_S - 0.5 <= s <= UPSTREAM_TIMEOUT_S + SLACK_S for s in gateway), gateway
        assert all(s <= UPSTREAM_TIMEOUT_S + SLACK_S for _, _, s in plain_results), plain_results
        record("hung replica: SDK calls with a 2 s timeout on it returned after (max)", max(timed_out), "s")
        record("hung replica: frontend --upstream-timeout 3 answered 504 after (max)", max(gateway), "s")

        # Out of rotation once its heartbeats are overdue.
        wait_until(lambda: victim.address not in c.locate(MODEL), timeout=HEARTBEAT_TIMEOUT_S + 30,
                   interval=0.1, what="the hung server out of the model's locations")
        out_s = time.monotonic() - stopped
        assert out_s >= HEARTBEAT_TIMEOUT_S - 1.0, "taken out before its heartbeats were overdue"
        record("hung replica: out of rotation after (heartbeat timeout 3 s)", out_s, "s")
        # The frontends long-poll the locations and see the change within the admin's poll
        # interval (0.2 s); give them that, generously.
        time.sleep(1.0)

        # From now on every request is answered by the other replica; none fails or waits.
        load = Load(c.frontend.url, MODEL, clients=8).start()
        for _ in range(10):
            r = requests.post(f"{fe.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                              timeout=UPSTREAM_TIMEOUT_S + 10)
            assert r.status_code == 200, r.text
        wait_until(lambda: load.ok_count() >= 40, timeout=60, what="40 answers under load")  # type: ignore[union-attr]
        load.stop()
        assert not load.failures, load.summary()
        slowest = max(o.ended - o.started for o in load.snapshot())
        assert slowest < 10, f"a request took {slowest:.1f}s: it waited on the hung replica"
        record("hung replica: requests after it left rotation", load.summary())
    finally:
        if load is not None:
            load.stop()
        fe.stop()
        victim.resume()
    # Resumed, the server heartbeats again and is back in the cell (its copy of the model is
    # adopted back, or it unloads it where the model was placed elsewhere meanwhile).
    resumed = time.monotonic()
    wait_until(lambda: victim.address in c.alive(), timeout=60, what="the resumed server back")
    c.settled(MODEL, 2)
    record("hung replica: SIGCONT -> model back at 2 replicas", time.monotonic() - resumed, "s")
