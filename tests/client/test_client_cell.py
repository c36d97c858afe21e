"""The client library and saxutil against a real local cell (admin + model servers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from client import sax
from client.router import Router
from tests.cluster import (TINY_OVERRIDES, AdminProcess, ModelServerProcess, free_port, metric,
                           publish_and_wait, wait_until)

pytestmark = pytest.mark.slow
LM = "/sax/test/lm"


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


class Cell:
    def __init__(self, tmp: Path) -> None:
        self.admin = AdminProcess(tmp, root=str(tmp / "root")).start()
        self.admin_addr = f"127.0.0.1:{self.admin.port}"
        self.servers = [ModelServerProcess(tmp, admin=self.admin_addr).start(wait=False) for _ in range(3)]
        for s in self.servers:
            wait_until(lambda s=s: _healthy(s.url), timeout=120, what=f"{s.address} healthy")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.admin.stop()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator[Cell]:
    c = Cell(tmp_path_factory.mktemp("cell"))
    try:
        publish_and_wait(c.admin.url, LM, 2)
        yield c
    finally:
        c.stop()


def saxutil(cell: Cell, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saxutil", "--admin", cell.admin_addr, *args],
                          capture_output=True, text=True, input=input, timeout=timeout)


def test_admin_calls_and_typed_errors(cell: Cell) -> None:
    a = cell.admin_addr
    assert sax.ListAll("/sax/test", admin=a) == [LM]
    path, ckpt, active = sax.List(LM, admin=a)
    assert (path, ckpt, active) == ("test.tiny", "None", 2)
    d = sax.ListDetail(LM, admin=a)
    assert d.max_replicas == 2 and d.overrides == TINY_OVERRIDES
    assert sorted(r.status for r in d.replicas) == ["LOADED", "LOADED"]
    with pytest.raises(sax.InvalidArgument, match="model name"):
        sax.Publish("/sax/test/Bad", "test.tiny", None, 1, admin=a)
    with pytest.raises(sax.AlreadyExists):
        sax.Publish(LM, "test.tiny", None, 1, admin=a)
    with pytest.raises(sax.NotFound):
        sax.List("/sax/test/nope", admin=a)
    with pytest.raises(sax.InvalidArgument, match="model_path"):
        sax.Update(LM, model_path="lm.hf", num_replicas=2, admin=a)
    stats = sax.Stats(admin=a)
    assert stats["models"] == 1 and stats["servers"] == 3
    sax.Publish("/sax/test/second", "test.tiny", None, 1, TINY_OVERRIDES, admin=a)
    assert sax.WaitForReady("/sax/test/second", 1, 240, admin=a).active_replicas == 1
    sax.Update("/sax/test/second", num_replicas=2, admin=a)  # replicas only: nothing reloads
    before = {r.address for r in sax.ListDetail("/sax/test/second", admin=a).replicas}
    assert sax.WaitForReady("/sax/test/second", 2, 240, admin=a).active_replicas == 2
    after = {r.address: r.generation for r in sax.ListDetail("/sax/test/second", admin=a).replicas}
    assert before <= set(after) and set(after.values()) == {1}
    sax.Unpublish("/sax/test/second", admin=a)
    assert sax.ListAll("/sax/test", admin=a) == [LM]
    with pytest.raises(sax.DeadlineExceeded):
        sax.WaitForReady(LM, 5, timeout=0.5, admin=a)


def test_data_calls(cell: Cell) -> None:
    lm = sax.Model(LM, sax.Options(admin=cell.admin_addr)).LM()
    opts = sax.ModelOptions()
    opts.SetExtraInput("temperature", 0)
    opts.SetExtraInput("per_example_max_decode_steps", 6)
    opts.SetTimeout(60)
    results = lm.Generate("hello", opts)
    assert len(results) == 1 and isinstance(results[0][0], str) and results[0][1] <= 0
    assert lm.Generate("hello", opts) == results  # greedy: the same on either replica
    streamed = list(lm.GenerateStream("hello", options=opts))
    assert "".join(t for t, _, _ in streamed) == results[0][0]
    got: list = []
    assert lm.GenerateStream("hello", got.extend, opts) is None
    assert "".join(t for t, _, _ in got) == results[0][0]
    scores = lm.Score("hello", [" world", " there"])
    assert len(scores) == 2 and all(s < 0 for s in scores)
    emb = lm.Embed("hello")
    assert len(emb) > 8 and lm.Embed("hello") == emb
    bad = sax.ModelOptions()
    bad.SetExtraInput("nonsense", 1)
    with pytest.raises(sax.InvalidArgument, match="nonsense"):
        lm.Generate("hello", bad)
    with pytest.raises(sax.NotFound):
        sax.Model("/sax/test/nope", sax.Options(admin=cell.admin_addr)).LM().Generate("x")


def test_router_spreads_load_over_replicas(cell: Cell) -> None:
    router = Router(sax.AdminClient(cell.admin_addr))
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def call() -> None:
        with router.post(LM, "/lm/generate", {"model": LM, "text": "spread", "extra_inputs": {
                "per_example_max_decode_steps": 8}}) as r:
            assert r.status_code == 200
            with lock:
                seen[r.address] = seen.get(r.address, 0) + 1
            r.json()

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and min(seen.values()) >= 3, seen
    assert router.outstanding(next(iter(seen))) == 0
    router.close()


def _prefix_hit_rate(cell: Cell, send, prefixes: list[str], repeats: int) -> float:
    """Prefix-cache hits / lookups over every server while `send(text)` runs the workload:
    each prefix with `repeats` different endings, the prefixes interleaved."""
    def totals() -> tuple[float, float]:
        return (sum(metric(s.url, "vllm:prefix_cache_hits_total", model_name=LM) for s in cell.servers),
                sum(metric(s.url, "vllm:prefix_cache_queries_total", model_name=LM) for s in cell.servers))

    h0, q0 = totals()
    for i in range(repeats):
        for p in prefixes:
            send(f"{p} question {i}?")
    h1, q1 = totals()
    return (h1 - h0) / (q1 - q0)


def test_prefix_affinity_keeps_the_hit_rate_of_one_replica(cell: Cell) -> None:
    """Requests sharing a long leading prompt through the router land where that prefix is
    cached: the hit rate over two replicas is close to that of one replica serving all."""
    extra = {"per_example_max_decode_steps": 2, "temperature": 0}
    system = "You are the assistant of team {}; answer briefly, cite the design, no guesses at all."
    one = next(s for s in cell.servers if _holds(s.url))

    def direct(text: str) -> None:
        r = requests.post(f"{one.url}/lm/generate", json={"model": LM, "text": text, "extra_inputs": extra}, timeout=60)
        assert r.status_code == 200, r.text

    router = Router(sax.AdminClient(cell.admin_addr))

    def routed(text: str) -> None:
        with router.post(LM, "/lm/generate", {"model": LM, "text": text, "extra_inputs": extra}) as r:
            assert r.status_code == 200
            r.json()

    single = _prefix_hit_rate(cell, direct, [system.format(f"alpha{k}") for k in range(4)], 4)
    spread = _prefix_hit_rate(cell, routed, [system.format(f"beta{k}") for k in range(4)], 4)
    router.close()
    assert single > 0.4, single
    assert spread >= 0.85 * single, (spread, single)
    assert router.affinity_hits >= 12


def _holds(url: str) -> bool:
    return metric(url, "sax:model_loaded", model_name=LM, status="LOADED") > 0


def test_saxutil_commands(cell: Cell) -> None:
    r = saxutil(cell, "ls", "/sax")
    assert r.returncode == 0 and "/sax/test" in r.stdout
    r = saxutil(cell, "ls", "/sax/test")
    assert r.returncode == 0 and LM in r.stdout and "Model ID" in r.stdout
    r = saxutil(cell, "ls", LM)
    assert r.returncode == 0 and "test.tiny" in r.stdout and r.stdout.count("LOADED") == 2
    assert json.loads(saxutil(cell, "ls", LM, "--json").stdout)["max_replicas"] == 2
    assert json.loads(saxutil(cell, "ls", "/sax/test", "--json").stdout) == [LM]
    r = saxutil(cell, "servers")
    assert r.returncode == 0 and r.stdout.count("127.0.0.1:") == 3 and "cpu" in r.stdout
    r = saxutil(cell, "lm.generate", LM, "hello", "--extra", "temperature:0,per_example_max_decode_steps:5")
    assert r.returncode == 0 and "Generate" in r.stdout and "Score" in r.stdout, r.stderr
    r = saxutil(cell, "lm.generate", LM, "-", "-n", "2", "--extra", "per_example_max_decode_steps:3", input="hi")
    assert r.returncode == 0 and r.stdout.count("\n| ") >= 3, r.stdout
    r = saxutil(cell, "lm.generate", LM, "hello", "--stream", "--extra", "temperature:0,per_example_max_decode_steps:5")
    assert r.returncode == 0
    r = saxutil(cell, "lm.score", LM, "hello", " world", " there")
    assert r.returncode == 0 and " world" in r.stdout and "Score" in r.stdout
    r = saxutil(cell, "lm.embed", LM, "hello")
    assert r.returncode == 0 and len(json.loads(r.stdout)) > 8
    r = saxutil(cell, "publish", "/sax/test/cli", "test.tiny", "None", "1", "num_slots=2", "max_seq_len=64",
                "--wait", timeout=300)
    assert r.returncode == 0 and "is ready" in r.stdout, r.stderr
    assert "ready" in r.stderr  # progress display
    r = saxutil(cell, "update", "/sax/test/cli", "--replicas", "0")
    assert r.returncode == 0 and "0 replicas" in r.stdout
    r = saxutil(cell, "update", "/sax/test/cli", "--max-replicas", "2", "--idle-seconds", "15")
    assert r.returncode == 0 and "0 replicas (0..2, idle 15s)" in r.stdout, r.stdout + r.stderr
    r = saxutil(cell, "ls", "/sax/test/cli")
    assert r.returncode == 0 and "| Min | Max | State" in r.stdout and "IDLE" in r.stdout, r.stdout
    assert "last scaling: updated to 0 replicas" in r.stdout, r.stdout
    r = saxutil(cell, "publish", "/sax/test/cli2", "test.tiny", "None", "1", "--min-replicas", "0",
                "--max-replicas", "3", "--idle-seconds", "60")
    assert r.returncode == 0, r.stderr
    d = json.loads(saxutil(cell, "ls", "/sax/test/cli2", "--json").stdout)
    assert (d["min_replicas"], d["max_replicas"], d["idle_seconds"]) == (0, 3, 60)
    assert saxutil(cell, "unpublish", "/sax/test/cli2").returncode == 0
    r = saxutil(cell, "publish", "/sax/test/cli3", "test.tiny", "None", "1", "--min-replicas", "2")
    assert r.returncode == 1 and "min_replicas <= replicas" in r.stderr
    r = saxutil(cell, "unpublish", "/sax/test/cli")
    assert r.returncode == 0
    r = saxutil(cell, "publish", "/sax/test/BAD", "test.tiny", "None", "1")
    assert r.returncode == 1 and r.stderr.startswith("saxutil: InvalidArgument") and r.stderr.count("\n") == 1
    r = saxutil(cell, "unpublish", "/sax/test/nope")
    assert r.returncode == 1 and "NotFound" in r.stderr
    r = saxutil(cell, "publish", LM, "test.tiny", "None", "1", "bogus=1")
    assert r.returncode == 1 and "unknown override" in r.stderr
    for cmd in ["publish", "unpublish", "update", "ls", "servers", "watch", "lm.generate", "lm.score",
                "lm.embed", "migrate", "convert", "up"]:
        h = saxutil(cell, cmd, "--help")
        assert h.returncode == 0 and "Example:" in h.stdout, cmd


def test_saxutil_watch_sees_replicas_come_and_go(cell: Cell) -> None:
    a = cell.admin_addr
    sax.Publish("/sax/test/watched", "test.tiny", None, 1, TINY_OVERRIDES, admin=a)
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "--admin", a, "watch", "/sax/test/watched",
                             "--count", "3"], stdout=subprocess.PIPE, text=True)
    try:
        sax.WaitForReady("/sax/test/watched", 1, 240, admin=a)
        sax.Update("/sax/test/watched", num_replicas=2, admin=a)
        sax.WaitForReady("/sax/test/watched", 2, 240, admin=a)
        sax.Update("/sax/test/watched", num_replicas=1, admin=a)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        sax.Unpublish("/sax/test/watched", admin=a)
    assert out.count("+ ") == 2 and out.count("- ") == 1, out


def test_replica_killed_during_traffic_fails_no_call(cell: Cell) -> None:
    lm = sax.Model(LM, sax.Options(admin=cell.admin_addr)).LM()
    opts = sax.ModelOptions()
    opts.SetExtraInput("per_example_max_decode_steps", 4)
    holders = {r.address for r in sax.ListDetail(LM, admin=cell.admin_addr).replicas if r.status == "LOADED"}
    failures: list[Exception] = []
    done = threading.Event()
    count = [0]

    def traffic() -> None:
        while not done.is_set():
            try:
                lm.Generate("keep going", opts)
                count[0] += 1
            except Exception as e:  # any failed call fails the test
                failures.append(e)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = next(s for s in cell.servers if s.address in holders)
    victim.kill9()
    # The admin notices and places a replacement on the third server; traffic goes on.
    def replaced() -> bool:
        loaded = {r.address for r in sax.ListDetail(LM, admin=cell.admin_addr).replicas if r.status == "LOADED"}
        return victim.address not in loaded and len(loaded) == 2
    wait_until(replaced, timeout=240, interval=0.3, what="replacement replica")
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join()
    assert failures == [] and count[0] > 10
    now = {r.address for r in sax.ListDetail(LM, admin=cell.admin_addr).replicas if r.status == "LOADED"}
    assert victim.address not in now and len(now) == 2


def test_generation_continues_from_cache_while_admin_is_down(cell: Cell) -> None:
    lm = sax.Model(LM, sax.Options(admin=cell.admin_addr)).LM()
    opts = sax.ModelOptions()
    opts.SetExtraInput("per_example_max_decode_steps", 3)
    lm.Generate("warm the cache", opts)
    cell.admin.kill9()
    try:
        for _ in range(5):
            assert lm.Generate("admin is gone", opts)
    finally:
        cell.admin = AdminProcess(cell.admin.log_path.parent, root=str(cell.admin.log_path.parent / "root"),
                                  port=cell.admin.port).start()


@pytest.mark.parametrize("interrupts", [1, 2])
def test_saxutil_up_serves_and_stops_cleanly_on_sigint(tmp_path: Path, tiny_compiled: None,
                                                        interrupts: int) -> None:
    """Ctrl-C stops every process of the cell; so does an impatient second Ctrl-C, which
    arrives while the first is stopping them."""
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "saxutil", "up", "--root", str(tmp_path / "root"),
                             "--admin-port", str(ports[0]), "--model-server-port", str(ports[1]),
                             "--frontend-port", str(ports[2]), "--timeout", "300",
                             *[f"--override={k}={v}" for k, v in TINY_OVERRIDES.items()]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops the cell" in line:
                break
        out = "".join(lines)
        assert "/sax/test/demo is ready" in out, out + proc.stderr.read() if proc.poll() is not None else out
        r = subprocess.run(["curl", "-s", f"http://localhost:{ports[1]}/v1/completions", "-H",
                            "Content-Type: application/json", "-d",
                            '{"model": "/sax/test/demo", "prompt": "hello", "max_tokens": 4}'],
                           capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout)["object"] == "text_completion"
        children = descendants(proc.pid)
        assert len(children) >= 3  # admin, model server, frontend and their workers
        for _ in range(interrupts):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        proc.wait(60)
        assert proc.returncode == 0
        time.sleep(0.5)
        alive = [p for p in children if os.path.exists(f"/proc/{p}")]
        assert alive == [], f"left behind: {alive}"
        for port in ports:
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://localhost:{port}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
