"""The tutorial's `"replicas": 2` on a one-server cell: one replica serves, and the admin's
detail and `saxutil ls` say why the second is not placed (issue 26's placement note, checked
here as a new user meets it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

from tests.cluster import REPO, AdminProcess, wait_until
from tests.sim_servers import SimServer

GiB = 1 << 30


def test_a_second_replica_on_a_one_server_cell_says_why_it_is_not_placed(tmp_path: Path) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    server = SimServer(admin.url, "10.0.0.1:1", 8 * GiB).start()
    try:
        r = requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": "/sax/test/lm", "model_path": "test.tiny", "checkpoint": "None", "replicas": 2})
        assert r.status_code == 201, r.text
        detail = wait_until(lambda: (lambda d: d if d["active_replicas"] == 1 and d.get("reason") else None)(
            requests.get(f"{admin.url}/models/sax/test/lm", timeout=10).json()), timeout=30, interval=0.2,
            what="one replica serving and a reason for the other")
        assert detail["max_replicas"] == 2 or detail.get("requested_replicas") == 2, detail
        reason = detail["reason"]
        assert "server" in reason, reason  # says that no other server can take it
        ls = subprocess.run([sys.executable, "-m", "client.cli", "--admin", f"127.0.0.1:{admin.port}", "ls",
                             "/sax/test/lm"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert ls.returncode == 0 and f"not placed: {reason}" in ls.stdout, (ls.stdout, ls.stderr)
    finally:
        server.kill()
        admin.stop()
