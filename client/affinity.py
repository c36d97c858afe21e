"""Prefix affinity: which replica most recently served a request's leading bytes.

A request's body is cut into chunks of `CHUNK` bytes from its start (the model id and the
prompt or messages come first in every body this client and the frontend send), each keyed
by a hash chained over every chunk before it, as the engine keys its KV blocks by their
tokens. The replica that served the longest run of a new request's leading keys most likely
holds that prefix in its KV cache.
"""
from __future__ import annotations

import collections
import hashlib
import json
import threading
from typing import Any, Optional

CHUNK = 128
#: Leading bytes looked at (a long prompt's affinity is settled well before its end).
MAX_BYTES = 64 * 1024
#: Keys remembered (least recently used forgotten first).
MAX_KEYS = 1 << 16


def prefix_keys(body: Any = None, data: Optional[bytes] = None) -> list[bytes]:
    """The chained keys of the body's full leading chunks."""
    raw = data if data is not None else json.dumps(body, separators=(",", ":")).encode()
    raw = raw[:MAX_BYTES]
    out, prev = [], b""
    for start in range(0, len(raw) - CHUNK + 1, CHUNK):
        prev = hashlib.blake2b(prev + raw[start:start + CHUNK], digest_size=12).digest()
        out.append(prev)
    return out


class AffinityTable:
    """Key -> the replica that last served it (bounded LRU)."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._where: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._max = max_keys
        self._lock = threading.Lock()

    def best(self, keys: list[bytes], candidates: list[str]) -> tuple[Optional[str], int]:
        """The candidate holding the longest leading run of `keys`, and its length."""
        with self._lock:
            for n in range(len(keys), 0, -1):
                addr = self._where.get(keys[n - 1])
                if addr in candidates:
                    return addr, n
        return None, 0

    def served(self, keys: list[bytes], address: str) -> None:
        with self._lock:
            for k in keys:
                self._where[k] = address
                self._where.move_to_end(k)
            while len(self._where) > self._max:
                self._where.popitem(last=False)
