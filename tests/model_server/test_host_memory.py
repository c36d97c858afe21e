"""Huge pages under the engine's large CPU arrays (model_server/host_memory.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model_server import host_memory


def _huge_kb_at(addr: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `addr`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def test_large_arrays_move_to_huge_pages_with_their_values():
    x = jnp.arange(4 << 20, dtype=jnp.float32)  # 16 MB
    small = jnp.ones((1000,), jnp.float32)
    expect = np.asarray(x).copy()
    addr = x.unsafe_buffer_pointer()
    done = host_memory.advise_huge_pages({"w": x, "b": small, "n": None})
    if not host_memory.available():  # THP set to never: nothing to do, nothing done
        assert done == 0
        return
    # The 2 MB-aligned interior of the 16 MB buffer: at least 14 MB, collapsed now.
    assert done >= 14 << 20
    assert _huge_kb_at(addr + (8 << 20)) >= 2048
    np.testing.assert_array_equal(np.asarray(x), expect)
    assert float(jax.jit(jnp.sum)(x)) == float(np.sum(expect, dtype=np.float64))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_SWITCH, "0")
    assert not host_memory.available()
    assert host_memory.advise_huge_pages(jnp.zeros((4 << 20,), jnp.float32)) == 0
