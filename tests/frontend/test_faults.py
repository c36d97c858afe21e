"""Faults: retries before the first byte, replica refusals, streams that break, and client
disconnects that close the upstream stream (and cancel generation on a real replica)."""
from __future__ import annotations

import os
import signal
import socket
import time

import openai
import pytest
import requests

from tests.cluster import wait_until
from tests.frontend.conftest import API_KEYS, MODEL, Cell, FrontendProcess, metric, sse_events


def test_dead_replica_is_retried_before_the_first_byte(cell: Cell) -> None:
    """/sax/test/flaky has two ready replicas; one refuses connections."""
    for _ in range(20):
        r = requests.post(f"{cell.url}/v1/completions", json={"model": "/sax/test/flaky", "prompt": "hi"},
                          timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == f"fake:{cell.flaky_live.address}"
    assert metric(cell.url, "sax_frontend_retries_total", model="/sax/test/flaky", reason="ConnectionError",
                  replica=cell.flaky_dead.address) >= 1


def test_answer_cut_off_mid_body_is_replayed_and_counted(cell: Cell) -> None:
    """A replica that dies after its headers has sent the caller nothing yet: the call goes to the
    other replica, and the retry counts under reason `broken_body`."""
    from tests.frontend.conftest import FakeReplica, active, publish

    cutter, other = FakeReplica(cell.admin.url, "test.cut").start(), FakeReplica(cell.admin.url, "test.cut").start()
    try:
        publish(cell.admin.url, "/sax/test/cut", "test.cut", 2)
        wait_until(lambda: active(cell.admin.url, "/sax/test/cut") == 2, timeout=60, what="two replicas")
        for _ in range(12):
            r = requests.post(f"{cell.url}/v1/completions", timeout=30,
                              json={"model": "/sax/test/cut", "prompt": f"cut:{cutter.address}"})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == f"fake:{other.address}", r.text
        assert any(b.get("prompt") == f"cut:{cutter.address}" for b, _ in cutter.seen)
        assert metric(cell.url, "sax_frontend_retries_total", model="/sax/test/cut", reason="broken_body",
                      replica=cutter.address) >= 1
    finally:
        requests.delete(f"{cell.admin.url}/models/sax/test/cut", timeout=10)
        cutter.stop()
        other.stop()


def test_replica_at_capacity_is_a_429(cell: Cell) -> None:
    r = requests.post(f"{cell.url}/v1/completions", json={"model": "/sax/test/fake", "prompt": "refuse"},
                      timeout=30)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_stream_that_breaks_ends_with_an_error_event(cell: Cell) -> None:
    body = {"model": "/sax/test/fake", "prompt": "break", "stream": True}
    events = sse_events(requests.post(f"{cell.url}/v1/completions", json=body, stream=True, timeout=30))
    assert [e["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
    assert events[2]["error"]["code"] == "stream_error" and events[3] == "[DONE]"
    client = openai.OpenAI(base_url=f"{cell.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.completions.create(model="/sax/test/fake", prompt="break", stream=True))


def _read_then_hang_up(url: str, body: bytes, events: int) -> None:
    """Reads `events` SSE events from a raw HTTP/1.1 stream, then closes the socket."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while seen.count(b"data: ") < events:
            chunk = s.recv(4096)
            assert chunk, "stream ended early"
            seen += chunk


def test_client_disconnect_closes_the_upstream_stream(cell: Cell) -> None:
    cell.fake.disconnected.clear()
    _read_then_hang_up(cell.url, b'{"model": "/sax/test/fake", "prompt": "forever", "stream": true}', 2)
    assert cell.fake.disconnected.wait(5), "the replica's stream was not closed"
    # Merged streams (a prompt list) close every upstream stream too.
    cell.fake.disconnected.clear()
    _read_then_hang_up(cell.url, b'{"model": "/sax/test/fake", "prompt": ["a", "b"], "stream": true}', 2)
    assert cell.fake.disconnected.wait(5), "the replicas' streams were not closed"


def test_client_disconnect_cancels_generation_on_a_real_replica(cell: Cell) -> None:
    def cancelled() -> float:
        return sum(metric(u, "vllm:request_success_total", model_name=MODEL, finished_reason="cancelled")
                   for u in cell.model_server_urls)

    before = cancelled()
    # As long a generation as test.tiny allows (4 samples with 20 alternatives each: ~0.1 s).
    body = (b'{"model": "%s", "prompt": "Once upon a time", "max_tokens": 110, "ignore_eos": true, '
            b'"n": 4, "logprobs": 20, "stream": true}' % MODEL.encode())
    t0 = time.monotonic()
    # Hang up right after sending: however late this process gets the CPU back, the frontend
    # finds the caller gone before relaying the first event and drops the replica's stream.
    _read_then_hang_up(cell.url, body, 0)
    wait_until(lambda: cancelled() > before, timeout=10, what="the replica to cancel the request")
    assert time.monotonic() - t0 < 10


def test_sigterm_drains_in_flight_streams(cell: Cell) -> None:
    """A frontend told to stop finishes the streams it is serving (graceful_timeout), then exits."""
    fe = FrontendProcess(cell.tmp, cell.admin.port, "--workers", "1", "--graceful-timeout", "20",
                         name="draining").start()
    try:
        body = {"model": "/sax/test/fake", "prompt": "count:40", "stream": True}  # 40 events, ~2 s
        with requests.post(f"{fe.url}/v1/completions", json=body, stream=True, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith(b"data: "))
            assert b'"t0"' in first
            os.killpg(fe.pid, signal.SIGTERM)
            rest = [line for line in lines if line.startswith(b"data: ")]
        assert len(rest) == 40 and rest[-1] == b"data: [DONE]"
        fe.proc.wait(20)  # type: ignore[union-attr]
        assert fe.proc.returncode == 0  # type: ignore[union-attr]
    finally:
        fe.stop()


def test_caller_hanging_up_frees_its_place_before_the_answer(cell: Cell) -> None:
    """Non-streaming calls too: the frontend drops the upstream call (and its in-flight slot)
    as soon as the caller hangs up, without waiting for the replica's answer."""
    url, fake = cell.secure.url, cell.fake
    fake.release.clear()
    host, port = url.removeprefix("http://").split(":")
    body = b'{"model": "/sax/test/fake", "prompt": "hang"}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (API_KEYS[0].encode(), len(body), body))
    try:
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
        for s in socks:
            s.sendall(request)
        wait_until(lambda: fake.hanging == 2, timeout=20, what="two held requests")
        for s in socks:
            s.close()  # the limit is 2: these held both places
        # Both places come back while the replica still holds the two requests.
        wait_until(lambda: requests.post(f"{url}/v1/completions", json={"model": "/sax/test/fake", "prompt": "hi"},
                                         headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                                         timeout=10).status_code == 200, timeout=10, what="places back")
        assert fake.hanging == 2
    finally:
        fake.release.set()
    wait_until(lambda: cell.secure.log().count("error=client_disconnect") >= 2, timeout=10,
               what="the hang-ups in the access log")
