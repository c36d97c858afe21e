"""Hostile and broken requests against the real frontends (and so the real model servers):
each is refused with a 4xx in the route's error shape, in bounded time, streaming or not,
and the cell serves normally afterwards. (More in tests/frontend/test_errors_auth.py.)"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
import requests

from tests.frontend.conftest import ADMIN_TOKEN, API_KEYS, MODEL, Cell

KEY = {"Authorization": f"Bearer {API_KEYS[0]}"}
OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
TIME_BOUND_S = 20.0
LONG_TEXT = "hello " * 34_000             # 102,000 tokens for test.tiny (window 128)
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"


def msgs(content: Any = "hi", role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


def check_refusal(r: requests.Response, path: str, status: int | tuple[int, ...] = 400,
                  param: str | None = None) -> Any:
    """A 4xx (one of `status`) in the route's error shape; returns the error."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, f"{path}: {r.status_code} {r.text[:500]}"
    assert r.headers["Content-Type"].startswith("application/json"), r.headers["Content-Type"]
    err = r.json()["error"]
    if path.startswith(OPENAI_PATHS):
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if param is not None:
            assert err["param"] == param, err
    else:
        assert isinstance(err, str) and err, err
    return err


def post(url: str, path: str, body: Any = None, *, raw: bytes | None = None, stream: bool = False,
         headers: dict[str, str] | None = None) -> requests.Response:
    started = time.monotonic()
    if raw is None:
        raw = json.dumps({**body, "stream": True} if stream else body).encode()
    r = requests.post(url + path, data=raw, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=TIME_BOUND_S)
    assert time.monotonic() - started < TIME_BOUND_S
    return r


def assert_serves(cell: Cell) -> None:
    for _ in range(2):  # both replicas, by least-outstanding routing
        r = requests.post(f"{cell.url}{CMPL}", json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
                          timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    r = requests.post(f"{cell.url}/generate", json={"model": MODEL, "query": "hello",
                                                    "extra_inputs": {"per_example_max_decode_steps": 3}},
                      timeout=60)
    assert r.status_code == 200, r.text
    [[text, score]] = r.json()  # the text may be empty: sampling may pick the end of text first
    assert isinstance(text, str) and score < 0


@pytest.fixture
def served(cell: Cell) -> Iterator[Cell]:
    """The cell, checked to serve normally after the test's abuse."""
    yield cell
    assert_serves(cell)


RAW_BODIES = [
    pytest.param(b'{"model": "/sax/test/lm", "prompt": ', id="truncated-json"),
    pytest.param(b"[1, 2, 3]", id="json-array"),
    pytest.param(b'"a string"', id="json-string"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00\x01\x02", id="binary"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "\xff\xfe\xfd"}', id="not-utf8"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "a\\ud800b"}', id="lone-surrogate"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "\\udfff"}', id="lone-low-surrogate"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100k-deep"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "x", "temperature": NaN}', id="nan"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "x", "top_p": Infinity}', id="infinity"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "x", "top_p": 1e400}', id="float-overflow"),
    pytest.param(b'{"model": "/sax/test/lm", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}",
                 id="5000-digit-integer"),
]


@pytest.mark.parametrize("path", [CMPL, CHAT, "/v1/embeddings", "/tokenize", "/generate", "/score", "/publish"])
@pytest.mark.parametrize("raw", RAW_BODIES)
def test_unparseable_bodies(served: Cell, path: str, raw: bytes) -> None:
    check_refusal(post(served.url, path, raw=raw), path)


