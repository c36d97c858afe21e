"""saxutil commands that need no running cell: migrate and convert."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import inspect

from admin_server.db import make_engine, schema_is_current
from model_server.checkpoint import open_checkpoint
from model_server.models import tiny


def saxutil(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saxutil", *args], capture_output=True, text=True, timeout=300)


def test_saxutil_migrate_brings_a_fresh_database_to_head(pg_url: str) -> None:
    r = saxutil("migrate", "--db-url", pg_url)
    assert r.returncode == 0 and "database at head" in r.stdout, r.stderr
    engine = make_engine(pg_url, pool_size=1)
    try:
        assert schema_is_current(engine)[0]
        assert {"models", "servers", "replicas", "leases", "cells"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    r = saxutil("migrate", "--db-url", "postgresql+psycopg://postgres@127.0.0.1:5432/no_such_db")
    assert r.returncode == 1 and r.stderr.startswith("saxutil: ") and r.stderr.count("\n") == 1


def test_saxutil_convert_writes_a_loadable_orbax_checkpoint(tmp_path: Path) -> None:
    hf = tiny.save_hf(tmp_path / "hf")
    r = saxutil("convert", str(hf), str(tmp_path / "orbax"))
    assert r.returncode == 0 and "wrote an Orbax checkpoint" in r.stdout, r.stderr
    ckpt = open_checkpoint(tmp_path / "orbax")
    assert ckpt.format == "orbax" and ckpt.spec == open_checkpoint(hf).spec
    r = saxutil("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.startswith("saxutil: CheckpointError") and r.stderr.count("\n") == 1
