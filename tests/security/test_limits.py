"""Each configurable limit, on real processes started with small values (tests/security/
conftest.py): prompt tokens, generated tokens and n on the model server; n, open streams per
API key and body size on the frontend. Some are set by flags, some by SAX_* variables."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import requests

from http_frontend.settings import FrontendSettings
from model_server.settings import ModelServerSettings, RequestLimits
from tests.cluster import wait_until
from tests.security.conftest import (API_KEYS, FAKE, KEY, MAX_BODY, MAX_N_FRONTEND, MAX_N_SERVER, MAX_PROMPT_TOKENS,
                                     MAX_STREAMS, MAX_TOKENS, MODEL, Locked, bearer)

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def post(locked: Locked, path: str, body: dict[str, Any], headers: dict[str, str] = KEY,
         **kwargs: Any) -> requests.Response:
    return requests.post(locked.url + path, json=body, headers=headers, timeout=60, **kwargs)


def refused(r: requests.Response, status: int = 400, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if isinstance(err, dict):
        assert set(err) == {"message", "type", "param", "code"}, err
        if param is not None:
            assert err["param"] == param, err
        return err["message"]
    return err


def test_settings_read_the_environment() -> None:
    env = {"SAX_MAX_PROMPT_TOKENS": "100", "SAX_MAX_TOKENS": "50", "SAX_MAX_N": "4"}
    assert ModelServerSettings.from_env(env).limits == RequestLimits(100, 50, 4)
    assert ModelServerSettings.from_env({}).limits == RequestLimits(None, None, 128)
    assert ModelServerSettings.from_env(env, max_n=2).max_n == 2  # flags win
    with pytest.raises(ValueError):
        ModelServerSettings.from_env({"SAX_MAX_TOKENS": "0"})
    fe = FrontendSettings.from_env({"SAX_FRONTEND_MAX_N": "5", "SAX_MAX_STREAMS_PER_KEY": "3",
                                    "SAX_MAX_BODY_BYTES": "1000"})
    assert (fe.max_n, fe.max_streams_per_key, fe.max_body_bytes) == (5, 3, 1000)
    assert (FrontendSettings.from_env({}).max_n, FrontendSettings.from_env({}).max_streams_per_key) == (128, 0)


def test_max_prompt_tokens(locked: Locked) -> None:
    """SAX_MAX_PROMPT_TOKENS=24 on the model server, far below the model's 128-token window."""
    ok, over = [5] * MAX_PROMPT_TOKENS, [5] * (MAX_PROMPT_TOKENS + 1)
    assert post(locked, CMPL, {"model": MODEL, "prompt": ok, "max_tokens": 1}).status_code == 200
    for stream in (False, True):
        message = refused(post(locked, CMPL, {"model": MODEL, "prompt": over, "max_tokens": 1, "stream": stream}),
                          param="prompt")
        assert f"limit of {MAX_PROMPT_TOKENS} prompt tokens" in message
    text = "hello " * 20  # 60 tokens
    refused(post(locked, CMPL, {"model": MODEL, "prompt": ["hi", text], "max_tokens": 1}), param="prompt")
    refused(post(locked, CMPL, {"model": MODEL, "prompt": text, "max_tokens": 0, "echo": True}), param="prompt")
    refused(post(locked, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": text}]}), param="messages")
    refused(post(locked, "/v1/embeddings", {"model": MODEL, "input": ["hi", text]}), param="input")
    assert f"limit of {MAX_PROMPT_TOKENS}" in refused(post(locked, "/generate", {"model": MODEL, "query": text}))
    refused(post(locked, "/score", {"model": MODEL, "prefix": text, "suffix": [" x"]}))
    # Tokenizing is not generating: long texts still tokenize.
    r = post(locked, "/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200 and r.json()["count"] > MAX_PROMPT_TOKENS


def test_max_tokens(locked: Locked) -> None:
    """--max-tokens 8: more is refused, defaults are bounded by it."""
    for key in ("max_tokens",):
        refused(post(locked, CMPL, {"model": MODEL, "prompt": "hi", key: MAX_TOKENS + 1}), param=key)
    for key in ("max_tokens", "max_completion_tokens"):
        message = refused(post(locked, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                              key: MAX_TOKENS + 1, "stream": True}), param=key)
        assert f"limit of {MAX_TOKENS} generated tokens" in message
    r = post(locked, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    # Without max_tokens: completions default to 16, chat to the rest of the window; both capped.
    r = post(locked, CMPL, {"model": MODEL, "prompt": "hi", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS, r.text
    r = post(locked, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS, r.text
    refused(post(locked, "/generate", {"model": MODEL, "query": "hi",
                                       "extra_inputs": {"per_example_max_decode_steps": MAX_TOKENS + 1}}))
    r = post(locked, "/generate", {"model": MODEL, "query": "hi"})  # Saxml's default of 128 steps, capped
    assert r.status_code == 200 and len(r.json()) == 1, r.text


def test_max_n(locked: Locked) -> None:
    """--max-n 3 on the frontend (refused before routing), --max-n 2 on the model server."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for stream in (False, True):
        message = refused(post(locked, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream,
                                              "n": MAX_N_FRONTEND + 1}), param="n")
        assert f"this frontend's limit of {MAX_N_FRONTEND}" in message
        message = refused(post(locked, CHAT, {**chat, "n": MAX_N_SERVER + 1, "stream": stream}), param="n")
        assert f"between 1 and {MAX_N_SERVER}" in message  # passed the frontend, refused by the replica
    r = post(locked, CHAT, {**chat, "n": MAX_N_SERVER})
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N_SERVER
    assert f"limit of {MAX_N_FRONTEND}" in refused(post(locked, "/generate", {
        "model": MODEL, "query": "hi", "extra_inputs": {"num_samples": MAX_N_FRONTEND + 1}}))
    assert f"[1, {MAX_N_SERVER}]" in refused(post(locked, "/generate", {
        "model": MODEL, "query": "hi", "extra_inputs": {"num_samples": MAX_N_SERVER + 1}}))
    r = post(locked, "/generate", {"model": MODEL, "query": "hi",
                                   "extra_inputs": {"num_samples": MAX_N_SERVER, "per_example_max_decode_steps": 2}})
    assert r.status_code == 200 and len(r.json()) == MAX_N_SERVER


class Stream:
    """A stream from the fake replica, held open until closed (it runs for 30 s otherwise)."""

    def __init__(self, locked: Locked, key: str, prompt: str = "forever") -> None:
        self.resp = requests.post(f"{locked.url}{CMPL}", headers=bearer(key), stream=True, timeout=30,
                                  json={"model": FAKE, "prompt": prompt, "stream": True})
        # Kept: urllib3 closes the connection when a half-read iterator is dropped.
        self.lines = self.resp.iter_lines(chunk_size=1)

    @property
    def status(self) -> int:
        return self.resp.status_code

    def first_event(self) -> bytes:
        return next(self.lines)

    def close(self) -> None:
        self.resp.close()


def test_streams_per_key(locked: Locked) -> None:
    """SAX_MAX_STREAMS_PER_KEY=2, counted across the frontend's two workers: a key's third stream
    is a 429 (other keys and plain calls are not held back), and a place comes back when a
    stream ends, whether it ran out or its caller hung up."""
    held = [Stream(locked, API_KEYS[0]) for _ in range(MAX_STREAMS)]
    try:
        for s in held:
            assert s.status == 200 and s.first_event().startswith(b"data: ")
        for _ in range(4):  # new connections each: whichever worker takes it, the count is shared
            s = Stream(locked, API_KEYS[0])
            err = refused(s.resp, 429)
            assert "streams open" in err and s.resp.headers["Retry-After"] == "1"
            assert s.resp.json()["error"]["code"] == "too_many_streams"
            assert s.resp.json()["error"]["type"] == "rate_limit_error"
        other = Stream(locked, API_KEYS[1])
        assert other.status == 200
        other.close()
        r = post(locked, CMPL, {"model": FAKE, "prompt": "plain"})
        assert r.status_code == 200  # not a stream: not counted
        r = post(locked, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True},
                 headers=bearer(API_KEYS[0]))
        assert r.status_code == 429
        held.pop().close()  # the caller hangs up: its place comes back
        replacement = wait_until(lambda: (lambda s: s if s.status == 200 else s.close())(
            Stream(locked, API_KEYS[0])), timeout=15, interval=0.2, what="a place after a hang-up")
        held.append(replacement)
    finally:
        for s in held:
            s.close()
    # Streams that run out, and streams the replica refuses, give their place back too.
    wait_until(lambda: post(locked, CMPL, {"model": FAKE, "prompt": "count:2", "stream": True},
                            headers=bearer(API_KEYS[0])).status_code == 200, timeout=15, what="places back")
    for _ in range(2 * MAX_STREAMS + 1):
        r = post(locked, CMPL, {"model": FAKE, "prompt": "count:2", "stream": True}, headers=bearer(API_KEYS[0]))
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        r = post(locked, CMPL, {"model": MODEL, "prompt": "hi", "stream": True, "top_k": -5},
                 headers=bearer(API_KEYS[0]))
        assert r.status_code == 400, r.text


def test_streams_per_key_released_under_concurrency(locked: Locked) -> None:
    """Many short streams of one key at once: some are refused, none is lost, and once they
    are all done the key has its full allowance again."""
    codes: list[int] = []

    def one() -> None:
        r = post(locked, CMPL, {"model": FAKE, "prompt": "count:5", "stream": True}, headers=bearer(API_KEYS[1]))
        codes.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(codes) <= {200, 429} and codes.count(200) >= MAX_STREAMS, codes
    time.sleep(0.5)
    held = [Stream(locked, API_KEYS[1]) for _ in range(MAX_STREAMS)]
    try:
        assert [s.status for s in held] == [200] * MAX_STREAMS
    finally:
        for s in held:
            s.close()


def test_body_limit(locked: Locked) -> None:
    """--max-body-bytes 64 KiB: over it is a 413 at once, declared or chunked; under it is read."""
    big = json.dumps({"model": MODEL, "prompt": "x" * (10 << 20)}).encode()
    for data in (big, (big[i:i + 65536] for i in range(0, len(big), 65536))):
        started = time.monotonic()
        r = requests.post(locked.url + CMPL, data=data, headers=KEY, timeout=30)
        assert time.monotonic() - started < 10
        assert refused(r, 413, param=None).startswith("request body")
        assert r.json()["error"]["code"] == "request_too_large"
    under = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY - 200), "max_tokens": 1}).encode()
    r = requests.post(locked.url + CMPL, data=under, headers={**KEY, "Content-Type": "application/json"}, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and ("prompt tokens" in message or "context window" in message)  # read, refused
