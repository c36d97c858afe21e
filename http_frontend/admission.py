"""Admission: a bound on what is outstanding per key across this frontend's workers: each
model's requests in flight, and each API key's open streams (keyed by a hash of the key).

The counts live in shared memory made before gunicorn forks its workers, so the
bound holds across every worker of one frontend. Each worker counts in its own
row (claimed on first use, keyed by pid); the outstanding total of a key is the
sum over rows. A worker that died without cleaning up (SIGKILL, OOM) cannot leak
its counts: before refusing a request, rows of dead processes are reclaimed.
Keys map to columns through an open-addressing table of 64-bit hashes.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from typing import Any

SLOTS = 1024      # distinct models
ROWS = 64         # worker processes


def _key(model_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(model_id.encode(), digest_size=8).digest(), "little") >> 1 or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Admission:
    def __init__(self, limit: int, slots: int = SLOTS, rows: int = ROWS) -> None:
        self.limit, self.slots, self.rows = limit, slots, rows
        ctx = multiprocessing.get_context("fork")
        self._lock = ctx.Lock()
        self._keys: Any = ctx.RawArray("q", slots)
        self._pids: Any = ctx.RawArray("q", rows)
        self._counts: Any = ctx.RawArray("q", rows * slots)
        self._columns: dict[str, int] = {}
        self._row: int | None = None
        self._row_pid = 0

    # -- under the lock -----------------------------------------------------------------------
    def _column(self, model_id: str) -> int:
        column = self._columns.get(model_id)  # a model's column never changes once assigned
        if column is None:
            column = self._columns[model_id] = self._find(model_id)
        return column

    def _find(self, model_id: str) -> int:
        key = _key(model_id)
        i = key % self.slots
        for _ in range(self.slots):
            k = self._keys[i]
            if k == key:
                return i
            if k == 0:
                self._keys[i] = key
                return i
            i = (i + 1) % self.slots
        raise RuntimeError(f"admission table full ({self.slots} models)")

    def _my_row(self) -> int:
        pid = os.getpid()
        if self._row is not None and self._row_pid == pid:
            return self._row
        for r in range(self.rows):
            owner = self._pids[r]
            if owner == 0 or owner != pid and not _alive(owner):
                self._claim(r, pid)
                return r
        raise RuntimeError(f"more than {self.rows} frontend worker processes")

    def _claim(self, row: int, pid: int) -> None:
        base = row * self.slots
        for c in range(self.slots):
            self._counts[base + c] = 0
        self._pids[row] = pid
        if pid == os.getpid():
            self._row, self._row_pid = row, pid

    def _total(self, column: int) -> int:
        return sum(self._counts[column:self.rows * self.slots:self.slots])  # unclaimed rows hold zeros

    def _reap(self) -> None:
        for r in range(self.rows):
            owner = self._pids[r]
            if owner and owner != os.getpid() and not _alive(owner):
                self._claim(r, 0)

    # -- API ----------------------------------------------------------------------------------
    def try_acquire(self, model_id: str, n: int = 1) -> bool:
        """Counts `n` more outstanding calls of the model unless that passes the limit. A
        request is always admitted when the model has none outstanding (so one big prompt
        list is never refused outright)."""
        with self._lock:
            row, column = self._my_row(), self._column(model_id)
            if self.limit > 0:
                total = self._total(column)
                if total > 0 and total + n > self.limit:
                    self._reap()
                    total = self._total(column)
                    if total > 0 and total + n > self.limit:
                        return False
            self._counts[row * self.slots + column] += n
            return True

    def release(self, model_id: str, n: int = 1) -> None:
        with self._lock:
            i = self._my_row() * self.slots + self._column(model_id)
            self._counts[i] = max(0, self._counts[i] - n)

    def outstanding(self, model_id: str) -> int:
        with self._lock:
            return self._total(self._column(model_id))
