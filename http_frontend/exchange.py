"""One request's bookkeeping: request id, model, replica, timings, cleanups, metrics, access log.

An exchange finishes once, when the WSGI server is done with the response (the
last byte of a stream written, or the client gone): then upstream answers are
closed, admission released, metrics recorded and the access line logged.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Callable

from http_frontend.errors import kind_of
from http_frontend.metrics import FrontendMetrics

access_log = logging.getLogger("http_frontend.access")
_RID = re.compile(r"^[A-Za-z0-9._:/+=\-]{1,128}$")


_counter = itertools.count(1)
_prefix = uuid.uuid4().hex[:12]


def _new_process() -> None:
    global _counter, _prefix
    _counter, _prefix = itertools.count(1), uuid.uuid4().hex[:12]


os.register_at_fork(after_in_child=_new_process)


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-Id when it is sane, else a new one (unique: a random per-process
    prefix and a counter, no system call per request)."""
    if incoming and _RID.match(incoming):
        return incoming
    return f"{_prefix}{next(_counter):08x}"


class Exchange:
    def __init__(self, rid: str, method: str, path: str, metrics: FrontendMetrics) -> None:
        self.rid, self.method, self.path = rid, method, path
        self.metrics = metrics
        self.route = "unmatched"
        self.model = "-"
        self.replica: str | None = None
        self.started = time.perf_counter()
        self.ttfb: float | None = None
        self.error_kind: str | None = None
        self.status = 0
        self.caller: socket.socket | None = None   # the client's connection, to notice it hanging up
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._finished = False

    def on_finish(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._finished:
                self._cleanups.append(fn)
                return
        fn()  # already finished: run at once

    def first_byte(self) -> None:
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self.started

    def finish(self, status: int | None = None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            cleanups, self._cleanups = self._cleanups, []
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:  # a cleanup must not hide the others
                access_log.exception("cleanup failed for request %s", self.rid)
        if status is not None:
            self.status = status
        elapsed = time.perf_counter() - self.started
        m = self.metrics
        m.child(m.requests, self.route, self.model, str(self.status)).inc()
        m.child(m.latency, self.route, self.model).observe(elapsed)
        if self.ttfb is not None:
            m.child(m.ttfb, self.route, self.model).observe(self.ttfb)
        if self.error_kind is None and self.status >= 400:
            self.error_kind = kind_of(self.status)
        if self.error_kind is not None:
            m.child(m.errors, self.route, self.model, self.error_kind).inc()
        access_log.info("%s %s %s %d model=%s replica=%s ttfb_ms=%s ms=%.1f%s", self.rid, self.method,
                        self.path, self.status, self.model, self.replica or "-",
                        f"{self.ttfb * 1e3:.1f}" if self.ttfb is not None else "-", elapsed * 1e3,
                        f" error={self.error_kind}" if self.error_kind else "")
