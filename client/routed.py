"""A routed call's answer: it holds its replica's place among the outstanding calls until closed,
and reading it whole goes to another replica when this one breaks it off."""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

from client import errors
from client.transport import Answer, Attempt, TimedOut, TransportError, timed_out

log = logging.getLogger(__name__)
OnAttempt = Callable[[Attempt], None]


class RoutedResponse:
    """An upstream answer that releases its replica's outstanding count when closed."""

    def __init__(self, resp: Answer, address: str, release: Callable[[str], None], replay: Any = None,
                 on_attempt: OnAttempt | None = None) -> None:
        self.resp, self.address, self._release = resp, address, release
        self._replay = replay   # replay(failed_address, on_attempt) -> RoutedResponse: on another replica
        self._on_attempt = on_attempt
        self._closed = False

    @property
    def status_code(self) -> int:
        return self.resp.status_code

    @property
    def headers(self) -> Any:
        return self.resp.headers

    def json(self) -> Any:
        return json.loads(self.content())  # read whole (on another replica if this one breaks off)

    def content(self, on_attempt: OnAttempt | None = None) -> bytes:
        """The whole body. When the replica breaks off before its end, none of the answer has
        reached the caller yet: the call goes to another replica (as a failure before the
        first byte does) and its answer, status and headers included, replaces this one. Those
        attempts go to `on_attempt` (default: the call's own callback)."""
        try:
            while True:
                try:
                    return self.resp.content
                except TransportError as e:
                    if self._replay is None or isinstance(e, TimedOut) or timed_out(e):
                        raise
                    failed, replay = self.address, self._replay
                    log.info("replica %s broke off its answer (%s): trying another one", failed, e)
                    self.close()
                    try:
                        again = replay(failed, on_attempt or self._on_attempt)
                    except errors.SaxError:
                        raise e from None
                    # Take the new answer over (its release becomes ours).
                    self.resp, self.address, self._replay = again.resp, again.address, again._replay
                    self._closed, again._closed = False, True
        finally:
            self.close()

    def iter_raw(self, chunk_size: int = 8192) -> Iterator[bytes]:
        """The body's bytes as they arrive (SSE streams pass through unchanged)."""
        try:
            yield from self.resp.stream(chunk_size)
        finally:
            self.close()

    def iter_sse(self) -> Iterator[bytes]:
        """Decoded `data:` payloads of an SSE stream, ending before `[DONE]`."""
        buf = b""
        try:
            for data in self.resp.stream():
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        payload = line[6:].rstrip(b"\r")
                        if payload == b"[DONE]":
                            return
                        yield payload
        finally:
            self.close()

    def abort(self) -> None:
        """Drops the upstream connection at once (a reader blocked on it wakes up)."""
        self.resp.abort()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.resp.close()
            self._release(self.address)

    def __enter__(self) -> "RoutedResponse":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
