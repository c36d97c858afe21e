"""The frontend's HTTP/1.1 transport against canned answers on a real socket: framing by
Content-Length, chunks (extensions, trailers), EOF; keep-alive reuse; bodies cut short."""
from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

from client.transport import Unreachable
from http_frontend.transport import FrontendTransport
from tests.cluster import recv_request, serve_connections


@pytest.fixture
def canned() -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A server that answers the i-th request on any connection with answers[i]; an answer
    ending in b"<close>" is sent without it and the connection closed. Requests are recorded."""
    answers: list[bytes] = []
    requests_seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not stop.is_set():
                got = recv_request(conn, buf)
                if got is None:
                    return
                head, body, buf = got
                requests_seen.append(head + b"\r\n\r\n" + body)
                answer = answers[len(requests_seen) - 1]
                conn.sendall(answer.removesuffix(b"<close>"))
                if answer.endswith(b"<close>"):
                    return

    serve_connections(listener, serve)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", answers, requests_seen
    stop.set()
    listener.close()


def test_framings_and_keep_alive(canned: tuple[str, list[bytes], list[bytes]]) -> None:
    url, answers, seen = canned
    answers += [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end<close>",
    ]
    session = FrontendTransport(pool_size=4)
    r = session.send("POST", url + "/v1/completions", data=b'{"x": 1}',
                     headers={"Content-Type": "application/json", "X-Request-Id": "rid-1"}, timeout=(5, 5))
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, b'{"a": true}', "application/json")
    r = session.send("POST", url + "/s", data=b"{}", timeout=(5, 5), stream=True)
    assert list(r.stream()) == [b"hello", b" world"] and r.headers["X-A"] == "1, 2"
    r.close()
    r = session.send("GET", url + "/tokenizer_info?model=%2Fsax%2Ftest%2Flm", timeout=(5, 5))
    assert (r.status_code, r.headers["Retry-After"], r.content) == (503, "1", b"")
    idle = session._idle[url.removeprefix("http://")]
    assert len(idle) == 1  # one connection carried the three answers
    r = session.send("POST", url + "/eof", data=b"{}", timeout=(5, 5))
    assert r.content == b"until the end" and idle == []  # a body ended by EOF: not reused
    assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"X-Request-Id: rid-1\r\n" in seen[0]
    assert seen[0].endswith(b'\r\n\r\n{"x": 1}') and b"Content-Length: 8\r\n" in seen[0]
    assert seen[2].startswith(b"GET /tokenizer_info?model=%2Fsax%2Ftest%2Flm HTTP/1.1\r\n")


def test_cut_short_and_dropped(canned: tuple[str, list[bytes], list[bytes]]) -> None:
    url, answers, _ = canned
    answers += [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut\": <close>",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n<close>",
        b"<close>",
    ]
    session = FrontendTransport()
    with pytest.raises(Unreachable, match="before the answer's end"):
        session.send("POST", url + "/a", data=b"{}", timeout=(5, 5))
    r = session.send("POST", url + "/b", data=b"{}", timeout=(5, 5), stream=True)
    with pytest.raises(Unreachable):
        list(r.stream())
    with pytest.raises(Unreachable, match="dropped the connection"):
        session.send("POST", url + "/c", data=b"{}", timeout=(5, 5))
