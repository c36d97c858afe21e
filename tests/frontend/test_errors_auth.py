"""Errors (OpenAI envelope on /v1/*), API keys and the admin token, limits, CORS, request ids,
health, metrics and the OpenAPI document."""
from __future__ import annotations

import json
import threading

import openai
import pytest
import requests

from tests.cluster import wait_until
from tests.frontend.conftest import ADMIN_TOKEN, API_KEYS, MODEL, ORIGIN, Cell

KEY = {"Authorization": f"Bearer {API_KEYS[1]}"}


def _envelope(r: requests.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_malformed_json_and_wrong_types(cell: Cell) -> None:
    r = requests.post(f"{cell.url}/v1/completions", data=b'{"model": "x", "prompt": ', timeout=10)
    assert _envelope(r, 400)["type"] == "invalid_request_error"
    r = requests.post(f"{cell.url}/v1/completions", data=b"[1, 2]", timeout=10)
    _envelope(r, 400)
    r = requests.post(f"{cell.url}/v1/completions", json={"model": 5, "prompt": "x"}, timeout=10)
    _envelope(r, 400, param="model")
    r = requests.post(f"{cell.url}/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": "yes"},
                      timeout=10)
    _envelope(r, 400, param="stream")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "a"}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"model": MODEL, "prompt": {"not": "a prompt"}}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/embeddings", {"model": MODEL, "input": 7}),
])
def test_model_server_400s_pass_through_unchanged(cell: Cell, path: str, body: dict) -> None:
    r = requests.post(f"{cell.url}{path}", json=body, timeout=30)
    direct = cell.direct(path, body)
    assert r.status_code == direct.status_code == 400
    assert r.content == direct.content


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": "x", "n": -1}, {"model": MODEL, "prompt": [], "max_tokens": 1},
    {"model": MODEL, "prompt": ["a", 3]}, {"model": MODEL, "prompt": [[1], "a"]}, {"model": [MODEL]},
    {"model": MODEL, "prompt": [[1, 2], []]}, {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}},
    {"model": "", "prompt": "x"}, {}, {"model": MODEL, "prompt": ["a", "b"], "n": "two"},
])
def test_bad_input_is_never_a_5xx(cell: Cell, body: dict) -> None:
    r = requests.post(f"{cell.url}/v1/completions", json=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    _envelope(r, r.status_code)


def test_unknown_routes_and_methods(cell: Cell) -> None:
    _envelope(requests.get(f"{cell.url}/v1/completions", timeout=10), 405)
    _envelope(requests.get(f"{cell.url}/v1/nothing", timeout=10), 404)
    r = requests.get(f"{cell.url}/nothing", timeout=10)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


def test_api_keys(cell: Cell) -> None:
    url = cell.secure.url
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    _envelope(requests.post(f"{url}/v1/completions", json=body, timeout=10), 401, code="invalid_api_key")
    _envelope(requests.post(f"{url}/v1/completions", json=body, timeout=10,
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert requests.post(f"{url}/v1/completions", json=body, timeout=30, headers=KEY).status_code == 200
    assert requests.post(f"{url}/v1/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    r = requests.post(f"{url}/generate", json={"model": MODEL, "query": "x"}, timeout=10)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    ids = [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEYS[0]).models.list()]
    assert MODEL in ids
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # open routes stay open
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200


def test_admin_token_on_mutations(cell: Cell) -> None:
    url = cell.secure.url
    body = {"model": "/sax/test/authz", "model_path": "test.fake", "checkpoint": "None", "replicas": 0}
    r = requests.post(f"{url}/publish", json=body, timeout=10, headers=KEY)
    assert r.status_code == 403 and isinstance(r.json()["error"], str)
    assert requests.post(f"{url}/publish", json=body, timeout=10).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = requests.post(f"{url}/publish", json=body, timeout=10, headers=admin)
    assert r.status_code == 200 and r.json()["model"] == "/sax/test/authz"
    assert requests.put(f"{url}/update", json=body, timeout=10, headers=KEY).status_code == 403
    assert requests.post(f"{url}/unpublish", json={"model": "/sax/test/authz"}, timeout=10,
                         headers=KEY).status_code == 403
    r = requests.post(f"{url}/unpublish", json={"model": "/sax/test/authz"}, timeout=10, headers=admin)
    assert r.status_code == 200 and r.json() == {"model": "/sax/test/authz"}


def test_body_limit(cell: Cell) -> None:
    url = cell.secure.url
    big = {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1}
    _envelope(requests.post(f"{url}/v1/completions", json=big, timeout=10, headers=KEY), 413,
              code="request_too_large")
    r = requests.post(f"{url}/generate", json={"model": MODEL, "query": "x" * 5000}, timeout=10, headers=KEY)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)


def test_outstanding_limit_gives_429_with_retry_after(cell: Cell) -> None:
    """The secure frontend lets 2 requests per model be in flight; the fake replica holds them."""
    url, fake = cell.secure.url, cell.fake
    fake.release.clear()
    body = {"model": "/sax/test/fake", "prompt": "hang", "max_tokens": 1}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(requests.post(
        f"{url}/v1/completions", json=body, timeout=60, headers=KEY).status_code)) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: fake.hanging == 2, timeout=20, what="two requests held")
        r = requests.post(f"{url}/v1/completions", json=body, timeout=10, headers=KEY)
        _envelope(r, 429)
        assert r.headers["Retry-After"] == "1"
        other = requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                              timeout=30, headers=KEY)
        assert other.status_code == 200  # the bound is per model
    finally:
        fake.release.set()
        for t in threads:
            t.join(30)
    assert results == [200, 200]
    # Places are given back once each answer is out (a moment after the caller has it).
    wait_until(lambda: requests.post(f"{url}/v1/completions", json=body, timeout=10,
                                     headers=KEY).status_code == 200, timeout=10, what="places back")


