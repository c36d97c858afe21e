"""The Saxml HTTP API: every curl command of the Saxml HTTP server guide, run with the real
`curl` binary through bash (only the port and model_path changed), and its error shapes."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import requests

from tests.cluster import wait_until
from tests.frontend.conftest import MODEL, Cell

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")

# The guide's commands as printed (reference/004: "Inferencing using Saxml and an HTTP Server"),
# with localhost:8888 -> the test frontend and the Pax model_path -> test.tiny. The guide's
# generate query holds an apostrophe ("Potter's") inside a single-quoted --data argument, which
# no shell accepts; it is the one change: ' -> '\'' so bash passes the same JSON.
GUIDE = {
    "root": """curl localhost:8888""",
    "publish": """curl --request POST \\
--header "Content-type: application/json" \\
--silent \\
localhost:8888/publish \\
--data \\
'{
    "model": "/sax/test/lm2b",
    "model_path": "test.tiny",
    "checkpoint": "None",
    "replicas": 1
}'""",
    "listall": """curl --request GET \\
--header "Content-type: application/json" \\
--silent \\
localhost:8888/listall \\
--data \\
'{
    "sax_cell": "/sax/test"
}'""",
    "listcell": """curl --request GET \\
--header "Content-type: application/json" \\
--silent \\
localhost:8888/listcell \\
--data \\
'{
    "model": "/sax/test/lm2b"
}'""",
    "generate": """curl --request POST \\
--header "Content-type: application/json" \\
--silent \\
localhost:8888/generate \\
--data \\
'{
    "model": "/sax/test/lm2b",
    "query": "Q: Who is Harry Potter'\\''s mom? A: "
}'""",
    "unpublish": """curl --request POST \\
--header "Content-type: application/json" \\
--silent \\
localhost:8888/unpublish \\
--data '
{
    "model": "/sax/test/lm2b"
}
'""",
}


def run_curl(name: str, port: int) -> object:
    cmd = GUIDE[name].replace("localhost:8888", f"localhost:{port}")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_guide_commands_verbatim(cell: Cell) -> None:
    port = cell.frontend.port
    assert run_curl("root", port) == {"message": "HTTP Server for SAX Client"}
    published = run_curl("publish", port)
    assert published == {"model": "/sax/test/lm2b", "model_path": "test.tiny", "path": "test.tiny",
                         "checkpoint": "None", "replicas": 1}
    try:
        assert run_curl("listall", port) == sorted(["/sax/test/empty", "/sax/test/fake", "/sax/test/flaky",
                                                    "/sax/test/lm", "/sax/test/lm2b"])
        first = run_curl("listcell", port)
        assert first == {"model": "/sax/test/lm2b", "model_path": "test.tiny", "checkpoint": "None",
                         "max_replicas": 1, "active_replicas": first["active_replicas"], "min_replicas": 1,
                         "state": "READY" if first["active_replicas"] else "LOADING", "reason": None}
        wait_until(lambda: run_curl("listcell", port)["active_replicas"] == 1, timeout=400, interval=1,
                   what="lm2b loaded")
        results = run_curl("generate", port)
        assert isinstance(results, list) and len(results) == 1
        text, score = results[0]
        assert isinstance(text, str) and isinstance(score, float) and score <= 0
    finally:
        assert run_curl("unpublish", port) == {"model": "/sax/test/lm2b"}
    assert "/sax/test/lm2b" not in run_curl("listall", port)


def test_generate_defaults_and_extra_inputs(cell: Cell) -> None:
    """Greedy generation through the frontend equals the model server's own answer."""
    body = {"model": MODEL, "query": "hello world",
            "extra_inputs": {"temperature": 0.0, "per_example_max_decode_steps": 6}}
    got = requests.post(f"{cell.url}/generate", json=body, timeout=60).json()
    direct = cell.direct("/lm/generate", {"model": MODEL, "text": "hello world",
                                          "extra_inputs": body["extra_inputs"]}).json()["results"]
    assert [t for t, _ in got] == [t for t, _ in direct]
    assert [sc for _, sc in got] == pytest.approx([sc for _, sc in direct], abs=1e-4)
    # No extra_inputs: the guide's defaults (temperature 0.5, 128 steps, top-k 200, top-p 0.95).
    res = requests.post(f"{cell.url}/generate", json={"model": "tiny", "query": "hi"}, timeout=60).json()
    assert len(res) == 1 and isinstance(res[0][0], str)
    n2 = requests.post(f"{cell.url}/generate", json={**body, "extra_inputs": {"num_samples": 2}}, timeout=60)
    assert n2.status_code == 200 and len(n2.json()) == 2


