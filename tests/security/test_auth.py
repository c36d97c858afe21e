"""Who may call what: every route of the frontend (enumerated from its Flask url_map, so a new
route is covered, or fails here, without editing this file), the admin's two tokens, and
tokens never written to any process's log."""
from __future__ import annotations

import re
import time
from typing import Any

import requests

from http_frontend import auth
from http_frontend.app import create_app
from http_frontend.settings import FrontendSettings
from tests.cluster import wait_until
from tests.security.conftest import (ADMIN, ADMIN_TOKEN, API_KEYS, CLUSTER_TOKEN, KEY, MODEL, WRONG_TOKENS, Locked,
                                     bearer)

OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
OPEN_ROUTES = {"/", "/healthz", "/health", "/ping", "/version", "/metrics", "/openapi.json"}  # deliberately keyless
ALL_TOKENS = (*API_KEYS, ADMIN_TOKEN, CLUSTER_TOKEN, *WRONG_TOKENS)


def routes() -> list[tuple[str, str, str]]:
    """(method, rule, auth level) of every route the frontend serves."""
    app = create_app(FrontendSettings(admin="127.0.0.1:9", workers=1))
    try:
        out = []
        for rule in app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            level = auth.level_of(app.view_functions[rule.endpoint])
            for method in sorted(rule.methods - {"OPTIONS"}):
                out.append((method, rule.rule, level))
        return out
    finally:
        app.extensions["sax_frontend"].close()


