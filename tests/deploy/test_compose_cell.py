"""docker/docker-compose.yml end to end, without Docker: the local PostgreSQL and
gcp-storage-emulator stand in for the `postgres` and `gcs` services and every Saxplane service
runs as a local process (compose_cell.py), then the Saxml HTTP tutorial and the OpenAI SDK go
through the frontend, the way an operator does after `docker compose up`."""
from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import requests

from tests.cluster import PG_ADMIN_URL, TINY_OVERRIDES, create_bucket, gcs_emulator, postgres_database, wait_until
from tests.deploy import deploylib as dl
from tests.deploy import imagelib as il
from tests.deploy.compose_cell import LocalCell

MODEL = "/sax/test/tiny"


@pytest.fixture
def cell(compose: dict[str, Any], tmp_path: Path, tiny_compiled: None) -> Iterator[LocalCell]:
    _, stages = il.parse_dockerfile()
    image_env = {k: v for k, v in stages[-1].env().items()
                 if k not in ("PATH", "HOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    with postgres_database() as db_url, gcs_emulator() as gcs_host:
        create_bucket(gcs_host, dl.gcs_bucket(compose["services"]["gcs"]))
        local = LocalCell(compose, tmp_path, db_url, gcs_host, image_env)
        try:
            yield local
        finally:
            local.stop()


def _recreate_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_cell_serves_the_tutorial_and_the_openai_sdk(cell: LocalCell) -> None:
    t0 = time.monotonic()
    cell.up()
    assert cell.procs["migrate"].proc.returncode == 0  # type: ignore[union-attr]
    for name in ("admin", "model-server-1", "model-server-2", "frontend"):
        cell.wait_healthy(name)
    fe = cell.url("frontend")
    started = time.monotonic() - t0

    # The Saxml HTTP tutorial (shared/reference/004), against the frontend's published port.
    assert requests.get(fe, timeout=10).json() == {"message": "HTTP Server for SAX Client"}
    r = requests.post(f"{fe}/publish", timeout=30, json={
        "model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "replicas": 2,
        "overrides": TINY_OVERRIDES})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("model", "checkpoint", "replicas")} == {
        "model": MODEL, "checkpoint": "None", "replicas": 2}

    def listcell() -> dict[str, Any]:
        r = requests.get(f"{fe}/listcell", json={"model": MODEL}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()
    wait_until(lambda: listcell()["active_replicas"] == 2, timeout=240, interval=0.5,
               what="both model servers serving")
    assert listcell() == {"model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "max_replicas": 2,
                          "active_replicas": 2, "min_replicas": 2, "state": "READY", "reason": None}
    gen = requests.post(f"{fe}/generate", timeout=60, json={
        "model": MODEL, "query": "Q: Who is Harry Potter's mom? A: ",
        "extra_inputs": {"temperature": 0.0, "per_example_max_decode_steps": 8}})
    assert gen.status_code == 200, gen.text
    (text, score), *_ = gen.json()
    assert isinstance(text, str) and isinstance(score, float)
    assert requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [MODEL]

    # The OpenAI SDK, as from the host.
    from openai import OpenAI

    client = OpenAI(base_url=f"{fe}/v1", api_key="unused", max_retries=0, timeout=60)
    assert MODEL in [m.id for m in client.models.list().data]
    done = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 8

    # The model servers advertise their compose names, mapped here: both hold a replica.
    detail = requests.get(f"{cell.url('admin')}/models{MODEL}", timeout=10).json()
    assert sorted(r["address"] for r in detail["replicas"] if r["status"] == "LOADED") == sorted(
        cell.url(n).removeprefix("http://") for n in ("model-server-1", "model-server-2"))

    # `docker compose run --rm saxutil ls /sax/test`
    assert MODEL in cell.run("saxutil", ["ls", "/sax/test"])

    # Backup: the leader's snapshot in the bucket. Restore: an admin on an empty database.
    bucket = dl.gcs_bucket(cell.compose["services"]["gcs"])
    snap_url = f"{cell.gcs_host}/storage/v1/b/{bucket}/o/{urllib.parse.quote('sax/test/state.json', safe='')}"
    wait_until(lambda: MODEL in requests.get(snap_url, params={"alt": "media"}, timeout=5).text, timeout=30,
               what="snapshot in the bucket")
    cell.procs["admin"].stop()
    _recreate_database(cell.db_url)
    cell.start("migrate")
    cell.wait_completed("migrate")
    cell.start("admin")
    cell.wait_healthy("admin")
    assert requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [MODEL]
    wait_until(lambda: listcell()["active_replicas"] == 2, timeout=120, interval=0.5, what="replicas again")

    r = requests.post(f"{fe}/unpublish", json={"model": MODEL}, timeout=30)
    assert r.status_code == 200 and r.json() == {"model": MODEL}, r.text
    wait_until(lambda: requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [],
               timeout=30, what="unpublished")
    print(f"cell up and healthy in {started:.1f}s; whole flow {time.monotonic() - t0:.1f}s")
