"""What a model load is doing while it compiles, for the log, `/models`, the heartbeat and so
the admin's `listcell` / `saxutil ls`.

The engine compiles every program it will run at load (none while serving): decode programs
for each decode row count x KV-block variant, prefill and scoring programs for each prompt
bucket, one embedding program per bucket, and two helpers. Their number, and so the load
time, falls with the overrides that shorten the lists: `prefill_buckets` (fewer, e.g.
[64, 512]), `max_seq_len` (fewer buckets and KV-block variants), `num_slots` (fewer decode row
counts). `Programs.compile_all` calls `CompileProgress` after each program.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

SHORTEN_HINT = ("fewer programs with overrides prefill_buckets=[...] (fewer prompt buckets), "
                "a smaller max_seq_len or num_slots")
#: The current load's progress sink (set by the manager around its loader, in the load thread).
CURRENT: contextvars.ContextVar[Optional[Callable[[str], None]]] = contextvars.ContextVar(
    "sax_load_progress", default=None)


class CompileProgress:
    """Called as (done, total, name) by Programs.compile_all; turns it into a line such as
    "compiling 12 of 50 programs, about 30 s left" (the estimate from the mean time per
    program so far, over the compile threads), logs it at the start, at every quarter and at
    the end, and hands it to `sink`."""

    def __init__(self, model: str, sink: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.sink, self.clock = model, sink, clock
        self._lock = threading.Lock()
        self._started = 0.0
        self._logged_quarter = -1

    def __call__(self, done: int, total: int, name: str) -> None:
        with self._lock:
            now = self.clock()
            if done == 0:
                self._started = now
                line = f"compiling {total} programs"
                log.info("%s: compiling %d programs (every shape is compiled at load; %s)",
                         self.model, total, SHORTEN_HINT)
            else:
                elapsed = now - self._started
                left = elapsed / done * (total - done)
                line = (f"compiling {done} of {total} programs, about {left:.0f} s left"
                        if done < total else f"compiled {total} programs in {elapsed:.0f} s")
                quarter = 4 * done // total
                if quarter > self._logged_quarter:
                    self._logged_quarter = quarter
                    log.info("%s: %s (last: %s)", self.model, line, name)
            if self.sink is not None:
                self.sink(line)
