"""Prompt lists fanned out across replicas and reassembled (indexes i*n+j, summed usage, merged streams)."""
from __future__ import annotations

import pytest
import requests

from tests.frontend.conftest import MODEL, Cell, metric, sse_events

PROMPTS = ["The quick brown fox", "Hello world!", "Once upon a time there"]


def same_logprobs(a: dict | None, b: dict | None) -> bool:
    """Equal up to float noise: a batch's composition on a replica may move the last bits."""
    if a is None or b is None:
        return a is b
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert [lp is None for lp in a["token_logprobs"]] == [lp is None for lp in b["token_logprobs"]]
    assert [x for x in a["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in b["token_logprobs"] if x is not None], abs=1e-4)
    for x, y in zip(a["top_logprobs"], b["top_logprobs"]):
        assert (x is None and y is None) or (x.keys() == y.keys() and list(x.values()) == pytest.approx(
            list(y.values()), abs=1e-4))
    return True


def _post(cell: Cell, body: dict, **kw) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(f"{cell.url}/v1/completions", json=body, timeout=120, **kw)


def test_string_prompts_with_n(cell: Cell) -> None:
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 4, "temperature": 0, "n": 2, "logprobs": 1}
    got = _post(cell, body).json()
    assert [c["index"] for c in got["choices"]] == list(range(6))
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, p in enumerate(PROMPTS):
        direct = cell.direct("/v1/completions", {**body, "prompt": p}).json()
        for j in range(2):
            mine = got["choices"][i * 2 + j]
            theirs = direct["choices"][j]
            assert mine["text"] == theirs["text"] and same_logprobs(mine["logprobs"], theirs["logprobs"])
        for k in usage:
            usage[k] += direct["usage"][k]
    assert got["usage"] == usage and got["object"] == "text_completion"


def test_token_id_prompts_like_lm_eval(cell: Cell) -> None:
    """lm-eval's loglikelihood batch: token-id lists, echo, logprobs 1, max_tokens 1."""
    prompts = [[261, 355, 275], [100, 101, 102, 103, 104], [7, 8]]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    got = _post(cell, body).json()
    for i, p in enumerate(prompts):
        direct = cell.direct("/v1/completions", {**body, "prompt": [p]}).json()["choices"][0]
        assert got["choices"][i]["index"] == i
        assert same_logprobs(got["choices"][i]["logprobs"], direct["logprobs"])
        assert got["choices"][i]["text"] == direct["text"]


def test_a_refused_prompt_refuses_the_request(cell: Cell) -> None:
    body = {"model": MODEL, "prompt": [[1, 2], [1, 99999]], "max_tokens": 1}
    r = _post(cell, body)
    direct = cell.direct("/v1/completions", {**body, "prompt": [1, 99999]})
    assert r.status_code == 400 and r.content == direct.content
    assert r.json()["error"]["param"] == "prompt"


def test_merged_stream(cell: Cell) -> None:
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(_post(cell, body, stream=True))
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
    texts = ["", "", ""]
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    whole = _post(cell, {**body, "stream": False, "stream_options": None}).json()
    assert texts == [c["text"] for c in whole["choices"]]
    assert usage_chunks[0]["usage"] == whole["usage"]


def test_fanout_spreads_over_both_replicas(cell: Cell) -> None:
    replicas = [u.removeprefix("http://") for u in cell.model_server_urls]

    def served() -> dict[str, float]:
        return {a: metric(cell.url, "sax_frontend_upstream_requests_total", model=MODEL, outcome="200", replica=a)
                for a in replicas}

    before = served()
    r = _post(cell, {"model": MODEL, "prompt": [f"prompt number {i}" for i in range(8)], "max_tokens": 8})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    after = served()
    assert all(after[a] > before[a] for a in replicas), (before, after)
