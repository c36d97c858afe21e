"""Prometheus metrics per model and per replica (upstream attempts: client.transport.Attempt).

With several gunicorn workers, `__main__` sets PROMETHEUS_MULTIPROC_DIR before
they fork and /metrics aggregates every worker's files.
"""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from client.transport import Attempt

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sax_frontend_requests", "Requests answered, by route, model and status.",
                                ["route", "model", "code"], registry=r)
        self.errors = Counter("sax_frontend_errors", "Failed requests by route, model and error type.",
                              ["route", "model", "type"], registry=r)
        self.latency = Histogram("sax_frontend_request_duration_seconds",
                                 "Request duration until the last byte (streams included).",
                                 ["route", "model"], buckets=BUCKETS, registry=r)
        self.ttfb = Histogram("sax_frontend_time_to_first_byte_seconds",
                              "From request arrival to the first byte of the upstream answer.",
                              ["route", "model"], buckets=BUCKETS, registry=r)
        self.outstanding = Gauge("sax_frontend_outstanding_requests", "Upstream calls in flight per model.",
                                 ["model"], registry=r, multiprocess_mode="livesum")
        self.upstream = Counter("sax_frontend_upstream_requests",
                                "Upstream attempts by model, replica and outcome (status or error).",
                                ["model", "replica", "outcome"], registry=r)
        self.upstream_ttfb = Histogram("sax_frontend_upstream_time_to_first_byte_seconds",
                                       "Replica time to response headers per attempt.",
                                       ["model", "replica"], buckets=BUCKETS, registry=r)
        self.upstream_latency = Histogram("sax_frontend_upstream_duration_seconds",
                                          "Duration of the answering attempt until its last byte.",
                                          ["model", "replica"], buckets=BUCKETS, registry=r)
        self.retries = Counter("sax_frontend_retries", "Attempts retried on another replica, by the replica "
                               "that failed and why.", ["model", "replica", "reason"], registry=r)

        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (labels() takes a lock and builds a key each time)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def exposition(self) -> bytes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            _forget_dead_workers(directory)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def record_attempts(self, model: str, attempts: list[Attempt]) -> None:
        for i, a in enumerate(attempts):
            self.child(self.upstream, model, a.replica, a.outcome).inc()
            if a.ttfb is not None:
                self.child(self.upstream_ttfb, model, a.replica).observe(a.ttfb)
            if i < len(attempts) - 1:
                self.child(self.retries, model, a.replica, a.outcome).inc()

    def record_replays(self, model: str, broken: str, attempts: list[Attempt]) -> None:
        """Attempts made after replica `broken` broke off a whole answer: a retry of it, then the
        replays (each one that broke off too is a retry of its own)."""
        self.child(self.retries, model, broken, "broken_body").inc()
        self.record_attempts(model, attempts)


def _forget_dead_workers(directory: str) -> None:
    """Drops the live-gauge files of workers that died without cleaning up (e.g. SIGKILL)."""
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            try:
                pid = int(name.rsplit("_", 1)[1][:-3])
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, directory)
            except (ValueError, PermissionError):
                pass
