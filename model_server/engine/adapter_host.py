"""The engine's LoRA adapter side: which adapters it serves, and the adapter slots a
cache-free pass holds while it runs (a mixin of `Engine`; the slots themselves are
`lora_slots.AdapterSlots`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence


class AdapterHost:
    """Mixed into `Engine`, whose `adapters`, `spec`, `max_lora_rank`, `runner`, `_lock`,
    `_requests` and `_counters` it uses."""

    def add_adapter(self, name: str, adapter: Any) -> None:
        """Serve LoRA adapter `name` (a `model_server.adapters.Adapter`) from now on. Host work
        only: its weights reach a slot of the device stack when a request first needs them."""
        if self.adapters is None:
            raise ValueError("this model was loaded without LoRA adapters (set its max_loras override)")
        if adapter.rank > self.max_lora_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the base's max_lora_rank {self.max_lora_rank}")
        self.adapters.register(name, adapter.padded(self.spec, self.max_lora_rank), adapter.source)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (its queued and running requests finish first)."""
        if self.adapters is not None:
            self.adapters.unregister(name)

    def adapter_requests(self, name: str) -> tuple[int, int, int]:
        """(running, waiting, total ever) requests for adapter `name`."""
        with self._lock:
            reqs = [r for r in self._requests.values() if r.adapter == name and not r.done]
            total = self._counters.get(f"adapter_requests:{name}", 0)
        running = sum(1 for r in reqs if r.admitted)
        return running, len(reqs) - running, total

    def _acquire(self, reqs: Sequence[Any]) -> Optional[list[Optional[int]]]:
        """Adapter slots for a cache-free pass over `reqs` (all or none: None when a slot is
        short), their weights written to the device."""
        slots: list[Optional[int]] = []
        for r in reqs:
            slot = None if r.adapter is None else self.adapters.acquire(r.adapter)
            if r.adapter is not None and slot is None:
                self._release(slots)
                return None
            slots.append(slot)
        if self.adapters is not None:
            self.runner.load_adapters(self.adapters.take_loads())
        return slots

    def _release(self, slots: Sequence[Optional[int]]) -> None:
        for slot in slots:
            if slot is not None:
                self.adapters.release(slot)
