"""A load that compiles says so while it does: the model server's log names the number of
programs and the overrides that shorten it, its /models report and the admin's replica
detail (so listcell / `saxutil ls`) carry "compiling N of M programs, about S s left"."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from tests.cluster import AdminProcess, ModelServerProcess, wait_http, wait_until

# Shapes no other test compiles (so the session's XLA cache does not skip the compilation).
OVERRIDES = {"num_slots": 1, "max_seq_len": 40, "prefill_buckets": [40], "max_queue": 2}
MODEL = "/sax/test/progress"


@pytest.mark.slow
def test_a_compiling_load_reports_its_progress(tmp_path: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    server = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}").start(wait=False)
    try:
        wait_http(f"{server.url}/healthz", timeout=120, proc=server.proc)
        r = requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": MODEL, "model_path": "test.tiny", "checkpoint": "None", "replicas": 1,
            "overrides": OVERRIDES})
        assert r.status_code == 201, r.text
        seen_admin: set[str] = set()
        seen_server: set[str] = set()

        def ready() -> bool:
            for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]:
                if m.get("progress"):
                    seen_server.add(m["progress"])
            reps = requests.get(f"{admin.url}/models{MODEL}", timeout=10).json()["replicas"]
            for rep in reps:
                if rep["status"] == "LOADING" and rep.get("error"):
                    seen_admin.add(rep["error"])
            return any(rep["status"] == "LOADED" for rep in reps)
        wait_until(ready, timeout=240, interval=0.1, what="the model loaded")
        progress = re.compile(r"compiling (\d+ of )?\d+ programs")
        assert any(progress.search(p) for p in seen_server), seen_server
        assert any(progress.search(p) for p in seen_admin), seen_admin
        assert any(re.search(r"compiling \d+ of \d+ programs, about \d+ s left", p) for p in seen_server | seen_admin)
        log = server.log()
        total = re.search(r"compiling (\d+) programs \(every shape is compiled at load; fewer programs with "
                          r"overrides prefill_buckets", log)
        assert total and int(total.group(1)) >= 4, log[-2000:]
        assert re.search(rf"compiled {total.group(1)} programs in \d+ s", log)
        # Once loaded, the replica's error is clear again.
        reps = requests.get(f"{admin.url}/models{MODEL}", timeout=10).json()["replicas"]
        assert [rep.get("error") for rep in reps] == [None], reps
    finally:
        server.stop()
        admin.stop()
