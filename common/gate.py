"""The connection rules every listening part keeps against slow and idle clients, and the framing
scanner that lets an event loop hold a request until it has all arrived.

A request reaches a thread (gthread workers) or the app (the admin's uvicorn workers) only once its
request line, headers and body are in memory, so a client that sends slowly (slowloris, a
trickled body) or not at all holds a few kilobytes of buffer and never a thread:

* the request line and headers must arrive within `header_timeout_s` of the first byte (of the
  connection, or of the previous answer on a kept-alive connection);
* the body must then keep up at least `min_body_rate` bytes/s on average (after the same grace);
* a worker holds at most `max_connections`; past that, the longest-idle kept-alive connection,
  then the oldest unfinished one, is closed to make room, and only when every connection is
  busy is a new one refused with a canned 503;
* a write that makes no progress for `send_timeout_s` (a caller that stopped reading a stream)
  fails, which ends the response and cancels its upstream work;
* probes (`/healthz`, `/health`, `/ping`, `/version`) are served by threads of their own.

Defaults can be changed with SAX_HEADER_TIMEOUT_S, SAX_MIN_BODY_RATE, SAX_SEND_TIMEOUT_S and
SAX_MAX_CONNECTIONS (per worker).
"""
from __future__ import annotations

import dataclasses
import resource
import socket
import struct
from typing import Mapping

from common.settings import Env

PROBE_PATHS = frozenset({b"/healthz", b"/health", b"/ping", b"/version"})
MAX_HEAD_BYTES = 64 * 1024
MAX_BUFFERED_BODY = 16 * 1024 * 1024  # larger bodies are read by the thread (under SO_RCVTIMEO)



def _canned(status: str, message: str, extra: str = "") -> bytes:
    body = b'{"error": "%s"}\n' % message.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


REFUSED = _canned("503 Service Unavailable", "too many connections to this server, retry later",
                  "Retry-After: 1\r\n")
TIMED_OUT = _canned("408 Request Timeout", "the request did not arrive in time")


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    min_body_rate: float = 4096.0
    send_timeout_s: float = 60.0
    max_connections: int = 8192

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ConnectionLimits":
        e = Env(env)

        def num(name: str, default: float) -> float:
            value = e.number(name, default)
            assert value is not None
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
            return value
        return cls(header_timeout_s=num("SAX_HEADER_TIMEOUT_S", cls.header_timeout_s),
                   min_body_rate=num("SAX_MIN_BODY_RATE", cls.min_body_rate),
                   send_timeout_s=num("SAX_SEND_TIMEOUT_S", cls.send_timeout_s),
                   max_connections=int(num("SAX_MAX_CONNECTIONS", cls.max_connections)))

    def deadline(self, started: float, received: int) -> float:
        """When a request begun at `started` with `received` bytes so far must be complete."""
        return started + self.header_timeout_s + received / self.min_body_rate


def raise_open_files(wanted: int) -> None:
    """Raises this process's soft RLIMIT_NOFILE towards `wanted` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def set_stall_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel send/receive timeouts: a blocking send() or recv() that makes no progress for
    `seconds` fails with EAGAIN (Python's own socket timeout would be reset by setblocking)."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


class Framing:
    """Incremental scan of one HTTP/1.x request (head, then a Content-Length or chunked body) in
    a buffer: `feed` says whether it is complete. It only finds the request's end; the real
    parser (gunicorn's) judges everything else, so anything it cannot frame counts as complete
    and goes on to be refused there."""

    def __init__(self, buffered: bytes = b"") -> None:
        self.buf = bytearray(buffered)
        self.path = b""
        self._head_end = -1
        self._body_end = -1  # absolute offset, once known
        self._chunked = False
        self._scan = 0  # chunked: offset of the next chunk-size line
        self.done = False

    @property
    def is_probe(self) -> bool:
        return self.path in PROBE_PATHS

    def feed(self, data: bytes) -> bool:
        self.buf += data
        if not self.done:
            self.done = self._complete()
        return self.done

    def _complete(self) -> bool:
        if self._head_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return len(self.buf) > MAX_HEAD_BYTES or self._bad_start()
            self._head_end = end + 4
            if not self._read_head(bytes(self.buf[:end])):
                return True
        if self._chunked:
            return self._chunks_done()
        return len(self.buf) >= self._body_end or self._body_end - self._head_end > MAX_BUFFERED_BODY

    def _bad_start(self) -> bool:
        """A first line that is not a request line (a TLS hello, binary): no use waiting."""
        first = bytes(self.buf[:16])
        return bool(first) and not first.lstrip(b"\r\n")[:1].isalpha()

    def _read_head(self, head: bytes) -> bool:
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return False
        self.path = parts[1].split(b"?", 1)[0]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return False
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"expect" and b"100-continue" in value.lower():
                return False  # the client waits for "100 Continue": the parser sends it
        if length < 0:
            return False
        self._scan = self._head_end
        self._body_end = self._head_end + length
        return True

    def _chunks_done(self) -> bool:
        while True:
            if self._scan - self._head_end > MAX_BUFFERED_BODY:
                return True
            eol = self.buf.find(b"\r\n", self._scan)
            if eol < 0:
                return False
            size_text = bytes(self.buf[self._scan:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                return True  # not chunked framing: the parser refuses it
            if size == 0:  # trailers end with an empty line
                return self.buf.find(b"\r\n\r\n", eol) >= 0
            nxt = eol + 2 + size + 2
            if len(self.buf) < nxt:
                return False
            self._scan = nxt
