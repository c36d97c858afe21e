"""Which adapters are resident in the stack's `max_loras` slots (host only, no JAX).

Registered adapters keep their padded weights on the host; a sequence that needs one
`acquire`s it (its slot, loading it into the least recently used idle slot if it is not
resident), and releases it when it leaves. The loads are taken by the engine loop
(`take_loads`) and written to the device before the step that needs them.
"""
from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any, Optional


class AdapterSlots:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.weights: dict[str, Any] = {}          # name -> padded host weights
        self.salts: dict[str, bytes] = {}          # name -> prefix-cache salt
        self.slot_of: dict[str, int] = {}          # resident name -> slot
        self.name_in: list[Optional[str]] = [None] * max_loras
        self.refs = [0] * max_loras
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict((i, None) for i in range(max_loras))
        self._loads: list[tuple[int, str]] = []
        self.swaps = 0
        self._lock = threading.Lock()  # (un)registration comes from other threads than the loop's

    def _register(self, name: str, weights: Any, identity: str) -> None:
        """Add (or replace) adapter `name`; `identity` (e.g. its checkpoint) salts its cache keys."""
        self.weights[name] = weights
        self.salts[name] = hashlib.blake2b(f"lora/{name}/{identity}".encode(), digest_size=16).digest()
        slot = self.slot_of.pop(name, None)
        if slot is not None:  # replaced: reload on next use (sequences holding it keep the old)
            self.name_in[slot] = None

    def _unregister(self, name: str) -> None:
        self.weights.pop(name, None)
        self.salts.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.name_in[slot] = None

    def salt(self, name: Optional[str]) -> bytes:
        return b"" if name is None else self.salts.get(name, b"")

    def _acquire(self, name: str, count: int = 1) -> Optional[int]:
        """The slot of `name` with `count` more holders, loading it if needed; None if every
        slot is held by others (try again later). KeyError if `name` is not registered."""
        if name not in self.weights:
            raise KeyError(name)
        slot = self.slot_of.get(name)
        if slot is None:
            slot = next((s for s in self._lru if self.refs[s] == 0), None)
            if slot is None:
                return None
            old = self.name_in[slot]
            if old is not None:
                self.slot_of.pop(old, None)
                self.swaps += 1
            self.name_in[slot] = name
            self.slot_of[name] = slot
            self._loads.append((slot, name))
        self.refs[slot] += count
        self._lru.move_to_end(slot)
        return slot

    def _release(self, slot: int, count: int = 1) -> None:
        self.refs[slot] = max(0, self.refs[slot] - count)

    def _take_loads(self) -> list[tuple[int, Any]]:
        """(slot, weights) to write to the device, in order."""
        out = [(slot, self.weights[name]) for slot, name in self._loads if self.name_in[slot] == name]
        self._loads = []
        return out

    def resident(self) -> list[str]:
        return [n for n in self.name_in if n is not None]

    def register(self, name: str, weights: Any, identity: str) -> None:
        """Add (or replace) adapter `name`; `identity` (e.g. its checkpoint) salts its cache keys."""
        with self._lock:
            self._register(name, weights, identity)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._unregister(name)

    def acquire(self, name: str, count: int = 1) -> Optional[int]:
        """The slot of `name` with `count` more holders, loading it if needed; None if every
        slot is held by others (try again later). KeyError if `name` is not registered."""
        with self._lock:
            return self._acquire(name, count)

    def release(self, slot: int, count: int = 1) -> None:
        with self._lock:
            self._release(slot, count)

    def take_loads(self) -> list[tuple[int, Any]]:
        """(slot, weights) to write to the device, in order."""
        with self._lock:
            return self._take_loads()

    def __contains__(self, name: str) -> bool:
        return name in self.weights
