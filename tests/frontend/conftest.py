"""One real cell for the frontend suite, started once per session.

admin + two model servers holding `/sax/test/lm` (test.tiny, alias `tiny`), fake
replicas for fault injection (`/sax/test/fake`, `/sax/test/flaky` with one dead
replica, `/sax/test/empty` with none), and two frontends: an open one and a
locked-down one (API keys, admin token, CORS, small body and in-flight limits).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import requests

from tests.cluster import (TINY_OVERRIDES, AdminProcess, FrontendProcess, ModelServerProcess, free_port,  # noqa: F401
                           metric, publish_and_wait, sse_events,
                           wait_http, wait_until)
from tests.sim_servers import SimServer

MODEL = "/sax/test/lm"
ALIAS = "tiny"            # published override
FLAG_ALIAS = "lm2"        # frontend --alias
API_KEYS = ("key-one", "key-two")
ADMIN_TOKEN = "admin-secret"
ORIGIN = "https://app.example"
# test.tiny with the suite-wide shapes (already in the session's XLA cache), named `tiny` too.
TINY_OVERRIDES_ALIASED = {**TINY_OVERRIDES, "alias": ALIAS}


def publish(admin_url: str, model_id: str, model_path: str, replicas: int,
            overrides: dict[str, Any] | None = None) -> None:
    r = requests.post(f"{admin_url}/models", timeout=10, json={
        "model_id": model_id, "model_path": model_path, "checkpoint": "None", "replicas": replicas,
        "overrides": overrides or {}})
    assert r.status_code == 201, r.text


def active(admin_url: str, model_id: str) -> int:
    return requests.get(f"{admin_url}/models{model_id}", timeout=10).json()["active_replicas"]


# -- a fake replica for fault injection ---------------------------------------------------------

class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802
        fake: FakeReplica = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        fake.seen.append((body, dict(self.headers)))
        prompt = body.get("prompt")
        if prompt == "refuse":
            return self._json(503, {"error": {"message": "queue full", "type": "overloaded_error",
                                              "param": None, "code": "queue_full"}}, {"Retry-After": "1"})
        if prompt == f"cut:{fake.address}":  # dies between its headers and the end of its body
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"id": "cmpl-cut", "choi')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if prompt == "hang":
            fake.hanging += 1
            fake.release.wait(30)
            fake.hanging -= 1
        if not body.get("stream"):
            return self._json(200, {"id": "cmpl-fake", "object": "text_completion", "created": 0,
                                    "model": body.get("model"), "choices": [
                                        {"index": 0, "text": f"fake:{fake.address}", "logprobs": None,
                                         "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count = int(prompt[6:]) if isinstance(prompt, str) and prompt.startswith("count:") else 600
        pad = b"x" * 65536 if prompt == "flood" else b""
        try:
            for i in range(count):  # "forever" (30 s) unless the reader goes away, or count:N events
                self._chunk(b'data: {"id":"cmpl-fake","object":"text_completion","created":0,"model":"%s",'
                            b'"choices":[{"index":0,"text":"t%d%s","logprobs":null,"finish_reason":null}]}\n\n'
                            % (body.get("model", "").encode(), i, pad))
                if prompt == "break" and i == 1:
                    self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-stream
                    return
                time.sleep(0 if pad else 0.05)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except OSError:
            fake.disconnected.set()  # the frontend closed the upstream connection


@dataclass
class FakeReplica:
    """A stand-in model server: heartbeats like one (SimServer) and answers /v1/completions by
    prompt: "hang" waits for `release`, "refuse" is a retryable 503, "break" dies mid-stream,
    "cut:<its address>" dies in the middle of a whole answer, "count:N" streams N events, "flood" streams 64 KiB events without pause, anything else answers (streams go on until the reader leaves)."""
    admin_url: str
    servable: str
    listen: bool = True

    def __post_init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.release = threading.Event()
        self.disconnected = threading.Event()
        self.hanging = 0
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.sim = SimServer(self.admin_url, self.address, memory_bytes=1 << 30, servable=[self.servable],
                             interval_s=0.3, load_delay_s=0.0)
        self.httpd: ThreadingHTTPServer | None = None

    def start(self) -> "FakeReplica":
        if self.listen:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _FakeHandler)
            self.httpd.daemon_threads = True
            self.httpd.handle_error = lambda *a: None  # type: ignore[method-assign]  # hang-ups are the point
            self.httpd.fake = self  # type: ignore[attr-defined]
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.sim.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.sim.kill()
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


# -- the session's cell --------------------------------------------------------------------------

@dataclass
class Cell:
    tmp: Path
    admin: AdminProcess
    model_servers: list[ModelServerProcess]
    model_server_urls: list[str]
    frontend: FrontendProcess
    secure: FrontendProcess
    fake: FakeReplica
    flaky_live: FakeReplica
    flaky_dead: FakeReplica

    @property
    def url(self) -> str:
        return self.frontend.url

    def direct(self, path: str, body: dict[str, Any], i: int = 0) -> requests.Response:
        """The same call sent straight to a model server."""
        return requests.post(self.model_server_urls[i] + path, json=body, timeout=60)


@contextmanager
def start_cell(tmp: Path) -> Iterator[Cell]:
    """Starts the cell (the session fixture `cell` in tests/conftest.py, shared by tests/frontend
    and tests/security); stops it on exit."""
    procs: list[Any] = []
    try:
        admin = AdminProcess(tmp, root=str(tmp / "root")).start()
        procs.append(admin)
        servers = [ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}", extra_args=["--threads", "32"])
                   for _ in range(2)]
        for p in servers:
            procs.append(p.start(wait=False))
        for p in servers:
            wait_http(f"{p.url}/healthz", timeout=120, proc=p.proc)

        fake = FakeReplica(admin.url, "test.fake").start()
        flaky_live = FakeReplica(admin.url, "test.flaky").start()
        flaky_dead = FakeReplica(admin.url, "test.flaky", listen=False).start()
        procs += [fake, flaky_live, flaky_dead]
        publish(admin.url, "/sax/test/fake", "test.fake", 1)
        publish(admin.url, "/sax/test/flaky", "test.flaky", 2)
        publish(admin.url, "/sax/test/empty", "test.fake", 0)

        frontend = FrontendProcess(tmp, admin.port, "--alias", f"{FLAG_ALIAS}={MODEL}", "--workers", "2",
                                   "--threads", "32").start()
        secure = FrontendProcess(tmp, admin.port, "--api-keys", ",".join(API_KEYS), "--admin-token",
                                 ADMIN_TOKEN, "--allowed-origins", ORIGIN, "--max-body-bytes", "4096",
                                 "--max-outstanding-per-model", "2", "--workers", "1", name="secure").start()
        procs += [frontend, secure]
        publish_and_wait(admin.url, MODEL, 2, overrides=TINY_OVERRIDES_ALIASED, timeout=400)
        wait_until(lambda: active(admin.url, "/sax/test/fake") == 1 and active(admin.url, "/sax/test/flaky") == 2,
                   timeout=120, what="fake replicas")
        yield Cell(tmp, admin, servers, [p.url for p in servers], frontend, secure, fake, flaky_live, flaky_dead)
    finally:
        for p in reversed(procs):
            p.stop()
