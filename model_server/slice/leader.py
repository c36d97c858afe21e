"""Rank 0 of a slice: loads on every rank, records each engine's programs, fails the slice."""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from model_server.engine.core import Engine
from model_server.engine.types import EngineError
from model_server.slice import MASTER_PID_ENV, SliceInfo
from model_server.slice.channel import LeaderChannel
from model_server.slice.lockstep import Recorder, SliceFailed, initial_values, local_puts

log = logging.getLogger(__name__)

#: longest a follower may take to read a checkpoint / compile and exercise its programs
LOAD_TIMEOUT_S = 1800.0


class SliceEngine(Engine):
    """An engine of rank 0: its stop unloads the model on every rank; a lost rank fails it."""

    slice: Optional["SliceLeader"] = None
    eid: int = -1

    def stop(self) -> None:
        super().stop()
        if self.slice is not None:
            self.slice.unload(self.eid)

    def fail_slice(self, reason: str) -> None:
        if not isinstance(self._error, SliceFailed):
            self._error = SliceFailed(reason)
        self._fail_all(EngineError(f"the slice failed: {reason}"))


class SliceLeader:
    def __init__(self, info: SliceInfo, *, timeout_s: float = 5.0, accept_timeout_s: float = 300.0,
                 exit_process: Optional[Callable[[str], None]] = None):
        self.info = info
        self.failed: Optional[str] = None
        self.beats_needed: Optional[Callable[[], bool]] = None  # set by the heartbeat agent owner
        self._engines: dict[int, SliceEngine] = {}
        self._ids = itertools.count()
        self._exit = exit_process or _exit_server
        self.channel = LeaderChannel(info.channel_port, info.hosts - 1, timeout_s=timeout_s, on_lost=self.fail)
        self.recorder = Recorder(self._send)
        self.channel.accept_all(accept_timeout_s)

    def _send(self, ops: list) -> None:
        try:
            self.channel.send(("ops", ops))
        except ConnectionError as e:
            raise SliceFailed(str(e)) from e

    def describe(self) -> dict[str, Any]:
        import jax

        from model_server.devices import accelerator_memory_bytes, chip_name

        local = jax.local_devices()
        return {"chip": chip_name(local[0]), "device_count": self.info.devices, "topology": self.info.topology,
                "memory_bytes": accelerator_memory_bytes(local) * self.info.hosts}

    # ------------------------------------------------------------------ loads

    def load(self, model_path: str, checkpoint: Optional[str], overrides: dict[str, Any],
             cache_dir: Optional[str]) -> tuple[Any, SliceEngine]:
        """The ModelManager's loader: the same load on every rank, then the engine attached."""
        from model_server.manager import build_engine

        with self.recorder.lock:
            if self.failed is not None:
                raise SliceFailed(self.failed)
            eid = next(self._ids)
            self.channel.send(("load", eid, (model_path, checkpoint, overrides, cache_dir)))
            try:
                loaded, engine = build_engine(model_path, checkpoint, overrides, cache_dir, engine_cls=SliceEngine)
            except Exception:
                self._abort(eid)
                raise
            self._check(self.channel.wait_replies("built", eid, LOAD_TIMEOUT_S), eid)
            self.channel.send(("start", eid))
            local_puts(engine.runner)
            engine.compile_progress = self._compiled_barrier(eid, engine.compile_progress)
            try:
                # Compiles, then runs each program once with the followers (collectives and all).
                engine.start()
                self._check(self.channel.wait_replies("started", eid, LOAD_TIMEOUT_S), eid)
                base = self.recorder.reserve(len(initial_values(engine.runner)))
                self.channel.send(("attach", eid, base))
                self.recorder.attach(eid, engine.runner, base)
            except Exception as e:
                # Past "start" the ranks may be out of step (one ran collectives the others did
                # not): only a restart of the group brings them back together.
                self.fail(f"loading {model_path} failed part-way on the slice: {type(e).__name__}: {e}")
                raise
            engine.slice, engine.eid = self, eid
            self._engines[eid] = engine
            if self.failed is not None:
                engine.fail_slice(self.failed)
            return loaded, engine

    def _compiled_barrier(self, eid: int, progress: Optional[Callable[[int, int, str], None]]
                          ) -> Callable[[int, int, str], None]:
        """Compile progress that, once every program is compiled, waits for the followers to
        have compiled theirs too: the warm-up's collectives must not wait on a rank still
        compiling (gloo gives up on a peer after 30 s; only rank 0 hits XLA's cache)."""
        def step(done: int, total: int, name: str) -> None:
            if progress is not None:
                progress(done, total, name)
            if done == total:
                self._check(self.channel.wait_replies("compiled", eid, LOAD_TIMEOUT_S), eid)

        return step

    def _check(self, replies: dict[int, Any], eid: int) -> None:
        errors = {r: e for r, e in replies.items() if e}
        if errors:
            self._abort(eid)
            raise RuntimeError("; ".join(f"slice rank {r}: {e}" for r, e in sorted(errors.items())))

    def _abort(self, eid: int) -> None:
        try:
            self.channel.send(("unload", eid))
        except ConnectionError:
            pass

    def unload(self, eid: int) -> None:
        with self.recorder.lock:
            self._engines.pop(eid, None)
            if self.failed is None:
                self._abort(eid)

    # ------------------------------------------------------------------ failure

    def fail(self, reason: str) -> None:
        """A rank is gone: no program runs again; every engine fails (its callers get an error
        now, its replicas report FAILED); then the server exits so the group is restarted."""
        if self.failed is not None:
            return
        self.failed = reason
        self.recorder.failed = reason
        for engine in list(self._engines.values()):
            engine.fail_slice(reason)
        threading.Thread(target=self._exit_after_report, args=(reason,), name="slice-exit", daemon=True).start()

    def _exit_after_report(self, reason: str) -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.beats_needed is None or not self.beats_needed():
                break
            time.sleep(0.1)
        self._exit(reason)


def _exit_server(reason: str) -> None:
    """Stop the whole model server (gunicorn's master too, else it would start a new worker that
    can never join the old slice)."""
    log.error("exiting: %s", reason)
    master = os.environ.get(MASTER_PID_ENV)
    if master and int(master) == os.getppid():  # under `python -m model_server`'s gunicorn
        try:
            os.kill(int(master), signal.SIGINT)
        except OSError:
            pass
    time.sleep(1.0)
    os._exit(3)