def _concrete(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", "sax/test/lm", rule)


def _call(url: str, method: str, rule: str, headers: dict[str, str]) -> requests.Response:
    kwargs: dict[str, Any] = {"headers": headers, "timeout": 30}
    if method in ("POST", "PUT"):
        kwargs["json"] = {}
    return requests.request(method, url + _concrete(rule), **kwargs)


def _refused(r: requests.Response, method: str, rule: str, status: int) -> str | None:
    """None if `r` is a refusal with `status` in the route's error shape, else what is wrong."""
    where = f"{method} {rule}: {r.status_code} {r.text[:200]}"
    if r.status_code != status:
        return f"expected {status}; {where}"
    if method == "HEAD":
        return None
    err = r.json().get("error")
    if rule.startswith(OPENAI_PATHS):
        ok = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and err["message"]
    else:
        ok = isinstance(err, str) and bool(err)
    return None if ok else f"wrong error shape; {where}"


def test_every_route_has_a_declared_level_and_the_document_agrees(locked: Locked) -> None:
    doc = requests.get(f"{locked.url}/openapi.json", timeout=10).json()
    found = routes()
    assert {r for _, r, level in found if level == auth.OPEN} == OPEN_ROUTES
    assert {r for _, r, level in found if level == auth.ADMIN} == {"/publish", "/unpublish", "/update"}
    for method, rule, level in found:
        path = re.sub(r"<(?:\w+:)?(\w+)>", "{model}", rule)  # as the document names it
        op = doc["paths"][path].get(method.lower())
        if op is None:
            assert method == "HEAD" or (rule, method) == ("/listall", "POST") or \
                (rule, method) == ("/listcell", "POST"), (method, rule)
            continue
        assert ("security" in op) == (level != auth.OPEN), (method, rule, level)


def test_keys_on_every_route(locked: Locked) -> None:
    """Data routes: no key or a wrong one is a 401, a data key (or the admin token) passes.
    Mutations: a data key is a 403, no token or a wrong one a 401, the admin token passes.
    Open routes need nothing."""
    problems: list[str] = []
    for method, rule, level in routes():
        def expect(headers: dict[str, str], status: int) -> None:
            problem = _refused(_call(locked.url, method, rule, headers), method, rule, status)
            if problem:
                problems.append(problem)

        def passes(headers: dict[str, str]) -> None:
            r = _call(locked.url, method, rule, headers)
            if r.status_code in (401, 403) or r.status_code >= 500:
                problems.append(f"refused or failed with {headers}: {method} {rule}: {r.status_code} {r.text[:200]}")

        if level == auth.OPEN:
            passes({})
            continue
        expect({}, 401)
        for wrong in WRONG_TOKENS + (CLUSTER_TOKEN,):
            expect(bearer(wrong), 401)
        expect({"Authorization": "Basic " + API_KEYS[0]}, 401)
        expect({"Authorization": "Bearer"}, 401)
        if level == auth.DATA:
            passes(KEY)
            passes(bearer(API_KEYS[1]))
            passes(ADMIN)
        else:
            expect(KEY, 403)
            expect(bearer(API_KEYS[1]), 403)
            passes(ADMIN)
    assert not problems, "\n".join(problems)


def test_admin_tokens(locked: Locked) -> None:
    """The admin itself: mutations need the admin token, heartbeats the cluster token; none or
    an unknown token is a 401, the cell's other token a 403; reads are open."""
    url = locked.admin.url
    body = {"model_id": "/sax/test/tokens", "model_path": "test.fake", "checkpoint": "None", "replicas": 0}
    calls = [("POST", "/models", body), ("PATCH", "/models/sax/test/tokens", {"replicas": 1}),
             ("PUT", "/models/sax/test/tokens", {"replicas": 1}), ("DELETE", "/models/sax/test/tokens", None)]

    def code(r: requests.Response) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["code"]

    for method, path, payload in calls:
        assert code(requests.request(method, url + path, json=payload, timeout=10)) == (401, "UNAUTHENTICATED")
        for wrong in WRONG_TOKENS + (API_KEYS[0],):
            r = requests.request(method, url + path, json=payload, headers=bearer(wrong), timeout=10)
            assert code(r) == (401, "UNAUTHENTICATED"), (method, path, r.text)
        r = requests.request(method, url + path, json=payload, headers=bearer(CLUSTER_TOKEN), timeout=10)
        assert code(r) == (403, "PERMISSION_DENIED"), (method, path, r.text)
    beat = {"server": {"address": 5}}  # past the token check this is a 400: nothing is registered
    assert code(requests.post(f"{url}/heartbeat", json=beat, timeout=10)) == (401, "UNAUTHENTICATED")
    for wrong in WRONG_TOKENS:
        r = requests.post(f"{url}/heartbeat", json=beat, headers=bearer(wrong), timeout=10)
        assert code(r) == (401, "UNAUTHENTICATED"), r.text
    assert code(requests.post(f"{url}/heartbeat", json=beat, headers=ADMIN, timeout=10)) == \
        (403, "PERMISSION_DENIED")
    r = requests.post(f"{url}/heartbeat", json=beat, headers=bearer(CLUSTER_TOKEN), timeout=10)
    assert code(r) == (400, "INVALID_ARGUMENT"), r.text
    r = requests.post(f"{url}/models", json=body, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    assert requests.delete(f"{url}/models/sax/test/tokens", headers=ADMIN, timeout=10).status_code == 200
    for path in ("/models", "/models/sax/test/lm", "/servers", "/stats", "/leader", "/locate/sax/test/lm",
                 "/healthz"):
        assert requests.get(url + path, timeout=10).status_code == 200, path


def test_tokens_never_reach_a_log(locked: Locked) -> None:
    """Requests carrying every token, valid and wrong, in headers and in query strings, to
    the frontend (at DEBUG), the admin (at DEBUG) and the model server; then no log of any of
    them holds a token."""
    fe, admin, server = locked.url, locked.admin.url, locked.model_server.url
    for token in ALL_TOKENS:
        h = bearer(token)
        requests.get(f"{fe}/v1/models", headers=h, params={"api_key": token}, timeout=10)
        requests.post(f"{fe}/v1/completions", headers=h, timeout=30,
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        requests.post(f"{fe}/v1/chat/completions", headers=h, timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
        requests.post(f"{fe}/generate", headers=h, params={"key": token}, timeout=30,
                      json={"model": MODEL, "query": "hi", "extra_inputs": {"per_example_max_decode_steps": 2}})
        requests.post(f"{fe}/publish", headers=h, timeout=10, json={"model": "/sax/test/x", "model_path": "y"})
        requests.post(f"{fe}/unpublish", headers=h, timeout=10, json={"model": "/sax/test/nothing-here"})
        requests.get(f"{fe}/nowhere", headers=h, params={"token": token}, timeout=10)
        requests.post(f"{admin}/heartbeat", headers=h, json={"server": {"address": 5}}, timeout=10)
        requests.post(f"{admin}/models", headers=h, json={"model_id": "/sax/test/x"}, timeout=10)
        requests.get(f"{admin}/locate/sax/test/lm", params={"token": token}, timeout=10)
        requests.post(f"{server}/v1/completions", headers=h, timeout=30,
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    # The access log line is written when the answer is out: wait for the last one.
    wait_until(lambda: locked.frontend.log().count("GET /nowhere 404") >= len(ALL_TOKENS), timeout=10,
               what="the frontend's access log")
    time.sleep(0.5)
    logs = locked.logs()
    assert {name.split("-")[0] for name in logs} >= {"admin", "model", "locked"}, list(logs)
    assert "POST /v1/completions 401" in "".join(logs.values())  # the logs do record these requests
    for name, text in logs.items():
        for token in ALL_TOKENS:
            assert token not in text, f"{token!r} is in {name}"
        for fragment in ("3f9a1c7e", "8b2d4e60", "7c51e0d2", "a94f3b18", "5e7b2a91"):
            assert fragment not in text, f"a piece of a token ({fragment}) is in {name}"
