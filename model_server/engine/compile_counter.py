"""XLA compilations in this process (the engine asserts none happen while it serves)."""
from __future__ import annotations

import threading
from typing import Any

import jax
import jax.monitoring

_lock = threading.Lock()
_count = 0
_installed = False


def _on_event(event: str, duration: float, **_: Any) -> None:
    global _count
    if event == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _count += 1


def compile_count() -> int:
    """XLA compilations in this process since the engine package was first imported."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True
        return _count


compile_count()
