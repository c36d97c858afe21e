"""Backing the engine's large host arrays (weights, KV cache) with transparent huge pages.

A decode step on the CPU streams every weight and the KV cache in use from memory. With 4 KB
pages that is one TLB entry per 4 KB, and on a virtual machine each miss walks two page
tables. XLA allocates its buffers with plain `malloc`, so on a kernel whose transparent huge
pages are set to `madvise` (the usual default) they never get huge pages; numpy, by
contrast, advises its own large arrays. `advise_huge_pages` asks the kernel to back the
2 MB-aligned interior of each large CPU buffer with huge pages (`MADV_HUGEPAGE`) and to do
it now (`MADV_COLLAPSE`, Linux 6.1+; older kernels leave it to khugepaged). Measured on
GPT-2-small's products and decode attention: 2-5% faster.

Off with ``SAX_HUGE_PAGES=0``; a no-op where the platform has no such call or THP is off.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import jax

log = logging.getLogger(__name__)

ENV_SWITCH = "SAX_HUGE_PAGES"
HUGE_PAGE = 2 << 20
#: Smaller arrays hold no whole huge page.
MIN_BYTES = HUGE_PAGE
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_madvise: Optional[Any] = None


def _libc_madvise() -> Optional[Any]:
    global _madvise
    if _madvise is None and sys.platform.startswith("linux"):
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def available() -> bool:
    """Whether advising can do anything here: Linux, THP not `never`, and not switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting and _libc_madvise() is not None


def _buffers(tree: Any) -> Iterator[tuple[int, int]]:
    """(address, bytes) of every CPU buffer of at least MIN_BYTES in `tree`'s arrays."""
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.is_deleted():
            continue
        for shard in leaf.addressable_shards:
            data = shard.data
            if shard.device.platform != "cpu" or data.nbytes < MIN_BYTES:
                continue
            yield data.unsafe_buffer_pointer(), data.nbytes


def advise_huge_pages(tree: Any) -> int:
    """Back the large CPU arrays of `tree` with huge pages; returns the bytes collapsed now
    (0 where the kernel only took the advice, or could not)."""
    if not available():
        return 0
    madvise = _libc_madvise()
    collapsed = 0
    for addr, nbytes in _buffers(tree):
        lo = -(-addr // HUGE_PAGE) * HUGE_PAGE
        hi = (addr + nbytes) // HUGE_PAGE * HUGE_PAGE
        if hi <= lo:
            continue
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
            continue
        if madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            collapsed += hi - lo
    return collapsed
