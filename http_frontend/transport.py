"""A lean HTTP/1.1 transport for the router's calls to replicas.

The client router (client.router.Router) decides where a call goes, counts
outstanding requests and retries before the first byte; it sends through
`router.session.post(...)`. `requests` costs about 1 ms of CPU per call, more
than everything else the frontend does, so the frontend plugs this transport
in instead: keep-alive `http.client` connections pooled per replica, answers
that look like `requests` responses as far as the router and RoutedResponse
use them, failures raised as `requests` exceptions (which the router handles),
and every attempt recorded for the metrics (see metrics.observe_attempts).
"""
from __future__ import annotations

import http.client
import json as jsonlib
import select
import socket
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlencode, urlsplit

import requests

from admin_server.serving import hung_up
from http_frontend.metrics import record_attempt

READ_CHUNK = 65536


class CallerGone(requests.ReadTimeout):
    """The frontend's caller hung up while a replica was working on its request. A ReadTimeout
    to the router: it releases the replica without marking it suspect and does not retry."""


_local = threading.local()


@contextmanager
def watching(caller: socket.socket | None) -> Iterator[None]:
    """Within the block, calls made by this thread give up as soon as `caller` hangs up."""
    previous = getattr(_local, "caller", None)
    _local.caller = caller
    try:
        yield
    finally:
        _local.caller = previous


def _wait_for_answer(conn: http.client.HTTPConnection, caller: socket.socket, timeout: float | None) -> None:
    """Waits for the replica's first bytes, watching the caller: raises CallerGone when it hangs
    up first (a non-streaming answer only starts when the whole generation is done)."""
    p = select.poll()
    p.register(conn.sock, select.POLLIN)
    p.register(caller, select.POLLIN | select.POLLRDHUP)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        events = dict(p.poll(left))
        if not events:
            raise socket.timeout("no answer")
        if conn.sock.fileno() in events:
            return
        if hung_up(caller):
            raise CallerGone("the caller hung up")
        p.unregister(caller)  # it sent more (pipelining): stop watching it


def _dropped(sock: socket.socket | None) -> bool:
    """True when an idle keep-alive connection was closed by the server (or is unusable)."""
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])  # readable while idle: EOF or junk
    except (OSError, ValueError):
        return True


class Response:
    """The part of `requests.Response` the router and RoutedResponse use."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 release: Any) -> None:
        self._resp, self._conn, self._release = resp, conn, release
        self.status_code = resp.status
        self.headers = resp.headers
        self.raw = self
        self._content: bytes | None = None
        self._closed = False

    # -- body ------------------------------------------------------------------------------------
    @property
    def content(self) -> bytes:
        if self._content is None:
            try:
                self._content = self._resp.read()
            finally:
                self.close()
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    def stream(self, amt: int = READ_CHUNK, decode_content: bool = False) -> Iterator[bytes]:
        """Bytes as they arrive (one chunk of a chunked answer at a time)."""
        while True:
            data = self._resp.read1(amt)
            if not data:
                return
            yield data

    def iter_lines(self) -> Iterator[bytes]:
        buf = b""
        for data in self.stream():
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
        if buf:
            yield buf

    # -- ending ----------------------------------------------------------------------------------
    def abort(self) -> None:
        """Shuts the socket down so a thread blocked reading it wakes up, and the replica sees
        the connection go (which cancels its generation)."""
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Back to the pool when the answer was read to its end, else the connection closes."""
        if self._closed:
            return
        self._closed = True
        if self._resp.isclosed() and not self._resp.will_close:
            self._release(self._conn)
        else:
            self._resp.close()
            self._conn.close()


class Session:
    """`post`/`get`/`close` over pooled keep-alive connections, one pool per replica address."""

    def __init__(self, pool_size: int = 64) -> None:
        self.pool_size = pool_size
        self._idle: dict[str, list[http.client.HTTPConnection]] = defaultdict(list)
        self._lock = threading.Lock()
        self.trust_env = False

    def _connection(self, host: str, port: int, connect_timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        key = f"{host}:{port}"
        with self._lock:
            idle = self._idle[key]
            while idle:
                conn = idle.pop()
                if not _dropped(conn.sock):
                    return conn, True
                conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        try:
            conn.connect()
        except socket.timeout as e:
            raise requests.ConnectTimeout(f"connect to {key} timed out") from e
        except OSError as e:
            raise requests.ConnectionError(f"connect to {key} failed: {e}") from e
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        key = f"{conn.host}:{conn.port}"
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self.pool_size:
                idle.append(conn)
                return
        conn.close()

    def request(self, method: str, url: str, *, data: bytes | None = None, json: Any = None,
                headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                timeout: Any = None, stream: bool = False) -> Response:
        u = urlsplit(url)
        host, port = u.hostname or "localhost", u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "") + (
            ("&" if u.query else "?") + urlencode(params) if params else "")
        body = data if data is not None else (jsonlib.dumps(json).encode() if json is not None else None)
        connect_timeout, read_timeout = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        t0 = time.perf_counter()
        replica = f"{host}:{port}"
        try:
            for attempt in range(2):
                conn, reused = self._connection(host, port, connect_timeout or 3.0)
                conn.sock.settimeout(read_timeout)
                try:
                    conn.request(method, path, body, hdrs)
                    caller = getattr(_local, "caller", None)
                    if caller is not None:
                        _wait_for_answer(conn, caller, read_timeout)
                    resp = conn.getresponse()
                    break
                except CallerGone:
                    conn.close()  # the replica sees the connection go
                    raise
                except socket.timeout as e:
                    conn.close()
                    raise requests.ReadTimeout(f"{replica}: no answer in {read_timeout}s") from e
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    conn.close()
                    if reused and attempt == 0:
                        continue  # the server closed an idle keep-alive connection: once more, fresh
                    raise requests.ConnectionError(f"{replica} dropped the connection: {e}") from e
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    raise requests.ConnectionError(f"{replica}: {e}") from e
        except requests.RequestException as e:
            record_attempt(replica, type(e).__name__, None)
            raise
        record_attempt(replica, str(resp.status), time.perf_counter() - t0)
        out = Response(resp, conn, self._release)
        if not stream:
            out.content  # noqa: B018 - read it all now, as requests does
        return out

    def post(self, url: str, **kwargs: Any) -> Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()
