"""A real model server under load: the bounded queue over HTTP and the Prometheus metrics.

The model is a random Llama-shaped checkpoint big enough (~90 MB, ~4 ms a token on CPU) that a
400-token generation holds its one decode slot for well over a second: while it runs, what
waits and what is refused is deterministic.
"""
from __future__ import annotations

import functools
import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import ModelServerProcess, wait_http, wait_until

pytestmark = pytest.mark.slow
MODEL = "/sax/test/slow"
LONG = 400  # tokens of a long generation (~1.7 s here, more on a busy machine)


def write_random_llama(out: Path) -> Path:
    """A Hugging Face Llama directory with random weights and test.tiny's tokenizer."""
    from model_server.checkpoint import save_hf
    from model_server.models import base, llama, tiny

    spec = base.ModelSpec(family="llama", model_type="llama", architecture="LlamaForCausalLM",
                          vocab_size=tiny.VOCAB_SIZE, hidden_size=1024, num_layers=2, num_heads=8,
                          num_kv_heads=2, head_dim=128, intermediate_size=2816, max_position_embeddings=512,
                          eos_token_ids=(0,))
    save_hf(out, spec, base.random_params(spec), llama.to_hf_config(spec))
    tiny.build_hf_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One decode slot and room for one waiting request."""
    tmp = tmp_path_factory.mktemp("capacity")
    ckpt = write_random_llama(tmp / "slow")
    ms = ModelServerProcess(tmp, models=[f"{MODEL}=lm.hf:{ckpt}"], overrides={
        "num_slots": 1, "max_queue": 1, "max_seq_len": 512, "prefill_buckets": "[16]"}).start()
    try:
        wait_http(f"{ms.url}/ready{MODEL}", timeout=280, proc=ms.proc)
        yield ms.url
    finally:
        ms.stop()


class Scrape:
    """One read of /metrics through prometheus_client's parser."""

    def __init__(self, url: str) -> None:
        text = requests.get(f"{url}/metrics", timeout=10).text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 with none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def __call__(self, name: str, **labels: str) -> float:
        assert any(s.name == name and labels.items() <= s.labels.items() for s in self.samples), (name, labels)
        return self.get(name, **labels)


def gauges(url: str) -> tuple[float, float, float]:
    m = Scrape(url)
    return (m("vllm:num_requests_running", model_name=MODEL), m("vllm:num_requests_waiting", model_name=MODEL),
            m("sax:slots_in_use", model_name=MODEL))


@functools.cache
def letters_bias() -> dict[str, int]:
    """Greedy choice among single letters: every token is text at once (random weights mostly pick
    bytes of unfinished UTF-8 otherwise, which a stream holds back until they complete)."""
    from model_server.models import tiny

    ids = tiny.build_hf_tokenizer().convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
    return {str(i): 100 for i in ids}


def long_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "logit_bias": letters_bias(), **extra}


def open_stream(url: str) -> tuple[requests.Response, Iterator[bytes]]:
    """A long streamed completion, returned once its first chunk arrived (it holds the slot)."""
    r = requests.post(f"{url}/v1/completions", json=long_body(stream=True, stream_options={"include_usage": True}),
                      stream=True, timeout=120)
    assert r.status_code == 200, r.text
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    return r, itertools.chain([first], lines)


def finish_stream(r: requests.Response, lines: Iterator[bytes]) -> tuple[str, dict[str, Any]]:
    """The streamed text and the usage of its last chunk."""
    events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: ") and line != b"data: [DONE]"]
    r.close()
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events[-1]["usage"]


