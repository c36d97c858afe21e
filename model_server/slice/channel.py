"""The slice's side channel: rank 0 -> followers step records and control messages, followers
-> rank 0 pings and load acknowledgements, as length-prefixed pickles over TCP.

TCP makes a dead peer visible at once (kill -9 closes its sockets: EOF / reset); pings make a
hung one visible within `timeout_s` (rank 0's own stalls excluded). Either way `on_lost(reason)`
runs once.
"""
from __future__ import annotations

import logging
import pickle
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
PING_S = 0.5


def send_msg(sock: socket.socket, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n))  # noqa: S301 - our own ranks, on the slice's network


class LeaderChannel:
    """Rank 0's end: one connection per follower rank."""

    def __init__(self, port: int, followers: int, *, timeout_s: float = 5.0,
                 on_lost: Optional[Callable[[str], None]] = None, host: str = "0.0.0.0"):
        self.followers = followers
        self.timeout_s = timeout_s
        self.on_lost = on_lost
        self.lost: Optional[str] = None
        self._conns: dict[int, socket.socket] = {}
        self._seen: dict[int, float] = {}
        self._replies: dict[int, list] = {}
        self._cv = threading.Condition()
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._stop = threading.Event()

    def accept_all(self, timeout_s: float) -> None:
        """Wait until every follower has connected and said which rank it is."""
        self._listener.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while len(self._conns) < self.followers:
            self._listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, addr = self._listener.accept()
            except socket.timeout:
                raise TimeoutError(f"only {len(self._conns)} of {self.followers} slice ranks connected "
                                   f"in {timeout_s:.0f}s") from None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(timeout_s)
            hello = recv_msg(conn)
            rank = int(hello[1])
            conn.settimeout(self.timeout_s)
            self._conns[rank] = conn
            self._seen[rank] = time.monotonic()
            self._replies[rank] = []
            log.info("slice rank %d connected from %s", rank, addr[0])
        self._listener.close()
        for rank, conn in self._conns.items():
            threading.Thread(target=self._read, args=(rank, conn), name=f"slice-rank-{rank}", daemon=True).start()
        threading.Thread(target=self._watch, name="slice-watchdog", daemon=True).start()

    def _lose(self, reason: str) -> None:
        with self._cv:
            if self.lost is not None:
                return
            self.lost = reason
            self._cv.notify_all()
        log.error("slice failed: %s", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def _read(self, rank: int, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            while not self._stop.is_set():
                msg = recv_msg(conn)
                with self._cv:
                    self._seen[rank] = time.monotonic()
                    if msg[0] != "ping":
                        self._replies[rank].append(msg)
                        self._cv.notify_all()
        except (OSError, ConnectionError, EOFError) as e:
            if not self._stop.is_set():
                self._lose(f"slice rank {rank} is gone ({e})")

    def _watch(self) -> None:
        """A follower silent for `timeout_s` is lost. Time this process itself did not run (a
        load holding the GIL, a starved CPU) does not count against the followers: their pings
        waited in the sockets meanwhile, and the readers had no chance to take them."""
        last = time.monotonic()
        while not self._stop.wait(PING_S / 2):
            now = time.monotonic()
            stalled, last = now - last - PING_S / 2, now
            if stalled > PING_S / 2:
                log.warning("slice watchdog: this process did not run for %.1fs; not held against "
                            "the followers", stalled)
                with self._cv:
                    for rank, seen in self._seen.items():
                        self._seen[rank] = min(seen + stalled, now)
                continue
            for rank, seen in list(self._seen.items()):
                if now - seen > self.timeout_s:
                    self._lose(f"slice rank {rank} stopped answering for {now - seen:.1f}s")
                    return

    def send(self, msg: Any) -> None:
        """To every follower; raises ConnectionError (after `on_lost`) if one is gone."""
        if self.lost is not None:
            raise ConnectionError(self.lost)
        for rank, conn in self._conns.items():
            try:
                send_msg(conn, msg)
            except OSError as e:
                self._lose(f"slice rank {rank} is gone (send: {e})")
                raise ConnectionError(self.lost) from e

    def wait_replies(self, kind: str, eid: int, timeout_s: float) -> dict[int, Any]:
        """Each follower's reply `(kind, eid, error)`: {rank: error or None}."""
        deadline = time.monotonic() + timeout_s
        out: dict[int, Any] = {}
        with self._cv:
            while True:
                for rank, replies in self._replies.items():
                    for m in list(replies):
                        if m[0] == kind and m[1] == eid:
                            out[rank] = m[2]
                            replies.remove(m)
                if len(out) == len(self._conns):
                    return out
                if self.lost is not None:
                    raise ConnectionError(self.lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"slice ranks {sorted(set(self._conns) - set(out))} did not finish "
                                       f"'{kind}' in {timeout_s:.0f}s")
                self._cv.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        for conn in self._conns.values():
            try:
                conn.close()
            except OSError:
                pass


class FollowerChannel:
    """A follower's end: connects to rank 0 (retrying until `timeout_s`), pings it."""

    def __init__(self, host: str, port: int, rank: int, *, timeout_s: float = 120.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._lock = threading.Lock()
        self.send(("hello", rank))
        threading.Thread(target=self._ping, name="slice-ping", daemon=True).start()

    def send(self, msg: Any) -> None:
        with self._lock:
            send_msg(self.sock, msg)

    def recv(self) -> Any:
        return recv_msg(self.sock)

    def _ping(self) -> None:
        while True:
            time.sleep(PING_S)
            try:
                self.send(("ping",))
            except OSError:
                return
