"""A two-host slice in a real cell: two processes (2 CPU devices each, gloo collectives) form
one 4-device model server.

Rank 0 registers as one server ("2 hosts x 2 devices", 4 devices); a Llama-shaped checkpoint
(transformers' LlamaForCausalLM, GQA) sharded over all 4 devices serves greedy text identical
to transformers' `generate` through the frontend. A follower frozen (SIGSTOP) under a stream:
the stream ends with an error event within the slice timeout, the replica leaves the routing
table, rank 0 exits by itself and the model moves to the single-host server. A restarted pair
registers again and takes a replica; kill -9 of its follower: out of routing within 20 s,
every call answered meanwhile. kill -9 of rank 0: the follower exits by itself within the
heartbeat timeout.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from tests.cluster import (AdminProcess, FrontendProcess, ModelServerProcess, Proc, admin_and_frontend, free_port,
                           wait_http, wait_until)

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MODEL = "/sax/test/llama-slice"
OVERRIDES = {"num_slots": 2, "max_seq_len": 64, "prefill_buckets": [64], "dtype": "float32", "max_queue": 8}
PROMPT_LEN, NEW_TOKENS = 20, 16
HEARTBEAT_TIMEOUT_S = 6.0  # the model server's default: 3 heartbeats of 2 s
SLICE_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
             "SAX_SLICE_TIMEOUT": "3"}


def _coordinator_port() -> int:
    """A free port whose successor (rank 0's side channel) is free too."""
    import socket

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


class Slice:
    """Rank 0 (a model server) and rank 1 (a follower) of a 2-host slice."""

    def __init__(self, tmp: Path, admin_port: int, name: str, env: dict[str, str] = SLICE_ENV):
        port = _coordinator_port()
        flags = ["--slice-hosts", "2", "--coordinator", f"127.0.0.1:{port}"]
        self.leader = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin_port}", env=env,
                                         extra_args=flags + ["--slice-rank", "0"])
        self.follower = Proc([sys.executable, "-m", "model_server", *flags, "--slice-rank", "1"], env,
                             tmp / f"follower-{name}.log")

    def start(self) -> "Slice":
        self.leader.start(wait=False)
        self.follower.start()
        wait_http(f"{self.leader.url}/healthz", timeout=180, proc=self.leader.proc)
        return self

    def stop(self) -> None:
        self.follower.stop()
        self.leader.stop()


def _locate(admin: AdminProcess) -> list[str]:
    return requests.get(f"{admin.url}/locate{MODEL}", timeout=10).json()["addresses"]


def _servers(admin: AdminProcess) -> dict[str, dict]:
    return {s["address"]: s for s in requests.get(f"{admin.url}/servers", timeout=10).json()["servers"]}


def _reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], dtype=torch.long)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return seq[0, len(prompt):].tolist()