def test_full_queue_refuses_with_503_and_retry_after(server: str) -> None:
    refused_before = Scrape(server).get("sax:requests_refused_total", model_name=MODEL)
    stream, lines = open_stream(server)  # in the slot
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(requests.post, f"{server}/v1/completions", json=long_body(), timeout=120)
        wait_until(lambda: gauges(server) == (1, 1, 1), timeout=10, interval=0.02, what="one running, one waiting")

        refused = requests.post(f"{server}/v1/completions", json=long_body(max_tokens=4), timeout=30)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "overloaded_error" and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        assert refused.headers["Retry-After"].isdigit() and int(refused.headers["Retry-After"]) >= 1
        chat = requests.post(f"{server}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "queue_full"
        assert not stream.raw.closed and not queued.done()  # neither was disturbed

        text, usage = finish_stream(stream, lines)
        assert usage["completion_tokens"] == LONG
        done = queued.result()
    assert done.status_code == 200
    out = done.json()
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == LONG
    assert out["choices"][0]["text"] == text  # greedy: the queued request's answer is the same
    assert Scrape(server)("sax:requests_refused_total", model_name=MODEL) == refused_before + 2

    # Drained: accepted again, and answers as before.
    assert gauges(server) == (0, 0, 0)
    again = requests.post(f"{server}/v1/completions", json=long_body(), timeout=120)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == text


def _histogram(m: Scrape, name: str) -> tuple[float, float]:
    """(_count, _sum) of a histogram, after checking its buckets are cumulative up to _count."""
    buckets = sorted(((float(s.labels["le"]), s.value) for s in m.samples
                      if s.name == f"{name}_bucket" and s.labels.get("model_name") == MODEL))
    counts = [c for _, c in buckets]
    assert buckets[-1][0] == float("inf") and counts == sorted(counts)
    count = m(f"{name}_count", model_name=MODEL)
    assert counts[-1] == count
    return count, m(f"{name}_sum", model_name=MODEL)


HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
              "vllm:request_queue_time_seconds", "vllm:e2e_request_latency_seconds")


def test_metrics_count_what_the_responses_report(server: str) -> None:
    assert gauges(server) == (0, 0, 0)
    before = Scrape(server)
    hist0 = {h: _histogram(before, h) for h in HISTOGRAMS}
    assert before("sax:slots_total", model_name=MODEL) == 1
    t0 = time.monotonic()

    stream, lines = open_stream(server)
    assert gauges(server) == (1, 0, 1)  # while the long stream runs
    _, stream_usage = finish_stream(stream, lines)
    usages = [stream_usage]
    for prompt, max_tokens in (("hello", 5), ("The rain in Spain stays mainly", 9)):
        r = requests.post(f"{server}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        usages.append(r.json()["usage"])
    wall = time.monotonic() - t0
    assert gauges(server) == (0, 0, 0)

    after = Scrape(server)
    requests_made = len(usages)
    delta = {h: tuple(a - b for a, b in zip(_histogram(after, h), hist0[h])) for h in HISTOGRAMS}
    ttft, tpot = delta["vllm:time_to_first_token_seconds"], delta["vllm:time_per_output_token_seconds"]
    queue, e2e = delta["vllm:request_queue_time_seconds"], delta["vllm:e2e_request_latency_seconds"]
    assert ttft[0] == queue[0] == e2e[0] == requests_made
    # One interval per token after the first of each request.
    assert tpot[0] == sum(u["completion_tokens"] - 1 for u in usages)
    assert 0 < ttft[1] < e2e[1] <= wall and 0 <= queue[1] < ttft[1] and 0 < tpot[1] < e2e[1]
    assert e2e[1] >= ttft[1] + tpot[1] - 1e-6  # each request: its first token, then the intervals

    def grew(name: str, **labels: str) -> float:
        return after(name, **labels) - before.get(name, **labels)  # a fresh server has no series yet

    assert grew("vllm:prompt_tokens_total", model_name=MODEL) == sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert grew("vllm:generation_tokens_total", model_name=MODEL) == generated == LONG + 5 + 9
    assert grew("vllm:request_success_total", model_name=MODEL, finished_reason="length") == requests_made
    assert grew("sax:http_requests_total", route="/v1/completions", status="200") == requests_made
    assert after("sax:model_loaded", model_name=MODEL, status="LOADED") == 1
    # Every engine series is labelled by model, as vLLM's are.
    engine = [s for s in after.samples if s.name.startswith("vllm:")]
    assert engine and all(s.labels.get("model_name") == MODEL for s in engine)
