"""The model manager's reports: what the admin sees of each model this server holds."""
from __future__ import annotations

import pytest

from model_server.manager import FAILED, LOADED, ModelManager, ModelNotReady
from tests.cluster import TINY_OVERRIDES, wait_until


def test_a_dead_engine_is_reported_failed_and_not_routed_to(tiny_compiled: None) -> None:
    manager = ModelManager()
    served = manager.ensure("/sax/test/lm", 1, "test.tiny", None, TINY_OVERRIDES)
    wait_until(lambda: served.status == LOADED, timeout=300, what="load")
    assert manager.resolve("/sax/test/lm") is served
    assert manager.report()[0]["status"] == LOADED and manager.report()[0]["error"] is None

    served.engine.stop()  # the engine no longer serves while the model is still wanted

    with pytest.raises(ModelNotReady):
        manager.resolve("/sax/test/lm")
    report = manager.report()[0]
    assert report["status"] == FAILED and "engine" in report["error"]
    # The admin answers a FAILED replica by no longer wanting it: it unloads cleanly.
    manager.converge([])
    wait_until(lambda: manager.report() == [], timeout=30, what="unload")