def _complete(frontend: FrontendProcess, prompt: list[int]) -> requests.Response:
    return requests.post(f"{frontend.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})


@pytest.fixture(scope="module")
def cell(tmp_path_factory) -> Iterator[tuple[Path, AdminProcess, FrontendProcess]]:
    tmp = tmp_path_factory.mktemp("slice_cell")
    with admin_and_frontend(tmp) as (admin, frontend):
        yield tmp, admin, frontend


def _stream_until_frozen(frontend: FrontendProcess, prompt: list[int], freeze) -> tuple[str, list, float]:
    """A long stream through the frontend; `freeze()` runs at its first token. Returns how it
    ended ("done", "error" or "HTTP <status>"), its events, and seconds from the freeze to the end."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}
    events: list = []
    frozen = 0.0
    with requests.post(f"{frontend.url}/v1/completions", json=body, stream=True, timeout=(10, 30)) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}", events, 0.0
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
            if not frozen:
                freeze()
                frozen = time.monotonic()
            if events[-1] == "[DONE]":
                break
    took = time.monotonic() - frozen
    return ("error" if any(isinstance(e, dict) and "error" in e for e in events) else "done"), events, took


def test_slice_serves_fails_over_and_comes_back(cell, torch_models):
    from transformers import AutoTokenizer

    tmp, admin, frontend = cell
    model, path = torch_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(path))
    prompt = np.random.default_rng(11).integers(3, model.config.vocab_size, PROMPT_LEN).tolist()
    want = tok.decode(prompt + _reference(model, prompt, NEW_TOKENS))[len(tok.decode(prompt)):]

    pair = Slice(tmp, admin.port, "a").start()
    single = pair2 = pair3 = None
    try:
        # One server for the whole slice.
        srv = wait_until(lambda: _servers(admin).get(pair.leader.address), timeout=30, what="the slice registered")
        assert srv["device_count"] == 4 and srv["topology"] == "2 hosts x 2 devices", srv
        assert len(_servers(admin)) == 1
        requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": MODEL, "model_path": "lm.llama", "checkpoint": str(path), "replicas": 1,
            "overrides": OVERRIDES}).raise_for_status()
        wait_until(lambda: _locate(admin) == [pair.leader.address], timeout=600, interval=0.5,
                   what="the model loaded on the slice")
        r = _complete(frontend, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert "built lm.llama" in pair.follower.log()

        # A single-host server joins; the follower hangs (SIGSTOP) under a stream in flight.
        single = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}").start()
        wait_until(lambda: single.address in _servers(admin), timeout=30, what="the single server registered")
        end, events, took = _stream_until_frozen(frontend, prompt[:4], pair.follower.pause)
        assert end == "error" and events[-1] == "[DONE]", (end, events[-3:])
        err = next(e for e in events if isinstance(e, dict) and "error" in e)
        assert took < 3 + 5, f"the stream ended {took:.1f} s after the freeze"  # SAX_SLICE_TIMEOUT 3
        wait_until(lambda: pair.leader.address not in _locate(admin), timeout=20, interval=0.1,
                   what="the hung slice out of the routing table")
        wait_until(lambda: pair.leader.proc.poll() is not None, timeout=HEARTBEAT_TIMEOUT_S + 10,
                   what="rank 0 exiting by itself")
        assert "stopped answering" in pair.leader.log()
        print(f"[slice figure] follower frozen under a stream -> stream error event: {took:.2f} s ({err})")
        wait_until(lambda: _locate(admin) == [single.address], timeout=600, interval=0.5,
                   what="the model moved to the single-host server")
        r = _complete(frontend, prompt)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
        pair.stop()

        # The pair restarted: it registers again and takes the second replica.
        pair2 = Slice(tmp, admin.port, "b").start()
        wait_until(lambda: pair2.leader.address in _servers(admin), timeout=30, what="the new slice registered")
        requests.put(f"{admin.url}/models{MODEL}", timeout=10, json={"replicas": 2}).raise_for_status()
        wait_until(lambda: pair2.leader.address in _locate(admin), timeout=600, interval=0.5,
                   what="a replica on the restarted slice")
        r = requests.post(f"{pair2.leader.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text

        # kill -9 of the follower: out of routing within 20 s; calls are answered meanwhile.
        pair2.follower.kill9()
        killed = time.monotonic()
        answers = []
        while pair2.leader.address in _locate(admin):
            assert time.monotonic() - killed < 20, "the dead slice is still routed to"
            answers.append(_complete(frontend, prompt))
        gone_s = time.monotonic() - killed
        answers.append(_complete(frontend, prompt))
        assert all(a.status_code in (200, 429, 500, 502, 503) for a in answers), [a.text for a in answers]
        assert answers[-1].status_code == 200 and answers[-1].json()["choices"][0]["text"] == want
        wait_until(lambda: pair2.leader.proc.poll() is not None, timeout=HEARTBEAT_TIMEOUT_S + 10,
                   what="rank 0 exiting by itself")
        assert "slice rank 1 is gone" in pair2.leader.log()
        print(f"[slice figure] follower killed -> replica out of routing: {gone_s:.2f} s")
        pair2.stop()

        # kill -9 of rank 0: the follower exits by itself within the heartbeat timeout.
        pair3 = Slice(tmp, admin.port, "c").start()
        wait_until(lambda: pair3.leader.address in _servers(admin), timeout=30, what="the third slice registered")
        pair3.leader.kill9()
        t0 = time.monotonic()
        wait_until(lambda: pair3.follower.proc.poll() is not None, timeout=HEARTBEAT_TIMEOUT_S,
                   interval=0.05, what="the follower exiting")
        print(f"[slice figure] rank 0 killed -> follower exited: {time.monotonic() - t0:.2f} s")
    finally:
        for p in (pair, pair2, pair3):
            if p is not None:
                p.stop()
        if single is not None:
            single.stop()
