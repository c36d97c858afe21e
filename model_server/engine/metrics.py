"""Histograms kept by the engine, with vLLM's bucket boundaries (Prometheus-ready)."""
from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
#: Tokens per engine step (vLLM's iteration_tokens_total buckets).
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Thread-safe cumulative histogram; `snapshot()` gives Prometheus' (le, count) pairs."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> dict:
        """{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum": s, "count": n}."""
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        out, acc = [], 0
        for le, c in zip(self.bounds, counts):
            acc += c
            out.append([le, acc])
        out.append(["+Inf", n])
        return {"buckets": out, "sum": total, "count": n}
