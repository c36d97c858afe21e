"""Engine v2 (paged KV pool, prefix caching, chunked prefill, preemption) through a whole cell.

One admin, one model server and a gunicorn frontend (real processes, real HTTP, the official
`openai` package) serve a random-weight Llama-shaped checkpoint with a 4,096-token window,
published twice: `LLAMA` (10 decode rows, the default pool) and `BURST` (64 decode rows over a
pool of 320 blocks: a twelfth of what 64 rows x 4,096 positions would take).

* requests sharing a 1,500-token prefix prefill at least 4x faster than unique prompts;
* greedy text and logprobs are the same with and without a cached prefix and with and
  without chunking (a long prompt chunked beside decoding streams);
* while an 1,800-token prompt prefills beside 8 decoding streams, it goes in budget-sized
  chunks and every stream keeps decoding between them;
* 64 concurrent short requests are admitted and decoded without refusal, and a burst that
  needs more than the pool completes through preemptions, every request answered.
"""
from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.cluster import metric, small_cell, wait_loaded, wait_until

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

LLAMA, BURST = "/sax/test/llama4k", "/sax/test/burst"
VOCAB, WINDOW, HIDDEN, LAYERS = 384, 4096, 256, 4
#: K and V, per layer, 2 KV heads of 64 floats: bytes per token and per block of 16
TOKEN_BYTES = 2 * LAYERS * 2 * (HIDDEN // 4) * 4
POOL_BLOCKS = 320  # the least a 4,096-token sequence and 64 rows' last blocks need
OVERRIDES = {"num_slots": 10, "max_seq_len": WINDOW, "max_queue": 64}  # 8 streams and the long prompt decode at once
BURST_OVERRIDES = {"num_slots": 64, "max_seq_len": WINDOW, "max_queue": 64,
                   "kv_cache_bytes": POOL_BLOCKS * 16 * TOKEN_BYTES}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_server.models import tiny

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=WINDOW,
                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=2, eos_token_id=1,
                      pad_token_id=0)
    path = tmp_path_factory.mktemp("llama4k") / "llama4k"
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    tiny.build_hf_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def v2_cell(checkpoint, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(frontend url, model server url)"""
    with small_cell(tmp_path_factory.mktemp("v2_cell")) as (admin, ms, frontend):
        for model_id, ov in ((LLAMA, OVERRIDES), (BURST, BURST_OVERRIDES)):
            requests.post(f"{admin.url}/models", timeout=10, json={
                "model_id": model_id, "model_path": "lm.llama", "checkpoint": str(checkpoint), "replicas": 1,
                "overrides": ov}).raise_for_status()
        for model_id in (LLAMA, BURST):
            wait_loaded(admin.url, model_id, timeout=900)
        wait_until(lambda: _routable(frontend.url), timeout=60, what="frontend routes both models")
        yield frontend.url, ms.url


def _routable(url: str) -> bool:
    ids = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    return {LLAMA, BURST} <= ids


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _complete(url: str, model: str, prompt: list[int], **kw) -> dict:
    r = requests.post(f"{url}/v1/completions", timeout=300,
                      json={"model": model, "prompt": prompt, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _timed(url: str, prompt: list[int], **kw) -> float:
    t0 = time.perf_counter()
    _complete(url, LLAMA, prompt, max_tokens=1, **kw)
    return time.perf_counter() - t0


class Stream(threading.Thread):
    """A streaming completion read in the background: the arrival time of every chunk."""

    def __init__(self, url: str, model: str, prompt: list[int], max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.model, self.prompt, self.max_tokens = url, model, prompt, max_tokens
        self.times: list[float] = []
        self.text = ""
        self.error: BaseException | None = None
        self.start_time = 0.0
        self.halt = False  # set: the stream is closed at its next chunk (the server cancels it)

    def run(self) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)
        try:
            self.start_time = time.perf_counter()
            for chunk in client.completions.create(model=self.model, prompt=self.prompt, max_tokens=self.max_tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].text:
                    self.times.append(time.perf_counter())
                    self.text += chunk.choices[0].text
                if self.halt:
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_a_shared_prefix_prefills_at_least_4x_faster(v2_cell) -> None:
    url, ms_url = v2_cell
    rng = random.Random(1)
    prefix = _ids(rng, 1500)
    _timed(url, _ids(rng, 1532))  # the first call of a shape warms caches (no compilation)
    unique = [_timed(url, _ids(rng, 1532)) for _ in range(5)]
    hits0 = metric(ms_url, "vllm:prefix_cache_hits_total", model_name=LLAMA)
    _timed(url, prefix + _ids(rng, 32))  # computes the prefix once
    shared = [_timed(url, prefix + _ids(rng, 32)) for _ in range(5)]
    hits = metric(ms_url, "vllm:prefix_cache_hits_total", model_name=LLAMA) - hits0
    print(f"\nshared-prefix TTFT: unique median {statistics.median(unique):.3f}s, shared {statistics.median(shared):.3f}s "
          f"({statistics.median(unique) / statistics.median(shared):.1f}x)")
    assert hits >= 5 * 1488, hits  # every shared request found the prefix's 93 full blocks
    assert statistics.median(unique) >= 4 * statistics.median(shared), (unique, shared)
    # a request that opts out computes everything again
    opted = [_timed(url, prefix + _ids(rng, 32), prefix_caching=False) for _ in range(3)]
    assert statistics.median(opted) >= 2 * statistics.median(shared), (opted, shared)


def test_tokens_and_logprobs_do_not_depend_on_cache_or_chunking(v2_cell) -> None:
    url, _ = v2_cell
    rng = random.Random(2)
    prompt = _ids(rng, 1400)
    ask = {"max_tokens": 12, "logprobs": 2, "echo": True}
    cold = _complete(url, LLAMA, prompt, prefix_caching=False, **ask)["choices"][0]
    _complete(url, LLAMA, prompt[:1300] + _ids(rng, 40), max_tokens=1)  # caches the first 81 blocks
    cached = _complete(url, LLAMA, prompt, **ask)["choices"][0]
    # chunked: the prompt prefills in budget-sized chunks while 4 streams decode
    streams = [Stream(url, LLAMA, _ids(rng, 20), 120) for _ in range(4)]
    for s in streams:
        s.start()
    wait_until(lambda: all(len(s.times) >= 3 for s in streams), timeout=60, what="streams decoding")
    chunked = _complete(url, LLAMA, prompt, prefix_caching=False, **ask)["choices"][0]
    for s in streams:
        s.join(120)
        assert s.error is None, s.error
    for other in (cached, chunked):
        assert other["text"] == cold["text"]
        a, b = cold["logprobs"], other["logprobs"]
        assert a["tokens"] == b["tokens"]
        assert a["token_logprobs"][0] is None and b["token_logprobs"][0] is None
        diff = max(abs(x - y) for x, y in zip(a["token_logprobs"][1:], b["token_logprobs"][1:]))
        assert diff < 1e-4, diff


def _beside_long_prefill(url: str, rng: random.Random) -> tuple[int, float, float]:
    """(the fewest tokens any of 8 decoding streams received while an 1,800-token prompt
    prefilled, the longest pause of those streams in that time, that prompt's time to first token)"""
    streams = [Stream(url, LLAMA, _ids(rng, 16), 2000) for _ in range(8)]
    for s in streams:
        s.start()
    wait_until(lambda: all(len(s.times) >= 5 for s in streams), timeout=120, what="8 streams decoding")
    t0 = time.perf_counter()
    long = Stream(url, LLAMA, _ids(rng, 1800), 2)
    long.run()
    assert long.error is None and long.times, long.error
    t_first = long.times[0]
    # each stream's next chunk after the long prompt's first token closes the measured span
    wait_until(lambda: all(s.times[-1] > t_first for s in streams), timeout=60, what="streams decoding on")
    counts, pauses = [], []
    for s in streams:
        counts.append(sum(t0 < t < t_first for t in s.times))
        # the longest gap between chunks that overlaps the long prompt's prefill
        pauses.append(max(b - a for a, b in zip(s.times, s.times[1:]) if b > t0 and a < t_first))
    for s in streams:
        s.halt = True
    for s in streams:
        s.join(300)
        assert s.error is None, s.error
    return min(counts), max(pauses), t_first - t0


def test_a_long_prefill_does_not_stall_decoding_streams(v2_cell) -> None:
    """The 1,800-token prompt prefills in chunks of the 256-token step budget (8 steps beside
    8 decoding rows), and every stream decodes in each of those steps: each receives at least
    half as many tokens as there were chunks while the prompt prefilled. Prefilled whole, the
    streams would receive one or two. The pause is printed, not asserted: it is a timing, and
    timings belong to bench/ on a shared 2-core machine."""
    url, _ = v2_cell
    fewest, pause, ttft = _beside_long_prefill(url, random.Random(3))
    print(f"\n1800-token prompt beside 8 streams: fewest tokens a stream got while it prefilled {fewest}, "
          f"longest pause {pause:.3f}s of TTFT {ttft:.3f}s")
    chunks = -(-1800 // (256 - 8))
    assert fewest >= chunks // 2, (fewest, chunks)


def test_64_requests_fit_a_small_pool_and_an_overflowing_burst_preempts(v2_cell) -> None:
    url, ms_url = v2_cell
    rng = random.Random(4)
    prompts = [_ids(rng, 24) for _ in range(64)]
    refused0 = metric(ms_url, "sax:requests_refused_total", model_name=BURST)

    def burst(max_tokens: int) -> list[dict]:
        with ThreadPoolExecutor(64) as ex:
            return list(ex.map(lambda p: _complete(url, BURST, p, max_tokens=max_tokens, ignore_eos=True), prompts))

    pre0 = metric(ms_url, "vllm:num_preemptions_total", model_name=BURST)
    short = burst(8)  # 64 x 2 blocks
    assert all(o["choices"][0]["finish_reason"] == "length" and o["usage"]["completion_tokens"] == 8 for o in short)
    assert metric(ms_url, "vllm:num_preemptions_total", model_name=BURST) == pre0
    long = burst(136)  # 64 x 10 blocks: twice the pool
    assert all(o["choices"][0]["finish_reason"] == "length" and o["usage"]["completion_tokens"] == 136 for o in long)
    preempted = metric(ms_url, "vllm:num_preemptions_total", model_name=BURST) - pre0
    print(f"\n64-request burst over {POOL_BLOCKS} blocks: {preempted:.0f} preemptions, none refused")
    assert preempted > 0
    assert metric(ms_url, "sax:requests_refused_total", model_name=BURST) == refused0
    # greedy: a preempted and recomputed sequence says what it says alone
    alone = _complete(url, BURST, prompts[5], max_tokens=136, ignore_eos=True)
    assert long[5]["choices"][0]["text"] == alone["choices"][0]["text"]
