"""A locked-down cell for the security suite, started once for the package.

admin (admin token, cluster token, allowed checkpoint roots) + one model server
(cluster token, small request limits: prompt tokens, generated tokens, n) holding
`/sax/test/lm` + a fake replica holding `/sax/test/fake` (streams until the reader
leaves) + a frontend (API keys, admin token, small --max-n, streams per key, body
limit). Limits are set partly by flags, partly by SAX_* variables, so both paths
are exercised. It lives while tests/security runs; the suite also uses the frontend
suite's session `cell` (tests/conftest.py) for fuzzing and bad input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.cluster import (TINY_OVERRIDES, AdminProcess, FrontendProcess, ModelServerProcess, wait_http,
                           wait_until)
from tests.frontend.conftest import FakeReplica

# Distinctive strings, so a log line holding one cannot be a coincidence.
API_KEYS = ("sk-data-3f9a1c7e-KEYONE", "sk-data-8b2d4e60-KEYTWO")
ADMIN_TOKEN = "adm-7c51e0d2-ADMINTOKEN"
CLUSTER_TOKEN = "clu-a94f3b18-CLUSTERTOKEN"
WRONG_TOKENS = ("wrong-5e7b2a91-NOTAKEY", "sk-data-3f9a1c7e-KEYONX")
MODEL, FAKE = "/sax/test/lm", "/sax/test/fake"
GS_ROOT = "gs://sax-ckpt/models"
# Limits of the locked cell.
MAX_PROMPT_TOKENS = 24      # model server, SAX_MAX_PROMPT_TOKENS
MAX_TOKENS = 8              # model server, --max-tokens
MAX_N_SERVER = 2            # model server, --max-n
MAX_N_FRONTEND = 3          # frontend, --max-n
MAX_STREAMS = 2             # frontend, SAX_MAX_STREAMS_PER_KEY
MAX_BODY = 64 << 10         # frontend, --max-body-bytes


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


KEY, ADMIN = bearer(API_KEYS[0]), bearer(ADMIN_TOKEN)


@dataclass
class Locked:
    tmp: Path
    admin: AdminProcess
    model_server: ModelServerProcess
    frontend: FrontendProcess
    fake: FakeReplica
    checkpoint_root: Path

    @property
    def url(self) -> str:
        return self.frontend.url

    def logs(self) -> dict[str, str]:
        """Every log file the cell's processes wrote."""
        return {p.name: p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log"))}


def admin_publish(admin_url: str, model_id: str, model_path: str, replicas: int,
                  overrides: dict[str, Any] | None = None) -> None:
    r = requests.post(f"{admin_url}/models", timeout=10, headers=ADMIN, json={
        "model_id": model_id, "model_path": model_path, "checkpoint": "None", "replicas": replicas,
        "overrides": overrides or {}})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="package")  # stopped once tests/security is done: no load on the suites after it
def locked(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator[Locked]:
    tmp = tmp_path_factory.mktemp("locked-cell")
    root = tmp / "checkpoints"
    root.mkdir()
    procs: list[Any] = []
    try:
        admin = AdminProcess(tmp, root=str(tmp / "root"), extra_args=["--log-level", "DEBUG"], env={
            "SAX_ADMIN_TOKEN": ADMIN_TOKEN, "SAX_CLUSTER_TOKEN": CLUSTER_TOKEN,
            "SAX_CHECKPOINT_ROOTS": f"{root},{GS_ROOT}"}).start()
        procs.append(admin)
        server = ModelServerProcess(
            tmp, admin=f"127.0.0.1:{admin.port}",
            env={"SAX_CLUSTER_TOKEN": CLUSTER_TOKEN, "SAX_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS)},
            extra_args=["--threads", "16", "--max-tokens", str(MAX_TOKENS), "--max-n", str(MAX_N_SERVER)])
        procs.append(server.start(wait=False))
        fake = FakeReplica(admin.url, "test.fake")
        fake.sim.token = CLUSTER_TOKEN
        procs.append(fake.start())
        frontend = FrontendProcess(
            tmp, admin.port, "--api-keys", ",".join(API_KEYS), "--admin-token", ADMIN_TOKEN,
            "--max-n", str(MAX_N_FRONTEND), "--max-body-bytes", str(MAX_BODY), "--workers", "2",
            "--threads", "16", "--log-level", "DEBUG", name="locked-frontend",
            env={"SAX_MAX_STREAMS_PER_KEY": str(MAX_STREAMS)}).start()
        procs.append(frontend)
        wait_http(f"{server.url}/healthz", timeout=120, proc=server.proc)
        admin_publish(admin.url, FAKE, "test.fake", 1)
        admin_publish(admin.url, MODEL, "test.tiny", 1, TINY_OVERRIDES)
        wait_until(lambda: all(requests.get(f"{admin.url}/models{m}", timeout=10).json()["active_replicas"]
                               for m in (MODEL, FAKE)), timeout=300, interval=0.2, what="locked cell ready")
        yield Locked(tmp, admin, server, frontend, fake, root)
    finally:
        for p in reversed(procs):
            p.stop()
