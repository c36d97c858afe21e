"""The admin server's ASGI entry point, run by gunicorn with a uvicorn worker.

`POST /heartbeat` is the admin's hot path: 1,000 model servers send a thousand
a second, and nearly every answer is `unchanged`, read from memory
(heartbeats.py). This entry answers those in the event loop, with no thread
hand-off and no WSGI machinery; a heartbeat that must touch the database runs
on a thread pool. Every other route goes to the Flask app through a2wsgi's
thread pool, so the API has one definition (api.py, which also holds a
heartbeat route for the WSGI app alone).
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from a2wsgi import WSGIMiddleware
from flask import Flask
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker
from werkzeug.exceptions import RequestEntityTooLarge

from admin_server.api import check_token, describe_error, json_object
from common.gate import PROBE_PATHS, TIMED_OUT, ConnectionLimits
from common.naming import InvalidArgument
from admin_server.settings import MAX_BODY_BYTES

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


LIMITS = ConnectionLimits.from_env()


class GatedHttpTools(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol with the header deadline of common.gate: a request
    head (and a new connection's first one) must be complete within `header_timeout_s`, else
    the connection is answered 408 and closed. Idle kept-alive connections cost no thread here
    and uvicorn closes them after the keep-alive timeout."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(LIMITS.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMED_OUT)
            self.transport.close()


class AdminWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn worker class: uvicorn on httptools with the header deadline, a connection cap
    (503 past it), lifespan events on, no access log."""
    CONFIG_KWARGS = {"loop": "auto", "http": GatedHttpTools, "lifespan": "on", "access_log": False,
                     "limit_concurrency": LIMITS.max_connections}


class AdminAsgi:
    def __init__(self, app: Flask) -> None:
        self.ctx = app.extensions["sax_admin"]
        self.extensions = app.extensions
        threads = self.ctx.settings.threads
        self.wsgi = WSGIMiddleware(_input_terminated(app), workers=threads)  # type: ignore[arg-type]
        # Probes have threads of their own: answered while every API thread is busy.
        self.probes = WSGIMiddleware(_input_terminated(app), workers=2)  # type: ignore[arg-type]
        self.db_threads = ThreadPoolExecutor(threads, thread_name_prefix="sax-heartbeat")

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/heartbeat" and scope["method"] == "POST":
            await self._heartbeat(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and scope["path"].encode() in PROBE_PATHS:
            await self.probes(scope, receive, send)  # type: ignore[arg-type]
        elif scope["type"] == "http":
            await self._buffered(scope, receive, send)
        else:
            await self.wsgi(scope, receive, send)  # type: ignore[arg-type]

    async def _buffered(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """A WSGI request's body is read here in the loop, at the minimum body rate, before a
        thread takes it: a trickled upload holds no thread."""
        try:
            body = await _read_body(receive, dict(scope["headers"]))
        except asyncio.TimeoutError:
            await _send_canned(send, 408, TIMED_OUT)
            return
        except Exception as exc:  # noqa: BLE001 - too large, a bad length, a hang-up: the API's error shape
            status, code, message = describe_error(exc)
            await _send_json(send, status, {"error": {"code": code, "message": message}})
            return
        first = True

        async def replay() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.wsgi(scope, replay, send)  # type: ignore[arg-type]

    async def _heartbeat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        settings, recorder = self.ctx.settings, self.ctx.heartbeats
        headers = dict(scope["headers"])
        try:
            check_token(settings.cluster_token, headers.get(b"authorization", b"").decode("latin-1"),
                        other=settings.admin_token)
            raw = await _read_body(receive, headers)
        except asyncio.TimeoutError:
            await _send_canned(send, 408, TIMED_OUT)
            return
        except Exception as exc:  # noqa: BLE001
            status, code, message = describe_error(exc)
            await _send_json(send, status, {"error": {"code": code, "message": message}})
            return
        try:
            beat = recorder.prepare(json_object(raw))
            answer = recorder.from_memory(beat)
            if answer is None:
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(self.db_threads, recorder.record_changed, beat)
            status = 200
        except Exception as exc:  # noqa: BLE001 - every failure answers in the API's error shape
            status, code, message = describe_error(exc)
            answer = {"error": {"code": code, "message": message}}
        await _send_json(send, status, answer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._stop_leading_on_term()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _stop_leading_on_term(self) -> None:
        """On SIGTERM the worker gives up leadership at once, before uvicorn drains requests:
        a draining leader must not judge servers whose heartbeats it no longer takes."""
        leader = self.ctx.leader
        if leader is None or threading.current_thread() is not threading.main_thread():
            return
        drain = signal.getsignal(signal.SIGTERM)  # uvicorn's graceful shutdown

        def on_term(signum: int, frame: Any) -> None:
            threading.Thread(target=leader.stop, name="sax-resign", daemon=True).start()
            if callable(drain):
                drain(signum, frame)

        signal.signal(signal.SIGTERM, on_term)

    def close(self) -> None:
        """Writes the last liveness batch and releases the lease, so a peer leads at once."""
        self.ctx.heartbeats.stop()
        if self.ctx.leader is not None:
            self.ctx.leader.stop()
        self.db_threads.shutdown(wait=False)


def _input_terminated(app: Flask) -> Callable[..., Any]:
    """a2wsgi's `wsgi.input` ends where the body does, chunked ones too; without saying so,
    werkzeug reads nothing of a body that comes without a Content-Length."""
    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["wsgi.input_terminated"] = True
        return app(environ, start_response)
    return wsgi


async def _send_json(send: Send, status: int, answer: Any) -> None:
    data = json.dumps(answer, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _send_canned(send: Send, status: int, raw: bytes) -> None:
    body = raw.split(b"\r\n\r\n", 1)[1]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, headers: dict[bytes, bytes]) -> bytes:
    """The whole body, read at LIMITS.min_body_rate at least (asyncio.TimeoutError if not);
    past MAX_BODY_BYTES, RequestEntityTooLarge."""
    try:
        declared = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise InvalidArgument("bad Content-Length") from None
    if declared > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    loop = asyncio.get_running_loop()
    begun = loop.time()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await asyncio.wait_for(receive(), max(0.0, LIMITS.deadline(begun, size) - loop.time()))
        if message["type"] == "http.disconnect":
            raise InvalidArgument("the caller hung up before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # also a chunked body, which declares no length
            raise RequestEntityTooLarge()
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
