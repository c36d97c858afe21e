"""HTTP frontend overhead: the same requests through the frontend and straight to a model server.

    python -m bench.frontend                       # starts its own cell (admin, model server, frontend)
    python -m bench.frontend --frontend http://127.0.0.1:8888 --model-server http://127.0.0.1:10001

Measures, for a short non-streaming generation (/v1/completions, greedy, a few tokens),
requests/s and latency p50/p99 at 1 and 32 concurrent keep-alive clients, on both paths,
in alternating rounds (so drifting machine load hits both alike); then the time to the
first byte of a stream on both paths. Prints a table with what the frontend adds; the
throughput cost both pooled and as the median of the rounds' paired costs (each round runs
both paths back to back, so a host whose speed drifts over minutes moves both alike).
Targets: < 2 ms added at p50, < 5% fewer requests/s at 32 clients.

Layouts of the local cell (--layout), none of them a cell's (three roles, two CPUs):
* `isolated` (the default on two or more CPUs): the model server (and the idle admin) alone
  on its CPU, the frontend and the load on the other. The model server has its cores to
  itself and every caller, the frontend or a direct client, is elsewhere, as in a cell, so
  both paths cost the model server alike; the frontend shares its CPU with the load, which
  slows it (a cost charged to the frontend path; the load generator is lean, ~0.05 ms of CPU
  per request, see Poster, and the bench prints what it spent).
* `split`: the frontend alone on its CPU, the admin, the model server and the load on the
  other. The frontend has its cores to itself, as in a cell; but the direct path has its
  client beside the model server (wake-ups within one CPU) where the frontend path crosses
  CPUs, which no cell's client does: measured on an Intel Xeon (2026-12-05), the model server
  spent 5.6% more CPU per request through the frontend in this layout, none in `isolated`.
* `shared`: every process on every CPU, so the frontend's CPU time is taken from the model
  server's.
The model server's engine counters show how well each path's requests were batched (decode
steps and prefill calls per request): at 32 clients that, more than the frontend's own CPU,
is what the frontend path costs.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

MODEL = "/sax/bench/lm"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def _connect(url: str) -> http.client.HTTPConnection:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Poster:
    """One keep-alive connection that sends the same POST again and again: the request encoded
    once, the answer framed by its Content-Length. The load generator's CPU is not what the
    benchmark measures, and in the isolated layout it comes out of the frontend's CPU:
    http.client, which parses every answer's headers through the email package, spent ~3x
    as much CPU per request as this."""

    def __init__(self, url: str, path: str, body: bytes) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def post(self) -> tuple[int, bytes]:
        """Sends the request; returns (status, body)."""
        self.sock.sendall(self.request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        lines = head.split(b"\r\n")
        length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                       if k.strip().lower() == b"content-length"), None)
        if length is None:
            raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
        while len(self.buf) < length:
            self._more()
        data, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), data

    def close(self) -> None:
        self.sock.close()


def run_load(url: str, body: bytes, clients: int, seconds: float) -> tuple[int, list[float], float, float]:
    """Closed loop: `clients` threads, each on its own keep-alive connection, for `seconds`.
    Returns (requests done, latencies in seconds, elapsed, this process's CPU seconds)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        conn = Poster(url, "/v1/completions", body)
        start.wait()
        mine = latencies[i]
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            status, data = conn.post()
            if status != 200:
                errors.append(f"{status} {data[:200]!r}")
                break
            mine.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"{url}: {errors[0]}")
    flat = [x for lst in latencies for x in lst]
    return len(flat), flat, elapsed, cpu


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process of a process group."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


ENGINE_COUNTERS = ("sax:engine_decode_steps_total", "sax:engine_prefill_calls_total")