def test_lone_surrogates_anywhere_and_valid_pairs(served: Cell) -> None:
    for path, body in [(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
                       ("/generate", {"model": MODEL, "query": "\udbff"}),
                       ("/score", {"model": MODEL, "prefix": "a", "suffix": ["\udc00"]}),
                       ("/tokenize", {"model": MODEL, "prompt": "\ud800"}),
                       (CMPL, {"model": "lm2", "prompt": ["\ud800", "b"]}),     # alias rewrite, fan-out
                       (CMPL, {"model": MODEL, "prompt": "x", "stop": ["\ud800"]})]:
        raw = json.dumps(body).encode()  # json.dumps escapes the lone surrogate as \\udXXX
        check_refusal(post(served.url, path, raw=raw), path)
    r = post(served.url, CMPL, {"model": MODEL, "prompt": "smile \ud83d\ude00", "max_tokens": 2})
    assert r.status_code == 200, r.text  # a surrogate pair is a real character


WRONG_TYPES = [
    (CMPL, {"model": MODEL, "prompt": {"not": "a prompt"}}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": [[1], [True]]}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": ""}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": "8"}, "max_tokens"),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    (CMPL, {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    (CMPL, {"model": MODEL, "prompt": "x", "n": True}, "n"),
    (CMPL, {"model": MODEL, "prompt": "x", "stop": 5}, "stop"),
    (CMPL, {"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    (CMPL, {"model": MODEL, "prompt": "x", "logit_bias": [1, 2]}, "logit_bias"),
    (CMPL, {"model": MODEL, "prompt": "x", "logit_bias": {"token": 1}}, "logit_bias"),
    (CMPL, {"model": MODEL, "prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"),
    (CMPL, {"model": MODEL, "prompt": "x", "echo": "yes"}, "echo"),
    (CMPL, {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (CMPL, {"model": MODEL, "prompt": "x", "suffix": "tail"}, "suffix"),
    (CHAT, {"model": MODEL, "messages": "hi"}, "messages"),
    (CHAT, {"model": MODEL, "messages": ["hi"]}, "messages"),
    (CHAT, {"model": MODEL, "messages": msgs(5)}, "messages"),
    (CHAT, {"model": MODEL, "messages": msgs([{"type": "image_url", "image_url": {"url": "x"}}])}, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": {}}]}, "messages"),
    (CHAT, {"model": MODEL, "messages": msgs(), "logprobs": 1}, "logprobs"),
    (CHAT, {"model": MODEL, "messages": msgs(), "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"model": MODEL, "messages": msgs(), "response_format": {"type": "xml"}}, "response_format"),
    (CMPL, {"model": MODEL, "prompt": "x", "guided_choice": []}, "guided_choice"),
    (CHAT, {"model": MODEL, "messages": msgs(), "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"model": MODEL, "messages": msgs(), "tools": [{"type": "function"}]}, "tools"),
    ("/v1/embeddings", {"model": MODEL, "input": [1, 2]}, "input"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "binary"}, "encoding_format"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": ""}, "encoding_format"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "messages": msgs()}, "prompt"),
    ("/detokenize", {"model": MODEL, "tokens": "1 2 3"}, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [-1]}, "tokens"),
    ("/generate", {"model": MODEL, "query": 5}, None),
    ("/generate", {"model": MODEL, "query": "x", "extra_inputs": "hot"}, None),
    ("/generate", {"model": MODEL, "query": "x", "extra_inputs": {"temperature": "hot"}}, None),
    ("/generate", {"model": MODEL, "query": "x", "extra_inputs": {"beam_size": 4}}, None),
    ("/score", {"model": MODEL, "prefix": 5, "suffix": ["a"]}, None),
    ("/score", {"model": MODEL, "prefix": "a", "suffix": []}, None),
    ("/score", {"model": MODEL, "prefix": "a", "suffix": [5]}, None),
]


@pytest.mark.parametrize("path,body,param", WRONG_TYPES)
def test_wrong_types(served: Cell, path: str, body: dict[str, Any], param: str | None) -> None:
    check_refusal(post(served.url, path, body), path, param=param)
    if path in (CMPL, CHAT) and param not in ("stream_options",):  # the streaming variant: a JSON 400 too
        check_refusal(post(served.url, path, body, stream=True), path, param=param)


HUGE_OR_NEGATIVE = [
    {"max_tokens": 10 ** 30}, {"max_tokens": -1}, {"max_tokens": 200},   # 200 > the 128-token window
    {"temperature": 1e308}, {"temperature": -1}, {"top_p": 2}, {"top_p": -0.5}, {"top_k": 10 ** 12},
    {"top_k": -2}, {"seed": 10 ** 30}, {"seed": -(10 ** 30)}, {"n": 0}, {"n": -1}, {"n": 1000}, {"n": 100},
    {"logprobs": 10 ** 9}, {"logprobs": -1}, {"presence_penalty": -1e9}, {"frequency_penalty": 3},
    {"repetition_penalty": 0}, {"logit_bias": {"1": 1e9}}, {"logit_bias": {"99999999": 1}},
    {"logit_bias": {"9" * 5000: 1}}, {"best_of": 10 ** 9},
    {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ["x"] * 1000}, {"stop_token_ids": [10 ** 12]},
]


@pytest.mark.parametrize("extra", HUGE_OR_NEGATIVE, ids=lambda e: json.dumps(e)[:40])
def test_huge_and_negative_numbers(served: Cell, extra: dict[str, Any]) -> None:
    for path, base in ((CMPL, {"model": MODEL, "prompt": "hello"}),
                       (CHAT, {"model": MODEL, "messages": msgs()})):
        body = {**base, **extra}
        if path == CHAT and "logprobs" in extra:
            body = {**base, "logprobs": True, "top_logprobs": extra["logprobs"]}
        if path == CHAT and "best_of" in extra:
            continue  # not a chat field: that is an unknown-field 400, tested apart
        for stream in (False, True):
            r = post(served.url, path, body, stream=stream)
            err = check_refusal(r, path)
            if extra.get("max_tokens") == 200:
                assert "context window" in err["message"], err


def test_saxml_extra_inputs_out_of_range_neither_500_nor_kill_the_engine(served: Cell) -> None:
    """A huge top_k or seed once raised inside the engine loop (int32 overflow) and failed the
    replica for good: every later request answered 500."""
    for extra in ({"per_example_top_k": 1e300}, {"seed": 1e300}, {"per_example_top_k": -1e300},
                  {"seed": -5}, {"per_example_max_decode_steps": 1e300}):
        r = post(served.url, "/generate", {"model": MODEL, "query": "hello",
                                           "extra_inputs": {"per_example_max_decode_steps": 3, **extra}})
        assert r.status_code == 200, (extra, r.text)
    for extra in ({"num_samples": 1e9}, {"num_samples": 0}, {"per_example_max_decode_steps": 0},
                  {"per_example_top_p": 0}, {"temperature": 1e308}, {"per_example_top_p": 1.5}):
        check_refusal(post(served.url, "/generate", {"model": MODEL, "query": "hi", "extra_inputs": extra}),
                      "/generate")


def test_unknown_fields_are_refused_like_openai(served: Cell) -> None:
    """OpenAI answers 400 "Unrecognized request argument supplied" for a field it does not
    know; so do the replicas (a misspelt `max_token` silently ignored would be worse)."""
    for path, body in ((CMPL, {"model": MODEL, "prompt": "x", "max_token": 3}),
                       (CHAT, {"model": MODEL, "messages": msgs(), "frobnicate": {"a": [1]}}),
                       ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 8})):
        for stream in (False, True) if path != "/v1/embeddings" else (False,):
            err = check_refusal(post(served.url, path, body, stream=stream), path)
            assert "unrecognized request argument" in err["message"] and err["param"] in body, err
    r = post(served.url, "/generate", {"model": MODEL, "query": "x", "client_tag": "abc",
                                       "extra_inputs": {"per_example_max_decode_steps": 2}})
    assert r.status_code == 200, r.text  # Saxml's HTTP API ignores unknown top-level fields


@pytest.mark.parametrize("path,body,param", [
    (CMPL, {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 1}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": [1] * 100_000, "max_tokens": 1}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}, "prompt"),
    (CMPL, {"model": MODEL, "prompt": ["short", LONG_TEXT], "max_tokens": 1}, "prompt"),   # one of a fan-out
    (CHAT, {"model": MODEL, "messages": msgs(LONG_TEXT)}, "prompt"),
    ("/v1/embeddings", {"model": MODEL, "input": LONG_TEXT}, "prompt"),
    ("/generate", {"model": MODEL, "query": LONG_TEXT}, None),
    ("/score", {"model": MODEL, "prefix": LONG_TEXT, "suffix": [" x"]}, None),
])
def test_100k_token_prompts_are_a_clear_400(served: Cell, path: str, body: dict[str, Any],
                                             param: str | None) -> None:
    for stream in (False, True) if path in (CMPL, CHAT) and "echo" not in body else (False,):
        err = check_refusal(post(served.url, path, body, stream=stream), path, param=param)
        assert "context window of 128 tokens" in (err if isinstance(err, str) else err["message"]), err


def test_megabyte_prompts_are_refused_before_tokenizing(served: Cell) -> None:
    """A text that cannot fit the context window is refused by its length in characters, before
    the tokenizer spends seconds of CPU on it."""
    text = "ab " * 400_000
    for path, body in ((CMPL, {"model": MODEL, "prompt": text, "max_tokens": 1}),
                       (CHAT, {"model": MODEL, "messages": msgs(text)}),
                       ("/generate", {"model": MODEL, "query": text})):
        err = check_refusal(post(served.url, path, body), path)
        message = err if isinstance(err, str) else err["message"]
        assert "characters, more than" in message and "context window of 128 tokens" in message, message


def test_n_and_stop_limits(served: Cell) -> None:
    for stream in (False, True):
        err = check_refusal(post(served.url, CMPL, {"model": MODEL, "prompt": "x", "n": 1000}, stream=stream),
                            CMPL, param="n")
        assert "limit of 128" in err["message"]  # the frontend's own cap, before any routing
        err = check_refusal(post(served.url, CHAT, {"model": MODEL, "messages": msgs(), "n": 5}, stream=stream),
                            CHAT, param="n")
        assert "between 1 and 4" in err["message"]  # the replica's: its 4 decode slots
        check_refusal(post(served.url, CMPL, {"model": MODEL, "prompt": "x", "stop": list("abcde")},
                           stream=stream), CMPL, param="stop")
    err = check_refusal(post(served.url, "/generate", {"model": MODEL, "query": "x",
                                                       "extra_inputs": {"num_samples": 1000}}), "/generate")
    assert "limit of 128" in err


def test_empty_and_odd_messages(served: Cell) -> None:
    for messages in ([], None, {}, [{}], [{"role": "user"}, "x"], msgs(role="wizard"), msgs(role=None),
                     [{"content": "no role"}]):
        for stream in (False, True):
            check_refusal(post(served.url, CHAT, {"model": MODEL, "messages": messages}, stream=stream), CHAT,
                          param="messages")
    # Roles the template knows, content as parts or null: fine.
    r = post(served.url, CHAT, {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "?"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", ["/sax/test/../lm", "/sax/test/x/../lm", "/sax/test/../../../leader",
                                  "/sax/test/lm\n", "../../etc/passwd", "/sax/test/lm/extra", "%2e%2e",
                                  "/sax/test/LM", " " * 3, "\u202e/sax/test/lm"])
def test_model_names_that_break_the_pattern(served: Cell, name: str) -> None:
    """Model names go into the admin's URLs: dot segments must not reach another route."""
    for path, body in ((CMPL, {"model": name, "prompt": "x"}), (CHAT, {"model": name, "messages": msgs()}),
                       ("/generate", {"model": name, "query": "x"}), ("/listcell", {"model": name}),
                       ("/tokenize", {"model": name, "prompt": "x"})):
        check_refusal(post(served.url, path, body), path, status=(400, 404))
    r = requests.get(f"{served.url}/v1/models/{requests.utils.quote(name, safe='')}", timeout=10)
    check_refusal(r, "/v1/models/x", status=404)
    r = requests.get(f"{served.url}/listall", params={"sax_cell": name}, timeout=10)
    check_refusal(r, "/listall", status=400)


def test_body_limit(cell: Cell) -> None:
    """The secure frontend takes 4 KiB: a 10 MB body is a 413 in the route's shape at once,
    whether it says its length or comes chunked (werkzeug would cut it at the limit)."""
    url = cell.secure.url
    big = json.dumps({"model": MODEL, "prompt": "x" * 10_000_000}).encode()
    for path in (CMPL, CHAT, "/generate", "/publish"):
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if path == "/publish" else KEY
        started = time.monotonic()
        r = requests.post(url + path, data=big, headers=headers, timeout=30)
        assert time.monotonic() - started < 10
        check_refusal(r, path, status=413)
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
        check_refusal(requests.post(url + path, data=chunks, headers=headers, timeout=30), path, status=413)
    # Under the limit, chunked: read whole.
    small = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    r = requests.post(url + CMPL, data=iter([small[:10], small[10:]]), headers=KEY, timeout=30)
    assert r.status_code == 200, r.text


def test_admin_token_is_not_a_route_to_5xx(cell: Cell) -> None:
    """Bad mutations through the secure frontend, with the admin token: the admin's refusals
    come back as 4xx in the Saxml shape."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for body in ({"model": "/sax/test/x\n", "model_path": "test.fake", "checkpoint": "None", "replicas": 0},
                 {"model": "/sax/test/x", "model_path": "test.fake", "checkpoint": "None", "replicas": "²"},
                 {"model": "/sax/test/x", "model_path": "test.fake", "checkpoint": "None", "replicas": "9" * 100},
                 {"model": "/sax/test/x", "model_path": "test.fake", "checkpoint": "../../etc", "replicas": 0},
                 {"model": "/sax/test/x", "model_path": "../fake", "checkpoint": "None", "replicas": 0},
                 {"model": "/sax/test/x", "model_path": "test.fake", "checkpoint": "None", "replicas": 0,
                  "overrides": {"num_slots": "many"}}):
        check_refusal(post(cell.secure.url, "/publish", body, headers=admin), "/publish")
    for model in ("/sax/test/../../../leader", "/sax/test/x/../fake"):
        check_refusal(post(cell.secure.url, "/unpublish", {"model": model}, headers=admin), "/unpublish")
        check_refusal(post(cell.secure.url, "/update", {"model": model, "replicas": 1}, headers=admin), "/update")
    assert requests.get(f"{cell.admin.url}/models/sax/test/fake", timeout=10).status_code == 200  # untouched


def test_embedding_encodings(served: Cell) -> None:
    """The openai SDK asks for base64 unless told otherwise: served, not refused as an unknown
    format (only formats other than float and base64 are)."""
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    b64 = client.embeddings.create(model=MODEL, input=["hello", "world"])  # SDK default: base64, decoded
    floats = client.embeddings.create(model=MODEL, input=["hello", "world"], encoding_format="float")
    for a, b in zip(b64.data, floats.data):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6, abs=1e-6)
