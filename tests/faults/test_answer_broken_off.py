"""A replica that dies between the headers and the body of a non-streaming answer.

Nothing of that answer has reached the caller, so the router sends the call to another
replica (as it does for failures before the first byte), through the Python client's
`requests` session and through the frontend's own transport alike. A read timeout is a
deadline, not a dead replica: it is not retried.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from client import errors
from client.router import Router
from client.transport import TransportError
from http_frontend.transport import FrontendTransport
from tests.cluster import recv_request, serve_connections

ANSWER = b'{"choices": [{"text": "from the good replica"}]}'


class _Admin:
    """The part of AdminClient the router uses: both replicas are ready."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    def locate(self, model_id: str, *, version: str | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        if version is not None:
            threading.Event().wait(min(wait_s, 30))
        return {"model_id": model_id, "addresses": self.addresses, "version": "v1", "model_path": "test.tiny"}


class _Replica:
    """A raw HTTP/1.1 replica: 'good' answers; 'dies' sends its headers (the answer is 200 with a
    Content-Length) and half the body, then drops the connection; 'slow' sends its headers and
    then nothing."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.calls = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.release = threading.Event()
        serve_connections(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if recv_request(conn) is None:
                return
            self.calls += 1
            headers = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                       b"Connection: close\r\n\r\n" % len(ANSWER))
            if self.kind == "good":
                conn.sendall(headers + ANSWER)
            elif self.kind == "dies":
                conn.sendall(headers + ANSWER[:10])
                conn.shutdown(socket.SHUT_RDWR)
            else:
                conn.sendall(headers)
                self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def replicas() -> Any:
    made: list[_Replica] = []

    def make(*kinds: str) -> list[_Replica]:
        made.extend(_Replica(k) for k in kinds)
        return made[-len(kinds):]
    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("transport", ["requests", "frontend"])
def test_broken_off_answer_is_retried_on_another_replica(replicas: Any, transport: str) -> None:
    dies, good = replicas("dies", "good")
    router = Router(_Admin([dies.address, good.address]),  # type: ignore[arg-type]
                    transport=FrontendTransport() if transport == "frontend" else None)
    try:
        # Whichever replica is picked first, the answer comes from the good one. Picks are random
        # between equally loaded replicas (six tries missed the dying one 1 time in 64): call at
        # least twice, and on until it has been tried.
        tries = 0
        while tries < 40 and (not dies.calls or tries < 2):
            tries += 1
            with router.post("/sax/test/lm", "/v1/completions", {"prompt": "hi"}, stream=True, timeout=10) as r:
                assert r.json() == {"choices": [{"text": "from the good replica"}]}
                assert r.status_code == 200 and r.address == good.address
        assert dies.calls >= 1 and router.retries >= 1
        assert router.outstanding(dies.address) == 0 and router.outstanding(good.address) == 0
    finally:
        router.close()


@pytest.mark.parametrize("transport", ["requests", "frontend"])
def test_body_that_never_comes_is_a_deadline_not_a_retry(replicas: Any, transport: str) -> None:
    (slow,) = replicas("slow")
    router = Router(_Admin([slow.address]),  # type: ignore[arg-type]
                    transport=FrontendTransport() if transport == "frontend" else None)
    try:
        r = router.post("/sax/test/lm", "/v1/completions", {"prompt": "hi"}, stream=True, timeout=0.5)
        with pytest.raises(TransportError) as info:
            r.content()
        assert isinstance(info.value, TimeoutError) and not isinstance(info.value, errors.SaxError)
        assert slow.calls == 1 and router.outstanding(slow.address) == 0
    finally:
        router.close()
