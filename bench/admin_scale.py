"""Admin scale benchmark: heartbeat latency with N servers and reconcile pass time over M models.

    python -m bench.admin_scale --servers 1000 --models 10000 --duration 20

Needs a PostgreSQL server (default: the local one, database `test`, where a
scratch database is created and dropped). Phase 1 seeds M published models
and N servers and times reconcile passes in-process (the first one places
every replica; later ones find nothing to do). Phase 2 starts the admin
server (gunicorn) on that database and has N simulated model servers
heartbeat once a second each over keep-alive HTTP, reporting their replicas
as loaded, and prints latency percentiles.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import insert

from admin_server.db import make_engine, migrate
from admin_server.lease import LeaderLease
from admin_server.leader import lease_name
from admin_server.reconciler import Reconciler
from admin_server.schema import CellState, ModelServer, PublishedModel
from admin_server.settings import AdminSettings
from bench.frontend import group_cpu_s

GiB = 1 << 30


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def seed(url: str, settings: AdminSettings, n_servers: int, n_models: int) -> None:
    engine = make_engine(url)
    now = time.time()
    with engine.begin() as conn:
        conn.execute(insert(CellState).values(cell=settings.cell_name, version=1, snapshot_version=1))
        conn.execute(insert(ModelServer), [{
            "address": f"10.{i // 250}.{i % 250}.1:10001", "cell": settings.cell_name, "boot_id": "b",
            "chip": "cpu", "topology": "1", "device_count": 1, "memory_bytes": 64 * GiB, "tags": [],
            "servable_model_paths": ["test.tiny"], "first_seen": now, "last_heartbeat": now + 3600,
        } for i in range(n_servers)])
        conn.execute(insert(PublishedModel), [{
            "model_id": f"/sax/{settings.cell_name}/m{j}", "cell": settings.cell_name,
            "model_path": "test.tiny", "checkpoint": None, "requested_replicas": 1 + (j % 2),
            **{k: 1 + (j % 2) for k in ("min_replicas", "max_replicas", "target_replicas")},
            "overrides": {"ram": (1 + j % 4) * GiB // 4}, "uuid": str(uuid.uuid4()), "generation": 1,
            "state": "ACTIVE", "failures": 0} for j in range(n_models)])
    engine.dispose()


def time_reconcile(url: str, settings: AdminSettings, passes: int) -> dict[str, float]:
    """Times the first pass (places everything), full passes that find nothing to do,
    and the probe a leader runs each tick when nothing moved."""
    engine = make_engine(url)
    lease = LeaderLease(engine, lease_name(settings), ttl_s=600)
    epoch = lease.acquire_or_renew()
    assert epoch is not None
    rec = Reconciler(engine, settings)

    def timed() -> float:
        t0 = time.perf_counter()
        rec.run(lease.name, lease.holder, epoch)
        return time.perf_counter() - t0

    first = timed()
    full = []
    for _ in range(passes):
        rec._last = None  # force a full pass
        full.append(timed())
    timed()
    probe = statistics.median(timed() for _ in range(passes))
    lease.release()
    engine.dispose()
    return {"first": first, "full": statistics.median(full), "probe": probe}


async def _post(reader, writer, path: str, body: bytes) -> bytes:  # type: ignore[no-untyped-def]
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    length = 0
    status = await reader.readline()
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    payload = await reader.readexactly(length)
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r} {payload[:200]!r}")
    return payload


async def heartbeat_load(port: int, n_servers: int, duration: float, interval: float,
                         admin_pgid: int) -> tuple[list[float], int, float]:
    """Returns (latencies, errors, admin CPU ms per heartbeat over the steady last three quarters)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration

    async def server(i: int) -> None:
        nonlocal errors
        address = f"10.{i // 250}.{i % 250}.1:10001"
        await asyncio.sleep(random.random() * interval)  # spread the phase
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        models: list[dict[str, object]] = []
        version = None
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            body = json.dumps({"server": {"address": address, "boot_id": "b", "chip": "cpu",
                                          "topology": "1", "device_count": 1, "memory_bytes": 64 * GiB,
                                          "servable_model_paths": ["test.tiny"]},
                               "models": models, "desired_version": version}).encode()
            t0 = time.perf_counter()
            try:
                reply = json.loads(await _post(reader, writer, "/heartbeat", body))
                latencies.append(time.perf_counter() - t0)
                version = reply["desired_version"]
                if not reply.get("unchanged"):
                    models = [{"model_id": d["model_id"], "generation": d["generation"], "status": "LOADED"}
                              for d in reply["desired"]]
            except Exception:
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        writer.close()

    async def steady_cpu() -> float:
        await asyncio.sleep(duration / 4)
        cpu0, n0 = group_cpu_s(admin_pgid), len(latencies)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        return (group_cpu_s(admin_pgid) - cpu0) / max(1, len(latencies) - n0) * 1000

    *_, cpu_ms = await asyncio.gather(*(server(i) for i in range(n_servers)), steady_cpu())
    return latencies, errors, cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--models", type=int, default=10000)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--admin-log-level", default="WARNING", help="INFO shows the leader's non-empty passes")
    ap.add_argument("--pg", default=os.environ.get("SAX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()

    name = f"sax_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = "postgresql+psycopg://" + args.pg.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
    settings = AdminSettings(cell="/sax/bench", heartbeat_interval_s=args.interval)
    admin = None
    try:
        migrate(url)
        seed(url, settings, args.servers, args.models)
        t = time_reconcile(url, settings, 4)
        print(f"reconcile over {args.models} models, {args.servers} servers: first pass (places every "
              f"replica) {t['first'] * 1000:.0f} ms; full pass with nothing to do {t['full'] * 1000:.0f} ms; "
              f"idle tick (probe only) {t['probe'] * 1000:.1f} ms")

        port = 20000 + random.randrange(20000)
        root = tempfile.mkdtemp()
        env = {**os.environ, "SAX_CELL": "/sax/bench", "SAX_DB_URL": url, "SAX_ROOT": root,
               "SAX_HEARTBEAT_INTERVAL": str(args.interval), "SAX_HEARTBEAT_TIMEOUT": "30"}
        admin = subprocess.Popen([sys.executable, "-m", "admin_server", "--port", str(port), "--host",
                                  "127.0.0.1", "--workers", str(args.workers), "--threads", str(args.threads),
                                  "--log-level", args.admin_log_level],
                                 env=env, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        import requests
        for _ in range(200):
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        lat, errors, cpu_ms = asyncio.run(heartbeat_load(port, args.servers, args.duration, args.interval,
                                                         admin.pid))
        steady = lat[len(lat) // 4:]  # skip the first round of replica state changes
        print(f"heartbeats: {len(lat)} in {args.duration:.0f}s ({len(lat) / args.duration:.0f}/s) from "
              f"{args.servers} servers, errors {errors}; latency p50 {pct(steady, 50) * 1000:.1f} ms, "
              f"p99 {pct(steady, 99) * 1000:.1f} ms, max {max(steady) * 1000:.1f} ms; admin CPU "
              f"{cpu_ms:.2f} ms per steady heartbeat (leader included)")
    finally:
        if admin:
            admin.terminate()
            admin.wait(20)
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