def test_cors(cell: Cell) -> None:
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = requests.options(f"{cell.secure.url}/v1/chat/completions", headers=pre, timeout=10)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = requests.get(f"{cell.secure.url}/v1/models", headers={"Origin": ORIGIN, **KEY}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(f"{cell.secure.url}/v1/models", headers={"Origin": "https://evil.example", **KEY}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.options(f"{cell.url}/v1/chat/completions", headers=pre, timeout=10)  # CORS off
    assert "Access-Control-Allow-Origin" not in r.headers


def test_request_ids(cell: Cell) -> None:
    r = requests.get(f"{cell.url}/healthz", timeout=10)
    assert len(r.headers["X-Request-Id"]) >= 16
    r = requests.post(f"{cell.url}/v1/completions", json={"model": "/sax/test/fake", "prompt": "hi"},
                      headers={"X-Request-Id": "trace-42"}, timeout=30)
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "trace-42"
    assert any(h.get("X-Request-Id") == "trace-42" for _, h in cell.fake.seen)  # sent upstream too
    r = requests.get(f"{cell.url}/nothing", headers={"X-Request-Id": "bad id!" * 30}, timeout=10)
    assert r.headers["X-Request-Id"] != "bad id!" * 30
    # And in the access log (written once the answer is out: it may trail the answer a little).
    wait_until(lambda: "trace-42" in cell.frontend.log(), timeout=10, what="the access log line")


def test_healthz_metrics_openapi(cell: Cell) -> None:
    assert requests.get(f"{cell.url}/healthz", timeout=10).json() == {"status": "ok", "admin": "ok"}
    requests.post(f"{cell.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                  timeout=30)
    requests.post(f"{cell.url}/v1/completions", json={"model": "/sax/test/nope", "prompt": "hi"}, timeout=30)
    text = requests.get(f"{cell.url}/metrics", timeout=10).text
    for name in ("sax_frontend_requests_total", "sax_frontend_errors_total",
                 "sax_frontend_request_duration_seconds_bucket", "sax_frontend_time_to_first_byte_seconds_bucket",
                 "sax_frontend_upstream_requests_total", "sax_frontend_upstream_time_to_first_byte_seconds_bucket",
                 "sax_frontend_outstanding_requests", "sax_frontend_upstream_duration_seconds_bucket"):
        assert name in text, name
    assert 'route="/v1/completions"' in text and f'model="{MODEL}"' in text
    doc = requests.get(f"{cell.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    assert {"/", "/publish", "/unpublish", "/update", "/listall", "/listcell", "/generate", "/score",
            "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
            "/detokenize", "/tokenizer_info", "/healthz", "/metrics", "/openapi.json"} <= set(doc["paths"])
    json.dumps(doc)


def test_tokenizer_routes_like_vllm(cell: Cell) -> None:
    """lm-eval's remote tokenizer names no model: the only ready test.tiny... is not unique here,
    so it names one; with a model they forward to a replica."""
    info = requests.get(f"{cell.url}/tokenizer_info", params={"model": MODEL}, timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"]
    toks = requests.post(f"{cell.url}/tokenize", json={"model": "tiny", "prompt": "hello world",
                                                        "add_special_tokens": False}, timeout=10).json()
    direct = cell.direct("/tokenize", {"model": MODEL, "prompt": "hello world", "add_special_tokens": False})
    assert toks == direct.json()
    back = requests.post(f"{cell.url}/detokenize", json={"model": MODEL, "tokens": toks["tokens"]}, timeout=10)
    assert back.json() == {"prompt": "hello world"}
    r = requests.post(f"{cell.url}/tokenize", json={"prompt": "x"}, timeout=10)  # several models: must name one
    _envelope(r, 400, param="model")
