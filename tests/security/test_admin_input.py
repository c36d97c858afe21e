"""Hostile publishes, updates and heartbeats against the real admin process (with allowed
checkpoint roots configured), directly and through the frontend's Saxml routes: every one is
a 4xx in the API's error shape, and nothing is published by a refused request."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.security.conftest import ADMIN, CLUSTER_TOKEN, GS_ROOT, Locked, bearer

BAD_MODEL_IDS = ["/sax/test/Bad", "/sax/test/lm\n", "/sax/test/" + "a" * 200, "/sax/test/../lm", "/sax/test/lm/x",
                 "/sax/Test/lm", "/sax/other/lm", "sax/test", "/sax/test/ünï", "/sax/test/lm%2F..", "/sax/test/",
                 "/sax/test/-lm", "/sax/test/1lm", "", "/sax/test/lm\x00", 5, None, ["/sax/test/lm"]]
BAD_MODEL_PATHS = ["../x", "test.tiny\n", "a/b", "", "1abc", "test tiny", "test.tiny;rm", 7, None]
BAD_REPLICAS = [-1, 1025, 10 ** 30, 1.5, "2x", "²", "٣", "9" * 5000, True, None, [], {}, "-1", " "]
BAD_OVERRIDES = [{"nope": 1}, {"num_slots": "many"}, {"num_slots": 0}, {"num_slots": True}, {"num_slots": 10 ** 9},
                 {"dtype": "int8"}, {"prefill_buckets": [32, 16]}, {"prefill_buckets": []}, {"alias": "bad name!"},
                 {"alias": "x" * 200}, {"max_seq_len": 1e9}, {"constraints": "gpu"}, {"ram": -1},
                 {"max_queue": [1]}, "num_slots=4", [1], {"": 1}]


def bad_checkpoints(root: str) -> list[Any]:
    return ["../etc", f"{root}/../etc", f"{root}/a/../../etc", "/etc/passwd", "//etc/passwd", "relative/path",
            f"{root}evil/x", f"{root}/x\n", f"{root}/x y", f"{root}/x;rm -rf", "file:///etc/passwd",
            "gs://other-bucket/x", f"{GS_ROOT}/../x", f"{GS_ROOT}evil/x", "gs://sax-ckpt/modelsx",
            "x" * 2000, "", 5, ["a"], "~/.ssh"]


def _publish(url: str, model_id: str = "/sax/test/hostile", **fields: Any) -> requests.Response:
    body = {"model_id": model_id, "model_path": "test.fake", "checkpoint": "None", "replicas": 0, **fields}
    return requests.post(f"{url}/models", json=body, headers=ADMIN, timeout=10)


def _refused(r: requests.Response, status: int = 400, code: str = "INVALID_ARGUMENT") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err["message"]


def _not_published(url: str) -> None:
    assert requests.get(f"{url}/models/sax/test/hostile", timeout=10).status_code == 404


@pytest.mark.parametrize("field,values", [("model_id", BAD_MODEL_IDS), ("model_path", BAD_MODEL_PATHS),
                                          ("replicas", BAD_REPLICAS), ("overrides", BAD_OVERRIDES)])
def test_publish_refuses_bad_fields(locked: Locked, field: str, values: list[Any]) -> None:
    url = locked.admin.url
    for value in values:
        _refused(_publish(url, **{field: value}))
    _not_published(url)


def test_checkpoints_outside_the_allowed_roots(locked: Locked) -> None:
    url, root = locked.admin.url, str(locked.checkpoint_root)
    for checkpoint in bad_checkpoints(root):
        _refused(_publish(url, checkpoint=checkpoint))
    _not_published(url)
    for i, ok in enumerate((f"{root}/model-a", f"{root}/./model-a", f"{GS_ROOT}/model-b", "None", None)):
        model = f"/sax/test/rooted-{i}"
        r = _publish(url, model, checkpoint=ok)
        assert r.status_code == 201, (ok, r.text)
        # An update is held to the same roots.
        for checkpoint in bad_checkpoints(root)[:8]:
            _refused(requests.patch(f"{url}/models{model}", json={"checkpoint": checkpoint}, headers=ADMIN,
                                    timeout=10))
        assert requests.delete(f"{url}/models{model}", headers=ADMIN, timeout=10).status_code == 200


def test_updates_and_unpublishes_refuse_bad_input(locked: Locked) -> None:
    url = locked.admin.url
    assert _publish(url, "/sax/test/updated").status_code == 201
    target = f"{url}/models/sax/test/updated"
    try:
        for value in BAD_REPLICAS:
            if value is None:
                continue  # no replicas in an update: nothing to change
            _refused(requests.patch(target, json={"replicas": value}, headers=ADMIN, timeout=10))
        _refused(requests.patch(target, json={"model_path": "lm.hf"}, headers=ADMIN, timeout=10))
        _refused(requests.patch(target, json={"overrides": {"num_slots": 2}}, headers=ADMIN, timeout=10))
        for path in ("/models/sax/test/Bad", "/models/sax/test/../../leader", "/models/sax/other/hostile"):
            r = requests.patch(f"{url}{path}", json={"replicas": 1}, headers=ADMIN, timeout=10)
            assert r.status_code in (400, 404, 405), r.text
            assert requests.delete(f"{url}{path}", headers=ADMIN, timeout=10).status_code in (400, 404, 405)
        detail = requests.get(target, timeout=10).json()
        assert detail["max_replicas"] == 0 and detail["checkpoint"] == "None"
    finally:
        requests.delete(target, headers=ADMIN, timeout=10)


@pytest.mark.parametrize("raw,status", [
    (b"{not json", 400), (b"\xff\xfe\xfd", 400), (b"[1, 2]", 400), (b'"x"', 400), (b"[" * 50_000 + b"]" * 50_000, 400),
    (b'{"model_id": "/sax/test/x\\ud800"}', 400), (b'{"model_id": "/sax/test/x", "replicas": NaN}', 400),
    (json.dumps({"model_id": "/sax/test/x", "pad": "x" * (2 << 20)}).encode(), 413),
])
def test_bodies_that_are_not_json_objects(locked: Locked, raw: bytes, status: int) -> None:
    url = locked.admin.url
    r = requests.post(f"{url}/models", data=raw, headers={**ADMIN, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == status and r.json()["error"]["code"], r.text
    r = requests.post(f"{url}/heartbeat", data=raw, headers=bearer(CLUSTER_TOKEN), timeout=10)
    assert r.status_code in (400, 413) and r.json()["error"]["code"], r.text
    if status == 413:  # also when it comes chunked, without a length
        for path, headers in (("/models", ADMIN), ("/heartbeat", bearer(CLUSTER_TOKEN))):
            chunks = (raw[i:i + 65536] for i in range(0, len(raw), 65536))
            r = requests.post(f"{url}{path}", data=chunks, headers=headers, timeout=10)
            assert r.status_code == 413 and r.json()["error"]["code"] == "REQUEST_ENTITY_TOO_LARGE", r.text


def test_long_poll_arguments(locked: Locked) -> None:
    url = locked.admin.url
    for timeout in ("nan", "inf", "-inf", "1e400", "x"):
        r = requests.get(f"{url}/locate/sax/test/lm", params={"version": "0", "timeout": timeout}, timeout=5)
        assert r.status_code == 400, (timeout, r.text)  # nan once waited forever
    r = requests.get(f"{url}/locate/sax/test/lm", params={"version": "0", "timeout": "-5"}, timeout=5)
    assert r.status_code == 200


def test_through_the_frontend(locked: Locked) -> None:
    """The same refusals reach a caller of the frontend's /publish and /update as Saxml's
    {"error": message}; a model id cannot walk out of /models in the admin's URL."""
    fe, root = locked.url, str(locked.checkpoint_root)

    def refused(path: str, body: dict[str, Any], method: str = "POST") -> str:
        r = requests.request(method, fe + path, json=body, headers=ADMIN, timeout=10)
        assert r.status_code == 400, (body, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
        return r.json()["error"]

    base = {"model": "/sax/test/hostile", "model_path": "test.fake", "checkpoint": "None", "replicas": 0}
    for model in BAD_MODEL_IDS[:14]:
        refused("/publish", {**base, "model": model})
    for checkpoint in bad_checkpoints(root)[:15]:
        refused("/publish", {**base, "checkpoint": checkpoint})
    for replicas in (-1, 1025, "²", "9" * 50, 1.5, True):
        refused("/publish", {**base, "replicas": replicas})
    for overrides in BAD_OVERRIDES[:12]:
        refused("/publish", {**base, "overrides": overrides})
    _not_published(locked.admin.url)
    for model in ("/sax/test/../../../leader", "/sax/test/x/../lm", "/sax/test/lm/..", "/sax/test/lm\n"):
        refused("/unpublish", {"model": model})
        refused("/update", {"model": model, "replicas": 0}, method="PUT")
        r = requests.get(f"{fe}/listcell", params={"model": model}, headers=ADMIN, timeout=10)
        assert r.status_code in (400, 404) and isinstance(r.json()["error"], str), r.text
    detail = requests.get(f"{locked.admin.url}/models/sax/test/lm", timeout=10).json()
    assert detail["max_replicas"] == 1 and detail["active_replicas"] == 1  # untouched
