"""Lockstep execution of an engine's device programs on every rank of a slice.

Rank 0's engine runs as on one host; its runner's compiled programs are wrapped (`Recorder.attach`)
so that each call first sends a *step record* to the other ranks, then dispatches. A record is a
short list of ops naming device values by integer handles:

* ``("put", h, array)``: a host value (token ids, positions, block tables, sampling settings,
  token bitmasks, ...) that the call takes; captured from the call's own argument, so whatever
  the runner computed on the host travels, and nothing else;
* ``("call", eid, kind, key, [handles], out)``: run engine `eid`'s program ``kind[key]`` on those
  values; its output leaves become handles ``out, out + 1, ...``;
* ``("free", [handles])``: values rank 0 no longer holds (so the other ranks drop theirs).

The other ranks (`Replayer`) hold no request state at all: only the handles' device values,
the same compiled programs and the same initial device state (params, KV pool, decode state),
registered under the same handles when the engine starts (`attach`). Every rank therefore
calls the same executables with the same inputs in the same order, which is what
multi-controller JAX needs.
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)

#: program tables of `model_server.engine.programs.Programs` (dicts by shape key) and single programs
TABLES = ("prefill", "decode", "forward", "score", "embed")
SINGLES = ("first", "guided", "copy_blocks", "set_row", "set_adapter")

Op = tuple


class SliceFailed(RuntimeError):
    """A rank of the slice is gone: no program may run any more."""


def host_put(tree: Any, sharding: Any) -> Any:
    """Each host's own copy of host values onto its devices of `sharding`: no collective (a
    plain `jax.device_put` onto a multi-host sharding first checks, with an allgather, that
    every host passes the same value; the followers never make that call)."""
    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.array(x[idx]))

    return jax.tree.map(one, tree)


def local_puts(runner: Any) -> None:
    """Every rank's runner puts host values without the cross-host check (before `start`:
    its warm-up puts too, which every rank makes in the same order anyway)."""
    runner.device_put = lambda tree: host_put(tree, runner.replicated)


def initial_values(runner: Any) -> list:
    """The device values every rank holds after `Runner.start()`, in a fixed order."""
    tree = (runner.params, runner.lora, runner.cache, runner.state, runner._sp_dev, runner._tables_dev,
            runner._mask_ones)
    return jax.tree.leaves(tree)


def program(programs: Any, kind: str, key: Any) -> Any:
    return getattr(programs, kind)[key] if kind in TABLES else getattr(programs, kind)


class Recorder:
    """Rank 0's side: hands out handles, records calls, sends each record through `send`
    (which raises SliceFailed once a rank is gone) before the call is dispatched."""

    def __init__(self, send: Callable[[list[Op]], None], lock: Optional[threading.RLock] = None):
        self._send = send
        self.lock = lock or threading.RLock()
        self._next = 0
        self._by_id: dict[int, int] = {}   # id(array) -> handle, while rank 0 holds the array
        self._freed: collections.deque[int] = collections.deque()
        self.failed: Optional[str] = None
        self.calls = 0

    # ------------------------------------------------------------------ handles

    def reserve(self, count: int) -> int:
        with self.lock:
            base = self._next
            self._next += count
            return base

    def _track(self, leaf: Any, handle: int) -> None:
        key = id(leaf)
        self._by_id[key] = handle

        def gone(k: int = key, h: int = handle) -> None:
            if self._by_id.get(k) == h:
                del self._by_id[k]
            self._freed.append(h)

        weakref.finalize(leaf, gone)

    def register(self, leaves: Iterable[Any], base: int) -> None:
        for i, leaf in enumerate(leaves):
            self._track(leaf, base + i)

    def attach(self, eid: int, runner: Any, base: int) -> None:
        """Register the runner's initial device values from handle `base` on and wrap its programs."""
        with self.lock:
            self.register(initial_values(runner), base)
            local_puts(runner)
            pr = runner.programs
            compiled = jax.stages.Compiled
            unknown = [k for k, v in vars(pr).items() if k not in TABLES + SINGLES and (
                isinstance(v, compiled) or (isinstance(v, dict) and any(isinstance(x, compiled) for x in v.values())))]
            if unknown:  # a program kind this layer would not record: the followers would fall out of step
                raise SliceFailed(f"lockstep does not know the engine programs {unknown}")
            for kind in TABLES:
                table = getattr(pr, kind)
                for key in list(table):
                    table[key] = Call(self, eid, kind, key, table[key])
            for kind in SINGLES:
                if getattr(pr, kind) is not None:  # set_adapter: only with LoRA slots
                    setattr(pr, kind, Call(self, eid, kind, None, getattr(pr, kind)))

    # ------------------------------------------------------------------ calls

    def call(self, eid: int, kind: str, key: Any, fn: Any, args: tuple, kwargs: dict) -> Any:
        with self.lock:
            if self.failed is not None:
                raise SliceFailed(self.failed)
            leaves, _ = jax.tree.flatten((args, kwargs))
            ops: list[Op] = []
            if self._freed:
                freed = []
                while self._freed:
                    freed.append(self._freed.popleft())
                ops.append(("free", freed))
            handles = []
            for leaf in leaves:
                h = self._by_id.get(id(leaf))
                if h is None:  # a host input of this step: its value travels
                    h = self._next
                    self._next += 1
                    ops.append(("put", h, np.array(leaf)))
                    if isinstance(leaf, jax.Array):
                        self._track(leaf, h)
                handles.append(h)
            out = self._next
            ops.append(("call", eid, kind, key, handles, out))
            self._send(ops)
            result = fn(*args, **kwargs)
            for leaf, h in zip(leaves, handles):  # donated inputs: gone on every rank
                if isinstance(leaf, jax.Array) and leaf.is_deleted() and self._by_id.get(id(leaf)) == h:
                    del self._by_id[id(leaf)]
                    self._freed.append(h)
            outs = jax.tree.leaves(result)
            self.register(outs, out)
            self._next = out + len(outs)
            self.calls += 1
            return result