def test_score_matches_model_server(cell: Cell) -> None:
    body = {"model": MODEL, "prefix": "The quick brown", "suffix": [" fox", " dog jumps"]}
    got = requests.post(f"{cell.url}/score", json=body, timeout=60).json()
    direct = cell.direct("/lm/score", {"model": MODEL, "prefix": body["prefix"],
                                       "suffixes": body["suffix"]}).json()["scores"]
    # Equal up to float noise (a batch's composition on a replica may move the last bits).
    assert got == pytest.approx(direct, abs=1e-4) and len(got) == 2 and all(s < 0 for s in got)


def test_listing_also_takes_query_strings(cell: Cell) -> None:
    assert MODEL in requests.get(f"{cell.url}/listall", params={"sax_cell": "/sax/test"}, timeout=10).json()
    d = requests.get(f"{cell.url}/listcell", params={"model": MODEL}, timeout=10).json()
    assert d == {"model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "max_replicas": 2,
                 "active_replicas": 2, "min_replicas": 2, "state": "READY", "reason": None}


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/generate", {"model": "/sax/test/nope", "query": "x"}, 404),
    ("POST", "/generate", {"model": "no-such-alias", "query": "x"}, 404),
    ("POST", "/generate", {"model": MODEL}, 400),
    ("POST", "/generate", {"model": MODEL, "query": 3}, 400),
    ("POST", "/generate", {"model": MODEL, "query": "x", "extra_inputs": {"bogus": 1}}, 400),
    ("POST", "/generate", {"model": MODEL, "query": "x", "extra_inputs": [1]}, 400),
    ("POST", "/generate", {"model": "/sax/test/empty", "query": "x"}, 503),
    ("POST", "/generate", "not json", 400),
    ("POST", "/score", {"model": MODEL, "prefix": "a", "suffix": []}, 400),
    ("GET", "/listcell", {"model": "/sax/test/nope"}, 404),
    ("GET", "/listcell", {}, 400),
    ("GET", "/listall", {"sax_cell": "not a cell"}, 400),
    ("POST", "/publish", {"model": "/sax/test/x", "model_path": "test.tiny", "checkpoint": "None",
                          "replicas": "many"}, 400),
    ("POST", "/publish", {"model": "/sax/test/Bad Name", "model_path": "test.tiny", "checkpoint": "None",
                          "replicas": 1}, 400),
    ("POST", "/publish", {"model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "replicas": 1}, 409),
    ("POST", "/unpublish", {"model": "/sax/test/nope"}, 404),
    ("PUT", "/update", {"model": "/sax/test/nope", "model_path": "test.tiny", "checkpoint": "None",
                        "replicas": 1}, 404),
    ("POST", "/update", {"model": MODEL}, 400),
])
def test_errors_are_4xx_with_a_message(cell: Cell, method: str, path: str, body: object, status: int) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.request(method, f"{cell.url}{path}", data=data, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    if status == 503:
        assert r.headers["Retry-After"] == "1"


def test_update_replicas_echo(cell: Cell) -> None:
    """A replicas-only update through /update (PUT and POST) echoes the model's new state."""
    body = {"model": "/sax/test/empty", "model_path": "test.fake", "checkpoint": "None", "replicas": 0}
    for method in ("PUT", "POST"):
        r = requests.request(method, f"{cell.url}/update", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "/sax/test/empty", "model_path": "test.fake", "path": "test.fake",
                            "checkpoint": "None", "replicas": 0}