def engine_counts(ms_url: str) -> tuple[float, ...]:
    """The model server's engine counters (decode steps, prefill calls), summed over models:
    how well requests were batched."""
    text = requests.get(f"{ms_url}/metrics", timeout=10).text
    totals = dict.fromkeys(ENGINE_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return tuple(totals.values())


def ttfb(url: str, body: bytes) -> float:
    """Seconds from sending a streaming request to the first `data:` bytes."""
    conn = _connect(url)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        t1 = time.perf_counter()
        assert resp.status == 200 and first, (resp.status, first)
        resp.read()
        return t1 - t0
    finally:
        conn.close()


class LocalCell:
    """admin + one model server + one frontend, in a temporary directory."""

    def __init__(self, workers: int, slots: int, frontend_cpus: set[int] | None = None,
                 load_with_frontend: bool = False) -> None:
        """With `frontend_cpus`, the frontend runs on those CPUs and everything else on the rest;
        this process (so the load it makes) too, unless `load_with_frontend`."""
        from tests.cluster import AdminProcess, Proc, free_port, wait_http, wait_until

        all_cpus = os.sched_getaffinity(0)
        cell_cpus = all_cpus - frontend_cpus if frontend_cpus else all_cpus
        os.sched_setaffinity(0, cell_cpus)  # children inherit it
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
        self.procs: list[Any] = []
        env = {"SAX_CELL": "/sax/bench"}  # (model servers keep an XLA compilation cache by default)
        admin = AdminProcess(self.tmp, root=str(self.tmp / "root"), env=env, extra_args=["--cell", "/sax/bench"])
        self.procs.append(admin.start())
        ms_port, fe_port = free_port(), free_port()
        ms = Proc([sys.executable, "-m", "model_server", "--admin", f"127.0.0.1:{admin.port}", "--port",
                   str(ms_port), "--host", "127.0.0.1", "--advertise", f"127.0.0.1:{ms_port}", "--cell",
                   "/sax/bench", "--heartbeat-interval", "0.5", "--threads", "128"], env, self.tmp / "ms.log")
        self.procs.append(ms.start())
        self.model_server_pgid = ms.pid
        self.model_server = f"http://127.0.0.1:{ms_port}"
        wait_http(f"{self.model_server}/healthz", timeout=120, proc=ms.proc)
        r = requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": MODEL, "model_path": "test.tiny", "checkpoint": "None", "replicas": 1,
            "overrides": {"num_slots": slots, "max_seq_len": 128, "prefill_buckets": [32, 128]}})
        r.raise_for_status()
        os.sched_setaffinity(0, frontend_cpus or all_cpus)
        fe = Proc([sys.executable, "-m", "http_frontend", "--port", str(fe_port), "--host", "127.0.0.1",
                   "--admin", f"127.0.0.1:{admin.port}", "--workers", str(workers), "--threads", "64",
                   "--log-level", "WARNING"], {}, self.tmp / "frontend.log")
        self.procs.append(fe.start())
        os.sched_setaffinity(0, frontend_cpus if frontend_cpus and load_with_frontend else cell_cpus)
        self.frontend_pgid = fe.pid
        self.frontend = f"http://127.0.0.1:{fe_port}"
        wait_http(f"{self.frontend}/healthz", timeout=60, proc=fe.proc)
        wait_until(lambda: requests.get(f"{admin.url}/models{MODEL}", timeout=10).json()["active_replicas"] == 1,
                   timeout=600, interval=0.5, what="model ready")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def cpu_now(cell: "LocalCell | None") -> tuple[float, float]:
    if cell is None:
        return 0.0, 0.0
    return group_cpu_s(cell.frontend_pgid), group_cpu_s(cell.model_server_pgid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frontend", help="frontend URL of an existing cell (with --model-server)")
    ap.add_argument("--model-server", help="model server URL of that cell")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--duration", type=float, default=12.0, help="seconds per path and concurrency")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds the duration is split into")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--streams", type=int, default=40, help="streams timed for TTFB, per path")
    ap.add_argument("--workers", type=int, default=1, help="frontend workers (own cell only)")
    ap.add_argument("--slots", type=int, default=32, help="decode slots (own cell only)")
    ap.add_argument("--layout", choices=("split", "isolated", "shared"),
                    default="isolated" if len(os.sched_getaffinity(0)) >= 2 else "shared",
                    help="isolated: the model server alone on a CPU; split: the frontend alone on a "
                         "CPU; shared: every process on every CPU (see above)")
    args = ap.parse_args()

    cell = None
    if args.frontend and args.model_server:
        fe_url, ms_url = args.frontend.rstrip("/"), args.model_server.rstrip("/")
    else:
        print("starting a local cell (admin, model server, frontend)...", file=sys.stderr)
        cpus = sorted(os.sched_getaffinity(0))
        cell = LocalCell(args.workers, args.slots, {cpus[-1]} if args.layout != "shared" else None,
                         load_with_frontend=args.layout == "isolated")
        fe_url, ms_url = cell.frontend, cell.model_server
    paths = {"direct": ms_url, "frontend": fe_url}
    body = json.dumps({"model": args.model, "prompt": "Hello world", "max_tokens": args.max_tokens,
                       "temperature": 0}).encode()
    stream_body = json.dumps({"model": args.model, "prompt": "Hello world", "max_tokens": 16,
                              "temperature": 0, "stream": True}).encode()
    try:
        for url in paths.values():  # warm-up: connections, routing caches, engine
            run_load(url, body, 4, 1.0)
        rows = []
        cpu_per_req: dict[str, list[float]] = {"frontend": [], "model server (direct)": [],
                                               "model server (frontend)": [], "load (direct)": [],
                                               "load (frontend)": []}
        batching: dict[tuple[int, str], list[float]] = {}  # (clients, path) -> [steps, prefills, requests]
        for clients in (int(c) for c in args.concurrency.split(",")):
            done = {k: 0 for k in paths}
            elapsed = {k: 0.0 for k in paths}
            lat: dict[str, list[float]] = {k: [] for k in paths}
            round_rps: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(args.rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    eng0 = engine_counts(ms_url)  # (scraped outside the CPU window)
                    cpu0 = cpu_now(cell)
                    n, ls, el, load_cpu = run_load(paths[name], body, clients, args.duration / args.rounds)
                    cpu_per_req[f"load ({name})"].append(load_cpu / n)
                    cpu1 = cpu_now(cell)
                    eng1 = engine_counts(ms_url)
                    acc = batching.setdefault((clients, name), [0.0, 0.0, 0.0])
                    acc[0] += eng1[0] - eng0[0]
                    acc[1] += eng1[1] - eng0[1]
                    acc[2] += n
                    if cell is not None:
                        if name == "frontend":
                            cpu_per_req["frontend"].append((cpu1[0] - cpu0[0]) / n)
                        cpu_per_req[f"model server ({name})"].append((cpu1[1] - cpu0[1]) / n)
                    done[name] += n
                    elapsed[name] += el
                    lat[name] += ls
                    round_rps[name].append(n / el)
            rps = {k: done[k] / elapsed[k] for k in paths}
            paired = [1 - f / d for f, d in zip(round_rps["frontend"], round_rps["direct"])]
            rows.append((clients, rps, paired, {k: pct(v, 50) for k, v in lat.items()},
                         {k: pct(v, 99) for k, v in lat.items()}))
        ttfbs: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(args.streams):
            for name in (paths if i % 2 == 0 else reversed(list(paths))):
                ttfbs[name].append(ttfb(paths[name], stream_body))
    finally:
        if cell is not None:
            cell.stop()

    ms = 1e3
    layout = "" if cell is None else f"layout {args.layout}; "
    print(f"\nHTTP frontend overhead ({os.cpu_count()} CPUs; {layout}/v1/completions, {args.max_tokens} greedy tokens; "
          f"{args.duration:.0f}s per cell in {args.rounds} alternating rounds)\n")
    print("| clients | direct req/s | frontend req/s | throughput cost | cost, median of rounds (range) "
          "| direct p50 ms | frontend p50 ms | added p50 ms | direct p99 ms | frontend p99 ms | added p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, rps, paired, p50, p99 in rows:
        cost = 1 - rps["frontend"] / rps["direct"]
        d50, f50, d99, f99 = p50["direct"] * ms, p50["frontend"] * ms, p99["direct"] * ms, p99["frontend"] * ms
        print(f"| {clients} | {rps['direct']:.1f} | {rps['frontend']:.1f} | {cost * 100:+.1f}% "
              f"| {statistics.median(paired) * 100:+.1f}% ({min(paired) * 100:+.1f} to {max(paired) * 100:+.1f}) "
              f"| {d50:.2f} | {f50:.2f} | {f50 - d50:+.2f} | {d99:.2f} | {f99:.2f} | {f99 - d99:+.2f} |")
    print(f"\n| stream TTFB ({args.streams} sequential streams each) | direct | frontend | added |")
    print("|---|---:|---:|---:|")
    for q in (50, 99):
        d, f = pct(ttfbs["direct"], q) * ms, pct(ttfbs["frontend"], q) * ms
        print(f"| p{q} ms | {d:.2f} | {f:.2f} | {f - d:+.2f} |")
    if cpu_per_req["frontend"]:
        f, m, d = (statistics.mean(cpu_per_req[k]) * ms for k in ("frontend", "model server (frontend)",
                                                                  "model server (direct)"))
        print(f"\nCPU per request (mean over all rounds): model server {d:.2f} ms when called directly; "
              f"through the frontend: frontend {f:.2f} ms + model server {m:.2f} ms "
              f"(the frontend's share of the CPU work: {f / (f + m) * 100:.0f}%)")
    print(f"load generator CPU per request: {statistics.mean(cpu_per_req['load (direct)']) * ms:.2f} ms direct, "
          f"{statistics.mean(cpu_per_req['load (frontend)']) * ms:.2f} ms through the frontend")
    print("\nBatching in the model server's engine, per request (fewer: more requests per step):")
    for (clients, name), (steps, prefills, n) in batching.items():
        print(f"  {clients} clients, {name}: {steps / n:.3f} decode steps, {prefills / n:.3f} prefill calls")
    print(f"\nmean TTFB: direct {statistics.mean(ttfbs['direct']) * ms:.2f} ms, "
          f"frontend {statistics.mean(ttfbs['frontend']) * ms:.2f} ms")


if __name__ == "__main__":
    main()
