"""How the router sends one attempt of a call to a replica: a small protocol, its error types, and
the default transport over `requests`.

The router (client.router) decides where a call goes and whether a failed attempt is tried on
another replica; a transport only sends it and reads the answer. What the router needs to know
of a failure is its kind: `Unreachable` (the replica did not answer: connection refused, reset,
or an answer broken off before its end; tried elsewhere), `TimedOut` (a deadline: not tried
again) and `CallerGone` (whoever waits for the answer hung up: given up). Each attempt the router
makes is reported to the call's `on_attempt` callback as an `Attempt`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol

import requests
from requests.adapters import HTTPAdapter

from common.http import hung_up


class TransportError(OSError):
    """An attempt that got no (whole) answer from the replica. `outcome` labels it in metrics."""

    outcome = "TransportError"

    def __init__(self, message: str, outcome: str | None = None) -> None:
        super().__init__(message)
        if outcome is not None:
            self.outcome = outcome


class Unreachable(TransportError):
    """The replica did not answer (connect failed, connection dropped, answer cut short)."""

    outcome = "ConnectionError"


class TimedOut(TransportError, TimeoutError):
    """No answer, or no next byte of it, within the deadline."""

    outcome = "ReadTimeout"


class CallerGone(TransportError):
    """Whoever waits for the answer hung up while the replica worked on it."""

    outcome = "CallerGone"


@dataclass
class Attempt:
    """One attempt of a call: the replica, its HTTP status or the failure's outcome label, and the
    seconds to the answer's headers (None when there was no answer)."""

    replica: str
    outcome: str
    ttfb: float | None


class Caller(Protocol):
    """Whoever waits for a call's answer. `sock`, when not None, is its connection: a transport
    may watch it while the replica works (a non-streaming answer starts only when it is done)."""

    sock: socket.socket | None

    def gone(self) -> bool:
        """True once the caller hung up."""
        ...


class SocketCaller:
    """A caller on the other end of a socket (a frontend's client connection)."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def gone(self) -> bool:
        return hung_up(self.sock)


class Answer(Protocol):
    """A replica's answer: status and headers at once, the body whole or as it arrives. Reading
    the body raises TransportError when the replica breaks it off."""

    status_code: int
    headers: Mapping[str, str]

    @property
    def content(self) -> bytes: ...

    def stream(self, amt: int = 8192) -> Iterator[bytes]: ...

    def close(self) -> None:
        """Done with the answer (its connection is reused only when the body was read whole)."""

    def abort(self) -> None:
        """Drops the connection at once: a thread blocked reading it wakes up, and the replica
        sees its caller go (which cancels the request)."""


class Transport(Protocol):
    def send(self, method: str, url: str, *, data: bytes, headers: Mapping[str, str],
             timeout: tuple[float, float | None], stream: bool, caller: Caller | None) -> Answer:
        """Sends one request. Without `stream` the body is read before it returns. Raises
        TransportError's kinds; any answer, whatever its status, is returned."""
        ...

    def close(self) -> None: ...


def timed_out(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a timeout."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, (socket.timeout, TimeoutError, requests.Timeout)) or any(
                "timed out" in str(a).lower() or "timeout" in type(a).__name__.lower() for a in seen.args):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _kind(exc: BaseException, where: str) -> TransportError:
    if isinstance(exc, requests.ConnectTimeout):
        return Unreachable(f"connect to {where} timed out", "ConnectTimeout")
    if timed_out(exc):
        return TimedOut(f"{where}: no answer in time: {exc}")
    return Unreachable(f"{where}: {exc}")


class _RequestsAnswer:
    def __init__(self, resp: requests.Response, where: str) -> None:
        self._resp, self._where = resp, where
        self.status_code = resp.status_code
        self.headers = resp.headers

    @property
    def content(self) -> bytes:
        try:
            return self._resp.content
        except TransportError:
            raise
        except Exception as e:  # noqa: BLE001 - urllib3's and requests' many kinds
            raise _kind(e, self._where) from e

    def stream(self, amt: int = 8192) -> Iterator[bytes]:
        try:
            yield from self._resp.raw.stream(amt, decode_content=False)
        except TransportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _kind(e, self._where) from e

    def close(self) -> None:
        self._resp.close()

    def abort(self) -> None:
        sock = getattr(getattr(self._resp.raw, "_connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RequestsTransport:
    """The default transport: a pooled `requests` session (no retries of its own)."""

    def __init__(self, pool_size: int = 64) -> None:
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def send(self, method: str, url: str, *, data: bytes, headers: Mapping[str, str],
             timeout: tuple[float, float | None], stream: bool, caller: Caller | None = None) -> Answer:
        where = url.split("/", 3)[2] if "://" in url else url
        try:
            resp = self.session.request(method, url, data=data, headers=dict(headers), timeout=timeout,
                                        stream=stream)
        except (requests.RequestException, OSError) as e:
            raise _kind(e, where) from e
        return _RequestsAnswer(resp, where)

    def close(self) -> None:
        self.session.close()