class Call:
    """A compiled program of rank 0's engine whose every call is recorded first."""

    def __init__(self, recorder: Recorder, eid: int, kind: str, key: Any, fn: Any):
        self.recorder, self.eid, self.kind, self.key, self.fn = recorder, eid, kind, key, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.recorder.call(self.eid, self.kind, self.key, self.fn, args, kwargs)

    def __getattr__(self, name: str) -> Any:  # in_tree, input_shardings, ... of the executable
        return getattr(self.fn, name)


class Replayer:
    """A follower's side: device values by handle, and each engine's own compiled programs."""

    def __init__(self) -> None:
        self.values: dict[int, Any] = {}
        self.programs: dict[int, Any] = {}
        self.replicated: dict[int, Any] = {}
        self.calls = 0

    def attach(self, eid: int, runner: Any, base: int) -> None:
        for i, leaf in enumerate(initial_values(runner)):
            self.values[base + i] = leaf
        self.programs[eid] = runner.programs
        self.replicated[eid] = runner.replicated

    def detach(self, eid: int) -> None:
        self.programs.pop(eid, None)
        self.replicated.pop(eid, None)

    def apply(self, ops: list[Op]) -> None:
        """Run one step record (see the module docstring)."""
        host: dict[int, np.ndarray] = {}
        for op in ops:
            kind = op[0]
            if kind == "free":
                for h in op[1]:
                    self.values.pop(h, None)
            elif kind == "put":
                host[op[1]] = op[2]
            elif kind == "call":
                _, eid, name, key, handles, out = op
                fn = program(self.programs[eid], name, key)
                leaves = []
                for h in handles:
                    if h in host:  # host inputs are replicated over the mesh, as the runner puts them
                        self.values[h] = host_put(host.pop(h), self.replicated[eid])
                    leaves.append(self.values[h])
                args, kwargs = jax.tree.unflatten(fn.in_tree, leaves)
                result = fn(*args, **kwargs)
                for i, leaf in enumerate(jax.tree.leaves(result)):
                    self.values[out + i] = leaf
                self.calls += 1
            else:
                raise ValueError(f"unknown lockstep op {kind!r}")
