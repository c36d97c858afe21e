"""No acknowledged publish is lost with the database (RPO 0 for the published set while the
blob store is reachable), real processes: publish on PostgreSQL, kill -9 the admin right
after its 201, lose the database (dropped, or an older dump restored), start a new admin: the
model is there, restored from the snapshot the answer waited for. Both blob stores (a local
directory and the GCS emulator). With the blob store down, a publish still succeeds and its
answer, /stats, /metrics and `saxutil ls` say the snapshot is behind."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import PG_ADMIN_URL, REPO, AdminProcess, postgres_bin_dir, postgres_database, wait_until
from tests.faults.harness import publish, record

pytestmark = pytest.mark.slow


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _recreate(db_url: str) -> None:
    name = db_url.rsplit("/", 1)[1]
    with psycopg.connect(_plain(PG_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _root(kind: str, tmp: Path, request: pytest.FixtureRequest) -> str:
    if kind == "local":
        return str(tmp / "root")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/cells"


def _detail(admin: AdminProcess, model_id: str) -> dict:
    r = requests.get(f"{admin.url}/models{model_id}", timeout=10)
    assert r.status_code == 200, f"{model_id}: {r.status_code} {r.text}"
    return r.json()


@pytest.mark.parametrize("store", ["local", "gcs"])
@pytest.mark.parametrize("loss", ["dropped", "older-dump"])
def test_acknowledged_publish_survives_the_database(tmp_path: Path, request: pytest.FixtureRequest,
                                                     store: str, loss: str) -> None:
    root = _root(store, tmp_path, request)
    with postgres_database() as db_url:
        admin = AdminProcess(tmp_path, root=root, db_url=db_url, name="admin-a").start()
        try:
            assert publish(admin.url, "/sax/test/before", 0).status_code == 201
            dump = tmp_path / "older.sql"
            if loss == "older-dump":  # a backup taken before the publish that must survive
                subprocess.run([str(postgres_bin_dir() / "pg_dump"), "--no-owner", "-f", str(dump),
                                _plain(db_url)], check=True, timeout=60)
            t0 = time.monotonic()
            r = publish(admin.url, "/sax/test/acked", 2, overrides={"num_slots": 2})
            record(f"publish answered with its snapshot written ({store})", time.monotonic() - t0, "s")
            assert r.status_code == 201, r.text
            assert r.json()["snapshot"]["behind"] is False, r.json()
            admin.kill9()  # right after the answer
        finally:
            admin.stop()
        _recreate(db_url)
        if loss == "older-dump":
            subprocess.run([str(postgres_bin_dir() / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump),
                            _plain(db_url)], check=True, timeout=60, capture_output=True)
        again = AdminProcess(tmp_path, root=root, db_url=db_url, name="admin-b").start()
        try:
            d = _detail(again, "/sax/test/acked")
            assert (d["model_path"], d["max_replicas"]) == ("test.tiny", 2), d
            _detail(again, "/sax/test/before")
            assert requests.get(f"{again.url}/models", timeout=10).json()["models"] == [
                "/sax/test/acked", "/sax/test/before"]
            # Changes go on from the restored version: a new publish is snapshotted as usual.
            r = publish(again.url, "/sax/test/after", 0)
            assert r.status_code == 201 and r.json()["snapshot"]["behind"] is False, r.text
        finally:
            again.stop()


def test_store_down_publish_succeeds_and_says_the_snapshot_is_behind(tmp_path: Path, pg_url: str) -> None:
    """A local blob store made unwritable (its cell directory replaced by a file)."""
    root = tmp_path / "root"
    admin = AdminProcess(tmp_path, root=str(root), db_url=pg_url, env={"SAX_SNAPSHOT_WAIT": "1"}).start()
    try:
        assert publish(admin.url, "/sax/test/a", 0).json()["snapshot"]["behind"] is False
        cell_dir = root / "sax" / "test"
        for f in cell_dir.iterdir():
            f.unlink()
        cell_dir.rmdir()
        cell_dir.write_text("not a directory")  # every snapshot write fails from now on
        r = publish(admin.url, "/sax/test/b", 0)
        assert r.status_code == 201, r.text
        snap = r.json()["snapshot"]
        assert snap["behind"] is True and snap["snapshot_version"] < snap["version"], snap
        stats = requests.get(f"{admin.url}/stats", timeout=10).json()
        assert stats["snapshot_behind"] >= 1, stats
        metrics = requests.get(f"{admin.url}/metrics", timeout=10).text
        behind = [s.value for f in text_string_to_metric_families(metrics) if f.name == "sax_admin_snapshot_behind"
                  for s in f.samples]
        assert behind == [stats["snapshot_behind"]], metrics
        ls = subprocess.run([sys.executable, "-m", "client.cli", "--admin", f"127.0.0.1:{admin.port}", "ls",
                             "/sax/test"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert ls.returncode == 0 and "/sax/test/b" in ls.stdout, ls.stderr
        assert "snapshot is" in ls.stderr and "behind" in ls.stderr, ls.stderr
        cell_dir.unlink()  # the store is back: the leader's retry catches the snapshot up
        wait_until(lambda: requests.get(f"{admin.url}/stats", timeout=10).json()["snapshot_behind"] == 0,
                   timeout=40, interval=0.2, what="the snapshot catching up")
        assert "/sax/test/b" in (root / "sax" / "test" / "state.json").read_text()
    finally:
        admin.stop()
