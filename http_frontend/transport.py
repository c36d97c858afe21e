"""A lean HTTP/1.1 transport for the router's calls to replicas (client.transport's protocol).

The client router (client.router.Router) decides where a call goes, counts outstanding
requests and retries before the first byte; it sends each attempt through its transport.
`requests` costs about 1 ms of CPU per call, more than everything else the frontend does, so
the frontend gives its router this transport instead: keep-alive sockets pooled per replica, a
request written in one send, answers parsed by the few lines HTTP/1.1 framing needs (status,
headers, Content-Length or chunked bodies), failures raised as client.transport's kinds, and
the caller's connection watched while the replica works. (`http.client` spent a fifth of the
frontend's CPU on building requests and parsing headers with the email package.)
"""
from __future__ import annotations

import select
import socket
import threading
import time
from collections import defaultdict
from typing import Any, Iterator, Mapping

from requests.structures import CaseInsensitiveDict

from client.transport import Caller, CallerGone, TimedOut, TransportError, Unreachable
from common.http import hung_up

READ_CHUNK = 65536
MAX_LINE = 65536
MAX_HEADERS = 100


def _wait_for_answer(sock: socket.socket, caller: socket.socket, timeout: float | None) -> None:
    """Waits for the replica's first bytes, watching the caller: raises CallerGone when it hangs
    up first (a non-streaming answer only starts when the whole generation is done)."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    p.register(caller, select.POLLIN | select.POLLRDHUP)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        events = dict(p.poll(left))
        if not events:
            raise socket.timeout("no answer")
        if sock.fileno() in events:
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


class BadAnswer(Unreachable):
    """The replica's bytes are not an HTTP/1.1 answer, or it closed before the answer's end."""


class Connection:
    """One keep-alive connection to a replica."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = socket.create_connection((host, port), connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def close(self) -> None:
        if self.sock is not None:
            self.rfile.close()
            self.sock.close()
            self.sock = None


