"""The persistent compilation cache on a real 2-process CPU slice: every rank writes its own
entries (JAX alone writes only from process 0, and a follower's keys differ from the leader's),
so after a restart of the group the follower finds its programs in the cache too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import free_port

WORKER = Path(__file__).with_name("slice_compile_cache_worker.py")
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}

pytestmark = pytest.mark.timeout(300)


def _run_pair(cache: Path, tmp: Path, run: int) -> list[dict]:
    coordinator = f"127.0.0.1:{free_port()}"
    outs = [tmp / f"run{run}-rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(cache), coordinator, str(r), str(outs[r])],
                              env={**os.environ, **ENV}) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads(o.read_text()) for o in outs]


def test_follower_restart_finds_its_cache_entries(tmp_path):
    cache = tmp_path / "xla"
    first = _run_pair(cache, tmp_path, 1)
    assert [r["hits"] for r in first] == [0, 0] and [r["writes"] for r in first] == [1, 1]
    entries = sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))
    assert len(entries) == 2, entries  # one per rank: the follower's key is its own
    second = _run_pair(cache, tmp_path, 2)
    assert [r["hits"] for r in second] == [1, 1] and [r["writes"] for r in second] == [0, 0]
    assert {r["value"] for r in first + second} == {first[0]["value"]}
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")) == entries
