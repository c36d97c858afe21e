"""The model server as a real process (static test.tiny, no admin): OpenAI and Sax APIs."""
from __future__ import annotations

import json
import re
import sys
from typing import Iterator

import openai
import pytest
import requests

from tests.cluster import Proc, free_port, wait_http

pytestmark = pytest.mark.slow
MODEL = "/sax/test/lm"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator[str]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("ms")
    proc = Proc([sys.executable, "-m", "model_server", "--port", str(port), "--host", "127.0.0.1",
                 "--model", f"{MODEL}=test.tiny:None", "--override", "num_slots=4",
                 "--override", "max_seq_len=128", "--override", "alias=tiny", "--override", "max_queue=8"],
                {}, tmp / "model-server.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/ready{MODEL}", timeout=240, proc=proc.proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_completions_greedy_is_deterministic_and_counts_tokens(oai: openai.OpenAI) -> None:
    a = oai.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    b = oai.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.object == "text_completion" and a.model == MODEL and b.model == "tiny"
    assert a.usage.completion_tokens <= 8 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length")


def test_prompt_lists_token_prompts_n_and_logprobs(oai: openai.OpenAI, server: str) -> None:
    r = oai.completions.create(model=MODEL, prompt=["one", "two two"], max_tokens=4, n=2, temperature=0.8,
                               seed=7, logprobs=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(len(t) <= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    ids = requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "one"}).json()["tokens"]
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = oai.completions.create(model=MODEL, prompt="one", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_echo_scoring_matches_sax_score(oai: openai.OpenAI, server: str) -> None:
    text = "the cat sat on the mat"
    r = oai.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": text}).json()["count"]
    ctx = requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "the"}).json()["count"]
    scores = requests.post(f"{server}/lm/score", json={"model": MODEL, "prefix": "the",
                                                        "suffixes": [" cat sat on the mat"]}).json()["scores"]
    assert scores[0] == pytest.approx(sum(lp.token_logprobs[ctx:]), abs=1e-3)


def test_echo_with_max_tokens_0_and_no_logprobs(oai: openai.OpenAI, server: str) -> None:
    """OpenAI's answer: the prompt echoed, finish_reason "length", no completion tokens."""
    text = "the cat sat on the mat"
    count = requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": text}).json()["count"]
    r = oai.completions.create(model=MODEL, prompt=[text, "hello"], max_tokens=0, echo=True, n=2)
    assert [c.text for c in r.choices] == [text, text, "hello", "hello"]
    assert all(c.finish_reason == "length" and c.logprobs is None for c in r.choices)
    hello = requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "hello"}).json()["count"]
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == r.usage.total_tokens == count + hello
    chunks = list(oai.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == count


def test_streaming_completion_and_chat(oai: openai.OpenAI) -> None:
    chunks = list(oai.completions.create(model=MODEL, prompt="stream me", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = oai.completions.create(model=MODEL, prompt="stream me", max_tokens=6, temperature=0)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    chat = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True, logprobs=True,
                                            top_logprobs=2))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
    content = "".join(c.choices[0].delta.content or "" for c in chat)
    whole = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    assert whole.choices[0].message.content == content
    assert whole.choices[0].message.role == "assistant"
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and isinstance(e.bytes, list) for e in entries)


def test_sax_methods_and_embeddings(server: str) -> None:
    gen = requests.post(f"{server}/lm/generate", json={
        "model": MODEL, "text": "hello", "extra_inputs": {"temperature": 0, "per_example_max_decode_steps": 5,
                                                          "num_samples": 2}}).json()["results"]
    assert len(gen) == 2 and gen[0][0] == gen[1][0] and gen[0][1] <= 0
    events = []
    with requests.post(f"{server}/lm/generate_stream", json={"model": MODEL, "text": "hello", "extra_inputs": {
            "temperature": 0, "per_example_max_decode_steps": 5}}, stream=True) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    assert "".join(e["text"] for e in events) == gen[0][0]
    scores = requests.post(f"{server}/lm/score", json={"model": MODEL, "prefix": "hello",
                                                        "suffixes": [" world", " there"]}).json()["scores"]
    assert len(scores) == 2 and all(s < 0 for s in scores)
    emb = requests.post(f"{server}/lm/embed", json={"model": MODEL, "text": "hello"}).json()["embedding"]
    v1 = requests.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": ["hello"]}).json()
    assert v1["data"][0]["embedding"] == emb and len(emb) > 8


def test_errors_in_the_api_shapes(server: str) -> None:
    def post(path: str, body: object, raw: bytes | None = None) -> requests.Response:
        return requests.post(f"{server}{path}", json=None if raw else body, data=raw,
                             headers={"Content-Type": "application/json"})

    r = post("/v1/completions", {"model": "/sax/test/nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post("/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post("/v1/completions", {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 4})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"].lower()
    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000})
    assert r.status_code == 400
    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    r = post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post("/v1/chat/completions", {"model": MODEL, "messages": []})
    assert r.status_code == 400
    r = post("/lm/generate", {"model": MODEL, "text": "x", "extra_inputs": {"nope": 1}})
    assert r.status_code == 400 and "nope" in r.json()["error"]
    r = post("/v1/completions", {"model": MODEL, "prompt": [10**9]})
    assert r.status_code == 400
    assert requests.get(f"{server}/ready/sax/test/nope").status_code == 404


def test_health_models_and_metrics(server: str) -> None:
    assert requests.get(f"{server}/healthz").json()["models"] == {f"{MODEL}@1": "LOADED"}
    ids = [m["id"] for m in requests.get(f"{server}/v1/models").json()["data"]]
    assert ids == [MODEL, "tiny"]
    requests.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "m", "max_tokens": 2})
    text = requests.get(f"{server}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "sax:http_requests_total"):
        assert name in text, name
    # one prefill and at least one decode step for the 2-token completion above
    counts = {name: float(v) for name, v in re.findall(
        r"^(sax:engine_(?:decode_steps|prefill_calls)_total)\{[^}]*\} (\S+)$", text, re.M)}
    assert counts["sax:engine_prefill_calls_total"] >= 1, counts
    assert counts["sax:engine_decode_steps_total"] >= 1, counts


def test_caller_watch_works_from_other_threads() -> None:
    """A prompt list waits for each prompt on its own thread, outside the request context:
    the hang-up check must work there (it once raised "Working outside of request context")."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import flask

    from model_server.app import caller_watch

    ours, theirs = socket.socketpair()
    try:
        with flask.Flask("t").test_request_context(environ_base={"gunicorn.socket": ours}):
            gone = caller_watch()
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(gone).result() is False
            theirs.close()
            assert pool.submit(gone).result() is True
    finally:
        ours.close()