class Answer:
    """An HTTP/1.1 answer read from a Connection: status and headers at once, the body on demand."""

    def __init__(self, conn: Connection, method: str) -> None:
        self._rfile = conn.rfile
        while True:
            line = self._rfile.readline(MAX_LINE)
            if not line:
                raise ConnectionResetError("the replica closed the connection before answering")
            version, _, rest = line.partition(b" ")
            try:
                self.status = int(rest[:3])
            except ValueError:
                raise BadAnswer(f"not an HTTP status line: {line[:80]!r}") from None
            headers = self._headers()
            if self.status != 100:  # (a 100 Continue is followed by the answer)
                break
        self.headers = headers
        length = headers.get("Content-Length")
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._left: int | None = None if self.chunked or length is None else int(length)
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self._left, self.chunked = 0, False
        self.will_close = (version != b"HTTP/1.1" or headers.get("Connection", "").lower() == "close"
                           or (self._left is None and not self.chunked))   # the body ends at EOF
        self._done = self._left == 0

    def _headers(self) -> CaseInsensitiveDict:
        headers: CaseInsensitiveDict = CaseInsensitiveDict()
        for _ in range(MAX_HEADERS):
            line = self._rfile.readline(MAX_LINE)
            if line in (b"\r\n", b"\n"):
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise BadAnswer(f"bad header line {line[:80]!r}")
            name, value = name.strip(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise BadAnswer("too many header lines")

    def isclosed(self) -> bool:
        """Whether the body was read to its end."""
        return self._done

    def read1(self, amt: int = READ_CHUNK) -> bytes:
        """The next bytes of the body as they arrive (at most one chunk of a chunked body);
        b"" at its end."""
        if self._done:
            return b""
        if self.chunked:
            size_line = self._rfile.readline(MAX_LINE)
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise BadAnswer(f"bad chunk size line {size_line[:40]!r}") from None
            if size == 0:
                self._headers()  # trailers, up to the blank line
                self._done = True
                return b""
            data = self._exact(size)
            if self._rfile.readline(MAX_LINE) not in (b"\r\n", b"\n"):
                raise BadAnswer("a chunk did not end with CRLF")
            return data
        if self._left is None:  # delimited by EOF
            data = self._rfile.read1(amt)
            self._done = not data
            return data
        data = self._rfile.read1(min(amt, self._left))
        if not data:
            raise BadAnswer(f"the replica closed the connection {self._left} bytes before the answer's end")
        self._left -= len(data)
        self._done = self._left == 0
        return data

    def read(self) -> bytes:
        if self._left is not None and not self.chunked and not self._done:
            data = self._exact(self._left)
            self._left, self._done = 0, True
            return data
        parts = []
        while not self._done:
            parts.append(self.read1())
        return b"".join(parts)

    def _exact(self, n: int) -> bytes:
        data = self._rfile.read(n)
        if len(data) < n:
            raise BadAnswer(f"the replica closed the connection {n - len(data)} bytes before the answer's end")
        return data


def _failure(e: Exception, replica: str) -> TransportError:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return TimedOut(f"{replica}: the answer stopped coming")
    return Unreachable(f"{replica}: {e}")


class Response:
    """A replica's answer (client.transport.Answer)."""

    def __init__(self, answer: Answer, conn: Connection, release: Any) -> None:
        self._answer, self._conn, self._release = answer, conn, release
        self._replica = f"{conn.host}:{conn.port}"
        self.status_code = answer.status
        self.headers = answer.headers
        self._content: bytes | None = None
        self._closed = False

    # -- body ------------------------------------------------------------------------------------
    @property
    def content(self) -> bytes:
        if self._content is None:
            try:
                self._content = self._answer.read()
            except TransportError:
                raise
            except (OSError, ValueError) as e:
                raise _failure(e, self._replica) from e
            finally:
                self.close()
        return self._content

    def stream(self, amt: int = READ_CHUNK) -> Iterator[bytes]:
        """Bytes as they arrive (one chunk of a chunked answer at a time)."""
        while True:
            try:
                data = self._answer.read1(amt)
            except TransportError:
                raise
            except (OSError, ValueError) as e:
                raise _failure(e, self._replica) from e
            if not data:
                return
            yield data

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
        if self._answer.isclosed() and not self._answer.will_close:
            self._release(self._conn)
        else:
            self._conn.close()


class FrontendTransport:
    """client.transport.Transport over pooled keep-alive connections, one pool per replica."""

    def __init__(self, pool_size: int = 64) -> None:
        self.pool_size = pool_size
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._lock = threading.Lock()

    def _connection(self, host: str, port: int, connect_timeout: float) -> tuple[Connection, bool]:
        key = f"{host}:{port}"
        with self._lock:
            idle = self._idle[key]
            while idle:
                conn = idle.pop()
                if not _dropped(conn.sock):
                    return conn, True
                conn.close()
        try:
            return Connection(host, port, connect_timeout), False
        except socket.timeout as e:
            raise Unreachable(f"connect to {key} timed out", "ConnectTimeout") from e
        except OSError as e:
            raise Unreachable(f"connect to {key} failed: {e}") from e

    def _release(self, conn: Connection) -> None:
        key = f"{conn.host}:{conn.port}"
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self.pool_size:
                idle.append(conn)
                return
        conn.close()

    def send(self, method: str, url: str, *, data: bytes = b"", headers: Mapping[str, str] | None = None,
             timeout: tuple[float, float | None] = (3.0, None), stream: bool = False,
             caller: Caller | None = None) -> Response:
        host_port, _, rest = url.partition("://")[2].partition("/")
        host, _, port_text = host_port.rpartition(":")
        host, port, path = host or "localhost", int(port_text or 80), "/" + rest
        connect_timeout, read_timeout = timeout
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items() if "\n" not in v and "\r" not in v]
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
        replica = f"{host}:{port}"
        watched = caller.sock if caller is not None else None
        for attempt in range(2):
            conn, reused = self._connection(host, port, connect_timeout or 3.0)
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)
            try:
                conn.sock.sendall(message)
                if watched is not None:
                    _wait_for_answer(conn.sock, watched, read_timeout)
                answer = Answer(conn, method)
                break
            except CallerGone:
                conn.close()  # the replica sees the connection go
                raise
            except socket.timeout as e:
                conn.close()
                raise TimedOut(f"{replica}: no answer in {read_timeout}s") from e
            except (ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: once more, fresh
                raise Unreachable(f"{replica} dropped the connection: {e}") from e
            except (OSError, ValueError) as e:
                conn.close()
                raise Unreachable(f"{replica}: {e}") from e
        out = Response(answer, conn, self._release)
        if not stream:
            out.content  # noqa: B018 - read it all now
        return out

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()
