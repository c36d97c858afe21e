"""Calls to a model's replicas through the client router, and passing their answers on.

Bodies and SSE streams are forwarded byte for byte: the model server answers
in exactly the shapes the frontend serves. The only rewrite is the `model`
field when the caller used a frontend alias the replicas do not know.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any, Iterable, Iterator

from flask import Response

from client import errors as sax_errors
from client.router import RoutedResponse, Router
from client.transport import Attempt, SocketCaller
from common.http import hung_up
from http_frontend.admission import Admission
from http_frontend.errors import FrontendError, from_sax_error, model_not_found
from http_frontend.exchange import Exchange
from http_frontend.metrics import FrontendMetrics

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PASSED_HEADERS = ("Retry-After",)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Upstream:
    def __init__(self, router: Router, metrics: FrontendMetrics, admission: Admission,
                 timeout_s: float) -> None:
        self.router, self.metrics, self.admission, self.timeout_s = router, metrics, admission, timeout_s

    # -- before the call ---------------------------------------------------------------------
    def check_published(self, model_id: str, name: str) -> None:
        """404 unless the admin knows the model (served from the router's cache)."""
        try:
            self.router.location(model_id)
        except (sax_errors.NotFound, sax_errors.InvalidArgument):
            raise model_not_found(name) from None
        except sax_errors.SaxError as e:
            raise from_sax_error(e, model=model_id) from None

    def admit(self, ex: Exchange, model_id: str, n: int = 1) -> None:
        """Counts `n` upstream calls against the model's bound (429 past it) until the exchange ends."""
        if not self.admission.try_acquire(model_id, n):
            raise FrontendError(429, f"too many requests in flight for {model_id} "
                                     f"(limit {self.admission.limit}); retry later",
                                code="rate_limit_exceeded", retry_after=1.0)
        gauge = self.metrics.child(self.metrics.outstanding, model_id)
        gauge.inc(n)

        def release() -> None:
            self.admission.release(model_id, n)
            gauge.dec(n)
        ex.on_finish(release)

    # -- the call ----------------------------------------------------------------------------
    def call(self, ex: Exchange, model_id: str, path: str, data: bytes) -> RoutedResponse:
        """POSTs `data` to a ready replica (retrying elsewhere before the first byte); the answer
        is closed when the exchange finishes, if not before."""
        headers = {"Content-Type": "application/json", "X-Request-Id": ex.rid}
        started = time.perf_counter()
        attempts: list[Attempt] = []
        try:
            resp = self.router.post(model_id, path, data=data, stream=True, timeout=self.timeout_s,
                                    headers=headers, caller=SocketCaller(ex.caller), on_attempt=attempts.append)
        except sax_errors.Cancelled:
            raise FrontendError(499, "the caller hung up", code="client_disconnect") from None
        except sax_errors.SaxError as e:
            raise from_sax_error(e, model=model_id) from None
        finally:
            self.metrics.record_attempts(model_id, attempts)
        ex.replica = resp.address
        duration = self.metrics.child(self.metrics.upstream_latency, model_id, resp.address)

        def done() -> None:
            resp.close()
            duration.observe(time.perf_counter() - started)
        ex.on_finish(done)
        return resp

    def get(self, ex: Exchange, model_id: str, path: str, params: dict[str, str]) -> tuple[int, bytes, str]:
        """A GET on a ready replica (tokenizer_info), through the router like every upstream call."""
        attempts: list[Attempt] = []
        try:
            with self.router.get(model_id, path, params, headers={"X-Request-Id": ex.rid}, timeout=30.0,
                                 caller=SocketCaller(ex.caller), on_attempt=attempts.append) as r:
                body = r.content()
        except sax_errors.Cancelled:
            raise FrontendError(499, "the caller hung up", code="client_disconnect") from None
        except sax_errors.SaxError as e:
            raise from_sax_error(e, model=model_id) from None
        except OSError as e:  # it broke off its answer
            raise FrontendError(502, f"replica {r.address} broke off its answer: {e}", code="bad_gateway") from None
        finally:
            self.metrics.record_attempts(model_id, attempts)
        ex.replica = r.address
        return r.status_code, body, r.headers.get("Content-Type", "application/json")

    def read(self, ex: Exchange, resp: RoutedResponse) -> bytes:
        """The whole answer. A replica that breaks off before its end has sent the caller
        nothing yet: the router sends the call to another replica, whose answer this is then."""
        first = resp.address
        replays: list[Attempt] = []  # calls sent again after `first` broke off its answer
        try:
            body = resp.content(on_attempt=replays.append)
        except Exception as e:
            raise FrontendError(502, f"replica {resp.address} broke off its answer: {e}",
                                code="bad_gateway") from None
        finally:
            if replays:
                self.metrics.record_replays(ex.model, first, replays)
        ex.replica = resp.address
        ex.first_byte()
        return body


# -- passing answers on ----------------------------------------------------------------------
def _passed_headers(resp: RoutedResponse) -> dict[str, str]:
    return {k: resp.headers[k] for k in PASSED_HEADERS if k in resp.headers}


def rename_model(body: bytes, model_id: str, name: str) -> bytes:
    """Puts the name the caller used back into an answer the replica gave under the model id."""
    return body.replace(b'"model":' + dumps(model_id), b'"model":' + dumps(name))


def body_response(ex: Exchange, up: Upstream, resp: RoutedResponse, rename: tuple[str, str] | None) -> Response:
    """A whole (non-streaming) upstream answer, status and body unchanged."""
    body = up.read(ex, resp)
    if rename and resp.status_code < 400:
        body = rename_model(body, *rename)
    return Response(body, status=resp.status_code, headers=_passed_headers(resp),
                    content_type=resp.headers.get("Content-Type", "application/json"))


def iter_events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Whole SSE events (each ending in a blank line) out of arbitrarily cut chunks."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            yield buf[:end + 2]
            buf = buf[end + 2:]
    if buf.strip():
        yield buf


log = logging.getLogger(__name__)


def broken_stream_event(address: str, exc: BaseException) -> bytes:
    """The error event for a stream its replica broke off: a message for the caller (the
    replica's address and the exception are logged, not sent)."""
    log.warning("replica %s broke off a stream: %s: %s", address, type(exc).__name__, exc)
    if isinstance(exc, (TimeoutError, socket.timeout)) or "Timeout" in type(exc).__name__:
        why = "the model server stopped sending"
    else:
        why = "the model server's connection ended before the answer did"
    return stream_error_event(f"the answer was cut off: {why}; send the request again")


def stream_error_event(message: str) -> bytes:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "stream_error"}})


def stream_response(ex: Exchange, up: Upstream, resp: RoutedResponse, rename: tuple[str, str] | None) -> Response:
    """An upstream SSE stream passed through as it arrives; errors before it starts are
    passed on as the replica gave them."""
    if resp.status_code >= 400 or not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        return body_response(ex, up, resp, None)
    raw: Iterable[bytes] = resp.iter_raw()
    if rename:
        raw = (rename_model(e, *rename) for e in iter_events(raw))
    def generate() -> Iterator[bytes]:
        try:
            for chunk in raw:
                if hung_up(ex.caller):  # a write would only fail a write or two later
                    ex.error_kind = "client_disconnect"
                    return
                ex.first_byte()
                yield chunk
        except Exception as e:  # the replica went away mid-stream: say so, then end the stream
            ex.error_kind = "stream_error"
            yield broken_stream_event(resp.address, e)
            yield DONE
        finally:
            resp.close()

    return Response(generate(), status=resp.status_code, mimetype="text/event-stream", headers=SSE_HEADERS)
