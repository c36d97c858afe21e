"""In-process pieces of the frontend: settings, auth, admission, fan-out merging, SSE, OpenAPI."""
from __future__ import annotations

import json
import os
import re

import pytest
from flask import Flask

from http_frontend import auth, fanout
from http_frontend.admission import Admission
from http_frontend.app import create_app
from http_frontend.errors import FrontendError
from http_frontend.settings import FrontendSettings, parse_aliases
from http_frontend.upstream import iter_events, rename_model


def test_settings_from_env_with_flags_over_them() -> None:
    env = {"SAX_ADMIN": "admin:1", "SAX_API_KEYS": "a, b,", "SAX_ADMIN_TOKEN": "t", "SAX_FRONTEND_PORT": "9000",
           "SAX_ALLOWED_ORIGINS": "*", "SAX_MAX_OUTSTANDING_PER_MODEL": "7", "SAX_ALIASES": "x=/sax/test/x"}
    s = FrontendSettings.from_env(env)
    assert (s.admin, s.api_keys, s.admin_token, s.port, s.allowed_origins, s.max_outstanding_per_model) == \
        ("admin:1", ("a", "b"), "t", 9000, ("*",), 7)
    assert s.alias_map == {"x": "/sax/test/x"}
    s = FrontendSettings.from_env(env, port=1234, api_keys=("z",), aliases=None)
    assert s.port == 1234 and s.api_keys == ("z",) and s.alias_map == {"x": "/sax/test/x"}
    assert FrontendSettings.from_env({}).port == 8888 and FrontendSettings.from_env({}).api_keys == ()
    with pytest.raises(ValueError):
        parse_aliases(["nonsense"])
    with pytest.raises(ValueError):
        parse_aliases(["x=not-an-id"])


@pytest.mark.parametrize("keys,token,header,level,status", [
    ((), None, None, auth.DATA, None), ((), None, None, auth.ADMIN, None),
    (("k",), None, None, auth.DATA, 401), (("k",), None, "Bearer bad", auth.DATA, 401),
    (("k",), None, "Bearer k", auth.DATA, None), (("k",), "t", "Bearer t", auth.DATA, None),
    (("k",), "t", "Bearer k", auth.ADMIN, 403), (("k",), "t", None, auth.ADMIN, 401),
    (("k",), "t", "Bearer bad", auth.ADMIN, 401), (("k",), "t", "bearer t", auth.ADMIN, None),
    ((), "t", None, auth.DATA, None), (("k",), None, "Bearer k", auth.ADMIN, None),
    (("k",), "t", None, auth.OPEN, None),
])
def test_auth_matrix(keys: tuple, token: str | None, header: str | None, level: str, status: int | None) -> None:
    settings = FrontendSettings(api_keys=keys, admin_token=token)
    with Flask(__name__).test_request_context(headers={"Authorization": header} if header else {}):
        if status is None:
            auth.check(settings, level)
        else:
            with pytest.raises(FrontendError) as e:
                auth.check(settings, level)
            assert e.value.status == status


def test_admission_bound_and_dead_workers() -> None:
    a = Admission(3)
    assert a.try_acquire("/sax/test/a", 2) and a.try_acquire("/sax/test/a")
    assert not a.try_acquire("/sax/test/a") and a.try_acquire("/sax/test/b")
    a.release("/sax/test/a")
    assert a.outstanding("/sax/test/a") == 2 and a.try_acquire("/sax/test/a")
    assert a.try_acquire("/sax/test/big", 50)  # nothing outstanding: a big batch still goes
    pid = os.fork()
    if pid == 0:  # a worker that dies holding two calls of /sax/test/c
        os._exit(0 if a.try_acquire("/sax/test/c", 2) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert a.outstanding("/sax/test/c") == 2
    assert a.try_acquire("/sax/test/c", 2)  # the dead worker's row was reclaimed
    assert a.outstanding("/sax/test/c") == 2


def test_fanout_split_and_merge() -> None:
    assert fanout.split({"prompt": "x"}, "prompt") is None
    assert fanout.split({"prompt": [1, 2, 3]}, "prompt") is None        # one prompt of token ids
    assert fanout.split({"prompt": [[1, 2]]}, "prompt") is None         # one prompt
    assert fanout.split({"prompt": ["a", [1]]}, "prompt") is None       # mixed: the replica refuses it
    assert fanout.split({"prompt": ["a", "b"]}, "prompt") == ["a", "b"]
    with pytest.raises(FrontendError):
        fanout.split({"prompt": ["a"] * (fanout.MAX_PROMPTS + 1)}, "prompt")
    parts = [{"id": "a", "choices": [{"index": 1, "text": "p0s1"}, {"index": 0, "text": "p0s0"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}},
             {"id": "b", "choices": [{"index": 0, "text": "p1s0"}, {"index": 1, "text": "p1s1"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4,
                        "prompt_tokens_details": {"cached_tokens": 1}}}]
    merged = fanout.merge_completions(2)(parts)
    assert [(c["index"], c["text"]) for c in merged["choices"]] == [(0, "p0s0"), (1, "p0s1"), (2, "p1s0"),
                                                                    (3, "p1s1")]
    assert merged["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
                               "prompt_tokens_details": {"cached_tokens": 1}}
    emb = fanout.merge_embeddings([{"data": [{"index": 0, "embedding": [1.0]}], "usage": {"total_tokens": 1}},
                                   {"data": [{"index": 0, "embedding": [2.0]}], "usage": {"total_tokens": 2}}])
    assert [d["index"] for d in emb["data"]] == [0, 1] and emb["usage"] == {"total_tokens": 3}


def test_sse_events_and_model_rename() -> None:
    chunks = [b'data: {"a":1}\n', b'\ndata: {"model":"/sax/test/lm","b"', b':2}\n\ndata: [DONE]\n\n']
    assert list(iter_events(chunks)) == [b'data: {"a":1}\n\n', b'data: {"model":"/sax/test/lm","b":2}\n\n',
                                         b"data: [DONE]\n\n"]
    assert rename_model(b'{"model":"/sax/test/lm"}', "/sax/test/lm", "my-lm") == b'{"model":"my-lm"}'


def test_openapi_documents_every_route() -> None:
    app = create_app(FrontendSettings(admin="127.0.0.1:9", workers=1))
    try:
        doc = app.test_client().get("/openapi.json").get_json()
        rules = {re.sub(r"<(?:\w+:)?(\w+)>", "{model}", r.rule) for r in app.url_map.iter_rules()
                 if r.endpoint != "static"}
        assert rules <= set(doc["paths"]), rules - set(doc["paths"])
        for path, ops in doc["paths"].items():
            for op in ops.values():
                assert "200" in op["responses"] and op.get("operationId"), path
        for ref in set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc))):
            assert ref in doc["components"]["schemas"]
    finally:
        app.extensions["sax_frontend"].close()


def test_no_admin_means_503_not_500() -> None:
    """An unreachable admin (nothing cached yet) is a 503 on every data route, never a 500."""
    app = create_app(FrontendSettings(admin="127.0.0.1:9", workers=1))
    try:
        c = app.test_client()
        r = c.post("/v1/completions", json={"model": "/sax/test/lm", "prompt": "x"})
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "no_ready_replica"
        assert r.headers["Retry-After"] == "1"
        assert c.get("/v1/models").status_code == 503
        r = c.post("/generate", json={"model": "alias-needs-admin", "query": "x"})
        assert r.status_code == 503 and isinstance(r.get_json()["error"], str)
        assert c.get("/healthz").get_json() == {"status": "ok", "admin": "unreachable"}
    finally:
        app.extensions["sax_frontend"].close()
