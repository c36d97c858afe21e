"""A rolling update to a new checkpoint under load: no request fails, and afterwards every
replica serves the new checkpoint (new replicas load before old ones unload).

test.tiny takes no checkpoint, so the model here is `lm.hf` on test.tiny's weights saved
as two Hugging Face directories, v1 and v2 (same shapes: the session's XLA cache serves its
programs)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from client import sax
from tests.cluster import publish_and_wait, wait_until
from tests.faults.conftest import OVERRIDES, FaultCell
from tests.faults.harness import Load, record

pytestmark = pytest.mark.slow


MODEL = "/sax/test/rolling"


def test_rolling_update_under_load(fault_cell: FaultCell, tmp_path: Path) -> None:
    from model_server.models import tiny

    c = fault_cell
    v1, target = str(tiny.save_hf(tmp_path / "v1")), str(tiny.save_hf(tmp_path / "v2"))
    publish_and_wait(c.admin_url, MODEL, 2, model_path="lm.hf", checkpoint=v1, overrides=OVERRIDES, timeout=300)
    old = c.detail(MODEL)
    assert {r["checkpoint"] for r in old["replicas"]} == {v1}
    load = Load(c.frontend.url, MODEL, clients=8).start()
    try:
        wait_until(lambda: load.ok_count() >= 16, timeout=60, what="the load running")
        started = time.monotonic()
        sax.Update(MODEL, checkpoint=target, admin=c.admin_url)     # the client library's update

        def rolled() -> dict | None:
            d = c.detail(MODEL)
            reps = d["replicas"]
            done = (d["checkpoint"] == target and len(reps) == 2
                    and all(r["checkpoint"] == target and r["status"] == "LOADED" and r["wanted"] == "LOADED"
                            and r["generation"] == d["generation"] for r in reps))
            return d if done else None
        new = wait_until(rolled, timeout=300, interval=0.2, what="every replica at the new checkpoint")
        rolled_s = time.monotonic() - started
        assert new["generation"] > old["generation"]
        # The model servers agree: each holder has only the new generation left.
        for address in c.locate(MODEL):
            wait_until(lambda a=address: [(m["generation"], m["checkpoint"]) for m in requests.get(
                f"http://{a}/models", timeout=10).json()["models"] if m["model_id"] == MODEL]
                == [(new["generation"], target)], timeout=60, what=f"{address} holding only the new generation")
        after = time.monotonic()
        wait_until(lambda: load.ok_count(since=after) >= 16, timeout=60, what="answers after the update")
    finally:
        load.stop()
        c.unpublish(MODEL)
    assert not load.failures, load.summary()
    record("rolling update: requests during the update (8 clients)", load.summary())
    record("rolling update: update -> all replicas LOADED at the new checkpoint", rolled_s, "s")
