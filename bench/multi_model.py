"""Many models on few servers: a Zipf-distributed mix of calls over models that scale to zero.

    python -m bench.multi_model                          # 20 models, 2 servers holding 3 each
    python -m bench.multi_model --requests 60 --cache warm,cold

Starts its own cell (admin, model servers, frontend with the default --load-wait) and
publishes `--models` copies of test.tiny with min_replicas 0, max_replicas 1; each server
announces room for `--per-server` of them (SAX_MEMORY_BYTES against each model's `ram`),
so most calls for a rarely used model find it unloaded: the admin loads it on demand and
evicts the least recently used replica to make room. `--clients` closed-loop callers send
short greedy completions through the frontend, the model of each drawn from a Zipf law
(exponent `--zipf`) over the models.

A call is *cold* when the admin located no ready replica of its model just before it was
sent. Reported per XLA compilation cache mode (`warm`: the model servers' persistent cache
already holds test.tiny's programs; `cold`: no persistent cache, every load compiles):
cold-start latency p50/p99, warm latency p50/p99, failed requests (target 0) and loads per
minute (the model servers' "loaded" log lines over the run).
"""
from __future__ import annotations

import argparse
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

CELL = "/sax/bench"
UNIT = 1 << 30   # each model's `ram`: a server with room for k models announces k units
OVERRIDES = {"num_slots": 4, "max_seq_len": 128, "max_queue": 64, "ram": UNIT}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


class Cell:
    def __init__(self, servers: int, per_server: int, cache: str) -> None:
        from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, wait_until

        self.tmp = Path(tempfile.mkdtemp(prefix="bench-multi-"))
        xla = ""
        if cache == "warm":
            xla = str(self.tmp / "xla")
            warm_cache(xla)
        env = {"SAX_CELL": CELL, "SAX_COMPILATION_CACHE": xla, "JAX_COMPILATION_CACHE_DIR": xla}
        self.admin = AdminProcess(self.tmp, root=str(self.tmp / "root"), env=env,
                                  extra_args=["--cell", CELL, "--heartbeat-timeout", "5"]).start()
        self.servers = [ModelServerProcess(self.tmp, admin=f"127.0.0.1:{self.admin.port}",
                                           env={**env, "SAX_MEMORY_BYTES": str(per_server * UNIT)},
                                           extra_args=["--cell", CELL]).start() for _ in range(servers)]
        self.frontend = FrontendProcess(self.tmp, self.admin.port, "--log-level", "WARNING").start()
        wait_until(lambda: len(requests.get(f"{self.admin.url}/servers", timeout=10).json()["servers"]) == servers,
                   timeout=60, what="servers announced")

    def loads(self) -> int:
        return sum(s.log().count(f"INFO model_server.manager: loaded {CELL}/") for s in self.servers)

    def stop(self) -> None:
        for p in [self.frontend, *self.servers, self.admin]:
            p.stop()


def warm_cache(path: str) -> None:
    """test.tiny's programs (these shapes) compiled once into `path`."""
    import json
    import os

    code = ("import json, sys; from model_server.__main__ import enable_compilation_cache; "
            "enable_compilation_cache(sys.argv[2]); from model_server.manager import default_loader; "
            "m, e = default_loader('test.tiny', None, json.loads(sys.argv[1]), None); e.stop()")
    overrides = {k: v for k, v in OVERRIDES.items() if k != "ram"}
    subprocess.run([sys.executable, "-c", code, json.dumps(overrides), path], check=True, timeout=900,
                   env={**os.environ, "JAX_COMPILATION_CACHE_DIR": path})


def run(cache: str, args: argparse.Namespace) -> dict[str, Any]:
    cell = Cell(args.servers, args.per_server, cache)
    try:
        models = [f"{CELL}/m{i:02d}" for i in range(args.models)]
        for m in models:
            r = requests.post(f"{cell.admin.url}/models", timeout=10, json={
                "model_id": m, "model_path": "test.tiny", "checkpoint": "None", "replicas": 0,
                "min_replicas": 0, "max_replicas": 1, "idle_seconds": args.idle_seconds, "overrides": OVERRIDES})
            r.raise_for_status()
        weights = zipf_weights(len(models), args.zipf)
        rng = random.Random(args.seed)
        plan = rng.choices(models, weights, k=args.requests)
        lock = threading.Lock()
        cold: list[float] = []
        warm: list[float] = []
        failed: list[str] = []
        loads_before = cell.loads()

        def client() -> None:
            session = requests.Session()
            while True:
                with lock:
                    if not plan:
                        return
                    model = plan.pop()
                was_cold = not requests.get(f"{cell.admin.url}/locate{model}", timeout=10).json()["addresses"]
                t0 = time.monotonic()
                try:
                    r = session.post(f"{cell.frontend.url}/v1/completions", timeout=600, json={
                        "model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
                    ok = r.status_code == 200 and bool(r.json().get("choices"))
                    error = None if ok else f"{model}: HTTP {r.status_code} {r.text[:200]}"
                except requests.RequestException as e:
                    error = f"{model}: {type(e).__name__}: {e}"
                took = time.monotonic() - t0
                with lock:
                    if error:
                        failed.append(error)
                    else:
                        (cold if was_cold else warm).append(took)

        started = time.monotonic()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        minutes = (time.monotonic() - started) / 60
        loads = cell.loads() - loads_before
        return {"cache": cache, "requests": args.requests, "cold": len(cold), "warm": len(warm),
                "cold_p50": pct(cold, 50), "cold_p99": pct(cold, 99), "warm_p50": pct(warm, 50),
                "warm_p99": pct(warm, 99), "failed": len(failed), "failures": failed[:5],
                "loads": loads, "loads_per_min": loads / minutes if minutes else 0.0, "minutes": minutes}
    finally:
        cell.stop()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--per-server", type=int, default=3, help="models that fit on one server")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--idle-seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default="warm,cold", help="XLA cache modes to run: warm, cold or both")
    args = ap.parse_args()
    results = [run(c.strip(), args) for c in args.cache.split(",") if c.strip()]
    print(f"\n{cpu_model()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.models} models "
          f"(test.tiny), {args.servers} servers x {args.per_server}, Zipf {args.zipf}, {args.clients} clients")
    print("| XLA cache | requests | cold | cold p50 s | cold p99 s | warm p50 ms | warm p99 ms | failed | loads/min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['cache']} | {r['requests']} | {r['cold']} | {r['cold_p50']:.1f} | {r['cold_p99']:.1f} | "
              f"{r['warm_p50'] * 1000:.0f} | {r['warm_p99'] * 1000:.0f} | {r['failed']} | {r['loads_per_min']:.1f} |")
        for f in r["failures"]:
            print(f"  failed: {f}")


if __name__ == "__main__":
    main()
