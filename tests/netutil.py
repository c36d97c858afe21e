"""Network helpers for tests: free ports, waiting for HTTP or a condition, raw HTTP/1.1 reads,
and a TCP proxy that stands in for a Kubernetes Service."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Callable

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy in {timeout}s ({last})")


def serve_connections(listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """In a daemon thread: accepts connections on `listener` until it is closed, each one
    served by `serve(conn)` in a thread of its own."""
    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def recv_request(conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes] | None:
    """Reads one HTTP/1.1 request with a Content-Length body from `conn` (after the bytes
    already in `buf`): (head, body, what followed it), or None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    return head, rest[:length], rest[length:]


def wait_until(pred, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class TcpProxy:
    """A stand-in for a Kubernetes Service in front of several processes: each accepted
    connection goes to the first backend in `backends` that accepts it; with none (or none
    accepting) the caller's connection is closed at once. `backends` may change at any time,
    as endpoints do when a pod dies."""

    def __init__(self, backends: list[str] | None = None) -> None:
        self.backends = list(backends or [])
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        serve_connections(self._sock, self._serve)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_backends(self, backends: list[str]) -> None:
        self.backends = list(backends)

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        for backend in list(self.backends):
            host, port = backend.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=2)
                upstream.settimeout(None)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return
        with self._lock:
            self._conns.update((client, upstream))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):  # either side gone: both go (a reset reaches the caller)
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(upstream)
        client.close()
        upstream.close()

    def drop_connections(self) -> None:
        """Closes every proxied connection (what callers of a dead pod see)."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()
        self.drop_connections()
