"""The KV block pool's bookkeeping (host only): free blocks, reference counts, and the
prefix cache of full blocks keyed by chained hashes.

A full block's key is a hash of its tokens chained with the key of the block before it (and
a salt: anything else that changes the cached keys and values, such as an adapter), so equal
keys mean equal prefixes. A block whose last reference goes stays cached: it joins an LRU of
evictable blocks, reused (and its key forgotten) only when no never-cached block is free.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional, Sequence

import numpy as np


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """The chained keys of every full block of `tokens`."""
    out: list[bytes] = []
    prev = salt
    arr = np.asarray(tokens, np.int64)
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(arr[i * block_size:(i + 1) * block_size].tobytes())
        prev = h.digest()
        out.append(prev)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._refs = [0] * num_blocks
        self._key: list[Optional[bytes]] = [None] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # never cached
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        #: prefix-cache lookups and hits, in tokens (vLLM's prefix_cache_queries / _hits)
        self.queries = 0
        self.hits = 0

    # ------------------------------------------------------------------ capacity

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation may take now (free, or cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def usage(self) -> float:
        """Fraction of the pool held by sequences (vLLM's kv_cache_usage_perc)."""
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest leading run of `keys` (no references taken)."""
        out = []
        for k in keys:
            b = self._by_key.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def count_lookup(self, tokens: int, hit_tokens: int) -> None:
        self.queries += tokens
        self.hits += hit_tokens

    def register(self, block: int, key: bytes) -> None:
        """Block `block` now holds the full block `key` names (a key already cached elsewhere
        keeps its block)."""
        if not self.enable_caching or key in self._by_key or self._key[block] is not None:
            return
        self._by_key[key] = block
        self._key[block] = key

    # ------------------------------------------------------------------ references

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of `blocks` (cached blocks leave the evictable LRU)."""
        for b in blocks:
            if self._refs[b] == 0:
                self._evictable.pop(b, None)
            self._refs[b] += 1

    def take(self, n: int) -> list[int]:
        """`n` fresh blocks (never-cached ones first, then the least recently used cached)."""
        if n > self.free_blocks:
            raise RuntimeError(f"the KV pool has {self.free_blocks} free blocks, {n} asked")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                key = self._key[b]
                if key is not None:
                    del self._by_key[key]
                    self._key[b] = None
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of `blocks`; the last block first, so that a chain's
        tail is evicted before its head."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def refs(self, block: int) -> int:
        return self._refs[block]
