"""The admin API in-process (real app, real SQLite/PostgreSQL): shapes, validation, auth."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.cluster import wait_until

SERVER = {"address": "10.0.0.1:10001", "boot_id": "b1", "chip": "cpu", "topology": "1",
          "device_count": 1, "memory_bytes": 8 << 30, "tags": ["x"],
          "servable_model_paths": ["test.tiny", "lm.hf"]}


def publish(client, model_id: str = "/sax/test/lm", replicas: int = 1, **extra: Any):  # type: ignore[no-untyped-def]
    return client.post("/models", json={"model_id": model_id, "model_path": "test.tiny",
                                        "checkpoint": "None", "replicas": replicas, **extra})


def beat(client, models: list[dict[str, Any]] | None = None, server: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    r = client.post("/heartbeat", json={"server": server or SERVER, "models": models or []})
    assert r.status_code == 200, r.json
    return r.json


@pytest.fixture(params=["sqlite", "postgres"])
def client(request):  # type: ignore[no-untyped-def]
    db_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    app = request.getfixturevalue("make_app")(db_url=db_url, auto_migrate=True)
    return app.test_client()


def test_publish_list_detail_update_unpublish(client) -> None:  # type: ignore[no-untyped-def]
    r = publish(client, overrides={"num_slots": 4})
    assert r.status_code == 201
    assert r.json["model_id"] == "/sax/test/lm" and r.json["max_replicas"] == 1
    assert r.json["checkpoint"] == "None" and r.json["overrides"] == {"num_slots": 4}
    assert client.get("/models").json == {"models": ["/sax/test/lm"]}
    assert client.get("/models?cell=/sax/test").json == {"models": ["/sax/test/lm"]}
    assert client.get("/models", json={"cell": "/sax/other"}).json == {"models": []}
    detail = client.get("/models/sax/test/lm").json
    assert detail["model_path"] == "test.tiny" and detail["active_replicas"] == 0
    r = client.patch("/models/sax/test/lm", json={"replicas": 3})
    assert r.status_code == 200 and r.json["max_replicas"] == 3 and r.json["generation"] == 1
    r = client.put("/models/sax/test/lm", json={"checkpoint": "/ckpt/b", "model_path": "test.tiny"})
    assert r.json["checkpoint"] == "/ckpt/b" and r.json["generation"] == 2
    full = client.get("/models?detail=1").json["models"]
    assert [m["model_id"] for m in full] == ["/sax/test/lm"]
    gone = client.delete("/models/sax/test/lm").json
    assert gone["model_id"] == "/sax/test/lm" and gone["snapshot"]["behind"] is False, gone
    assert client.get("/models").json == {"models": []}
    assert client.get("/models/sax/test/lm").status_code == 404


def test_validation_errors(client) -> None:  # type: ignore[no-untyped-def]
    def err(r, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
        assert r.status_code == status, r.json
        assert r.json["error"]["code"] == code
        return r.json["error"]["message"]

    assert "model name" in err(publish(client, "/sax/test/Bad"), 400, "INVALID_ARGUMENT")
    assert "cell" in err(publish(client, "/sax/other/lm"), 400, "INVALID_ARGUMENT")
    err(publish(client, replicas=-1), 400, "INVALID_ARGUMENT")
    err(publish(client, checkpoint="../../etc"), 400, "INVALID_ARGUMENT")
    assert "unknown override" in err(publish(client, overrides={"nope": 1}), 400, "INVALID_ARGUMENT")
    err(client.post("/models", data=b"{not json", content_type="application/json"), 400, "INVALID_ARGUMENT")
    err(client.post("/models", data=b"\xff\xfe", content_type="application/json"), 400, "INVALID_ARGUMENT")
    err(client.post("/models", json=[1, 2]), 400, "INVALID_ARGUMENT")
    assert publish(client).status_code == 201
    err(publish(client), 409, "ALREADY_EXISTS")
    assert "model_path" in err(client.patch("/models/sax/test/lm", json={"model_path": "lm.hf"}),
                               400, "INVALID_ARGUMENT")
    err(client.patch("/models/sax/test/nope", json={"replicas": 1}), 404, "NOT_FOUND")
    err(client.delete("/models/sax/test/nope"), 404, "NOT_FOUND")
    err(client.get("/models/sax/test/nope"), 404, "NOT_FOUND")
    err(client.get("/locate/sax/test/nope"), 404, "NOT_FOUND")
    err(client.post("/heartbeat", json={"server": {"address": 5}}), 400, "INVALID_ARGUMENT")
    err(client.post("/heartbeat", json={"server": SERVER, "models": [{"model_id": "/sax/test/lm",
                                                                      "status": "WEIRD"}]}),
        400, "INVALID_ARGUMENT")
    err(client.get("/nowhere"), 404, "NOT_FOUND")
    err(client.delete("/models"), 405, "METHOD_NOT_ALLOWED")


def test_unpublishing_model_cannot_be_republished_until_unloaded(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app().test_client()
    assert publish(client).status_code == 201
    wait_until(lambda: beat(client)["desired"], what="placement")
    beat(client, [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADED"}])
    client.delete("/models/sax/test/lm")
    r = publish(client)
    assert r.status_code == 409 and r.json["error"]["code"] == "UNAVAILABLE"
    assert "being unpublished" in r.json["error"]["message"]
    wait_until(lambda: beat(client, [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADED"}])
               ["desired"] == [], timeout=10, what="the leader unassigning it")
    beat(client, [])  # the server unloaded it
    wait_until(lambda: publish(client).status_code == 201, what="republish after unload")


def test_heartbeat_desired_set_and_locate_long_poll(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app().test_client()
    publish(client, overrides={"num_slots": 2})
    assert client.get("/locate/sax/test/lm").json["addresses"] == []
    desired = wait_until(lambda: beat(client)["desired"], what="placement")
    assert desired == [{"model_id": "/sax/test/lm", "generation": 1, "model_path": "test.tiny",
                        "checkpoint": "None", "overrides": {"num_slots": 2}}]
    beat(client, [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADING"}])
    loc = client.get("/locate/sax/test/lm").json
    assert loc["addresses"] == []  # never routed before it is ready

    got: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        got["answer"] = client.get(f"/locate/sax/test/lm?version={loc['version']}&timeout=10").json
        got["waited"] = time.monotonic() - started

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    beat(client, [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADED",
                   "memory_bytes": 1234, "load_time_s": 0.5}])
    t.join(10)
    assert got["answer"]["addresses"] == [SERVER["address"]]
    assert got["answer"]["version"] != loc["version"]
    assert 0.4 < got["waited"] < 5
    # Unchanged version + short timeout: answers after the timeout with the same version.
    same = client.get(f"/locate/sax/test/lm?version={got['answer']['version']}&timeout=0.3").json
    assert same["version"] == got["answer"]["version"]
    detail = client.get("/models/sax/test/lm").json
    assert detail["active_replicas"] == 1
    assert detail["replicas"][0]["load_time_s"] == 0.5 and detail["replicas"][0]["memory_bytes"] == 1234
    servers = client.get("/servers").json["servers"]
    assert servers[0]["address"] == SERVER["address"] and servers[0]["alive"]
    assert servers[0]["models"] == [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADED",
                                     "memory_bytes": 1234, "running": 0, "waiting": 0}]
    assert servers[0]["used_memory_bytes"] == 1234
    stats = client.get("/stats").json
    assert stats["models"] == 1 and stats["servers"] == 1 and stats["leader"]["valid"]


def test_tokens_guard_mutations_and_heartbeats(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app(admin_token="adm-secret", cluster_token="clu-secret").test_client()
    r = publish(client)
    assert r.status_code == 401 and r.json["error"]["code"] == "UNAUTHENTICATED"
    r = client.post("/models", json={"model_id": "/sax/test/lm"}, headers={"Authorization": "Bearer clu-secret"})
    assert r.status_code == 403
    ok = client.post("/models", headers={"Authorization": "Bearer adm-secret"},
                     json={"model_id": "/sax/test/lm", "model_path": "test.tiny", "checkpoint": "None",
                           "replicas": 1})
    assert ok.status_code == 201
    assert client.get("/models").status_code == 200  # reads are open
    assert client.post("/heartbeat", json={"server": SERVER}).status_code == 401
    assert client.post("/heartbeat", json={"server": SERVER},
                       headers={"Authorization": "Bearer adm-secret"}).status_code == 403
    assert client.post("/heartbeat", json={"server": SERVER},
                       headers={"Authorization": "Bearer clu-secret"}).status_code == 200
    for call in (lambda h: client.delete("/models/sax/test/lm", headers=h),
                 lambda h: client.patch("/models/sax/test/lm", json={"replicas": 2}, headers=h)):
        assert call({}).status_code == 401
        assert call({"Authorization": "Bearer wrong"}).status_code == 401
        assert call({"Authorization": "Bearer clu-secret"}).status_code == 403


def test_healthz(make_app) -> None:  # type: ignore[no-untyped-def]
    r = make_app().test_client().get("/healthz")
    assert r.status_code == 200 and r.json["status"] == "ok" and r.json["cell"] == "/sax/test"


def test_heartbeat_fast_path_answers_unchanged_until_the_desired_set_moves(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app().test_client()
    first = beat(client)
    assert first["desired"] == [] and "unchanged" not in first
    same = client.post("/heartbeat", json={"server": SERVER, "models": [],
                                           "desired_version": first["desired_version"]}).json
    assert same["unchanged"] is True and "desired" not in same
    publish(client)
    # The leader places the model on this server: the version moves, the full set comes back.
    moved = wait_until(lambda: (lambda a: a if not a.get("unchanged") else None)(client.post(
        "/heartbeat", json={"server": SERVER, "models": [], "desired_version": first["desired_version"]}).json),
        what="desired set change")
    assert moved["desired_version"] > first["desired_version"]
    assert [d["model_id"] for d in moved["desired"]] == ["/sax/test/lm"]
    # A changed report is written (not short-circuited), even with a current version.
    loaded = [{"model_id": "/sax/test/lm", "generation": 1, "status": "LOADED"}]
    r = client.post("/heartbeat", json={"server": SERVER, "models": loaded,
                                        "desired_version": moved["desired_version"]}).json
    assert "desired" in r
    assert client.get("/models/sax/test/lm").json["active_replicas"] == 1
    r = client.post("/heartbeat", json={"server": SERVER, "models": loaded,
                                        "desired_version": moved["desired_version"]}).json
    assert r.get("unchanged") is True
    # Liveness from fast-path heartbeats still reaches the database (batched).
    for _ in range(4):
        time.sleep(0.25)
        assert client.post("/heartbeat", json={"server": SERVER, "models": loaded,
                                               "desired_version": moved["desired_version"]}).json["unchanged"]
    time.sleep(0.2)
    age = client.get("/servers").json["servers"][0]["last_heartbeat_age_s"]
    assert age < 0.9  # the last full write is 1.2 s old by now: the fast path's times were written


def test_heartbeat_route_refuses_bad_requests_in_the_error_shape(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app().test_client()
    for resp, status, code in (
            (client.get("/heartbeat"), 405, "METHOD_NOT_ALLOWED"),
            (client.post("/heartbeat", data=b"{not json", content_type="application/json"), 400, "INVALID_ARGUMENT"),
            (client.post("/heartbeat", json=[1, 2]), 400, "INVALID_ARGUMENT"),
            (client.post("/heartbeat", data=b"\xff\xfe", content_type="application/json"), 400, "INVALID_ARGUMENT"),
            (client.post("/heartbeat", json={"server": {"address": 7}}), 400, "INVALID_ARGUMENT"),
            (client.post("/heartbeat", data=b"{}" + b" " * (2 << 20), content_type="application/json"),
             413, "REQUEST_ENTITY_TOO_LARGE")):
        assert resp.status_code == status and resp.json["error"]["code"] == code, resp.data[:200]
        assert resp.json["error"]["message"]
    assert beat(client)["desired"] == []  # and the route still serves


def test_fast_path_sees_the_leaders_changes_within_a_refresh(make_app) -> None:  # type: ignore[no-untyped-def]
    """The in-memory fast path never hides a change for longer than its refresh interval."""
    app = make_app()
    client = app.test_client()
    first = beat(client)
    publish(client)
    moved = wait_until(lambda: (lambda a: a if not a.get("unchanged") else None)(client.post(
        "/heartbeat", json={"server": SERVER, "models": [], "desired_version": first["desired_version"]}).json),
        timeout=10, what="desired set change")
    assert [d["model_id"] for d in moved["desired"]] == ["/sax/test/lm"]
    # Unpublish: the leader unassigns; the answer moves again though the report is the same.
    assert client.delete("/models/sax/test/lm").status_code == 200
    gone = wait_until(lambda: (lambda a: a if not a.get("unchanged") else None)(client.post(
        "/heartbeat", json={"server": SERVER, "models": [], "desired_version": moved["desired_version"]}).json),
        timeout=10, what="unassignment")
    assert gone["desired"] == [] and gone["desired_version"] > moved["desired_version"]


def test_hostile_input_is_a_400_never_a_500(client) -> None:  # type: ignore[no-untyped-def]
    """Inputs that once slipped through or failed inside: names with a trailing newline (`$`
    matches before one), digits int() refuses ("²"), digit strings past int()'s limit, NaN,
    lone surrogates, nesting deeper than the parser, a long-poll timeout of nan (waited forever)."""
    def err(r) -> None:  # type: ignore[no-untyped-def]
        assert r.status_code == 400, r.json
        assert r.json["error"]["code"] == "INVALID_ARGUMENT"

    err(publish(client, "/sax/test/lm\n"))
    err(client.post("/models", json={"model_id": "/sax/test/lm", "model_path": "test.tiny\n", "checkpoint": "None",
                                     "replicas": 1}))
    err(publish(client, checkpoint="/ckpt/a\n"))
    err(publish(client, overrides={"alias": "tiny\n"}))
    for replicas in ("²", "٣", "9" * 5000, "-1", " ", 1.0):
        err(publish(client, replicas=replicas))
    assert publish(client, replicas=" 2 ").json["max_replicas"] == 2
    for raw in (b'{"model_id": "/sax/test/x", "replicas": NaN}', b'{"model_id": "/sax/test/\\ud800"}',
                b"[" * 100_000 + b"]" * 100_000, b'{"replicas": 1' + b"0" * 5000 + b"}", b'{"a": 1e999}'):
        err(client.post("/models", data=raw, content_type="application/json"))
    for timeout in ("nan", "inf", "x"):
        err(client.get(f"/locate/sax/test/lm?version=0&timeout={timeout}"))
    assert client.get("/models").json == {"models": ["/sax/test/lm"]}


def test_checkpoint_roots(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app(checkpoint_roots=("/data/ckpt", "gs://bucket/models/")).test_client()
    for bad in ("/data/ckptx/m", "/data/ckpt/../etc", "/data", "/etc/passwd", "//data/ckpt/m", "data/ckpt/m",
                "gs://bucket/models-evil/m", "gs://bucket/models/../x", "gs://other/models/m", "file:///data/ckpt/m"):
        r = publish(client, checkpoint=bad)
        assert r.status_code == 400 and r.json["error"]["code"] == "INVALID_ARGUMENT", bad
    for i, ok in enumerate(("/data/ckpt", "/data/ckpt/m", "/data/ckpt/./m", "gs://bucket/models/m", "None")):
        assert publish(client, f"/sax/test/m{i}", checkpoint=ok).status_code == 201, ok
    r = client.patch("/models/sax/test/m1", json={"checkpoint": "/etc/passwd"})
    assert r.status_code == 400


def test_autoscaling_bounds_on_publish_update_and_demand(client) -> None:  # type: ignore[no-untyped-def]
    r = publish(client, "/sax/test/auto", 1, min_replicas=0, max_replicas=3, idle_seconds=30)
    assert r.status_code == 201, r.json
    d = r.json
    assert (d["min_replicas"], d["requested_replicas"], d["max_replicas"], d["target_replicas"]) == (0, 1, 3, 1)
    assert d["idle_seconds"] == 30 and d["state"] == "LOADING" and d["last_scale"]["reason"]
    fixed = publish(client, "/sax/test/fixed", 2).json
    assert (fixed["min_replicas"], fixed["max_replicas"], fixed["idle_seconds"]) == (2, 2, 300)
    for bad in ({"min_replicas": 2}, {"max_replicas": 0}, {"idle_seconds": 0}, {"idle_seconds": "nan"},
                {"min_replicas": -1}, {"max_replicas": True}, {"idle_seconds": [1]}):
        r = publish(client, "/sax/test/bad", 1, **bad)
        assert r.status_code == 400 and r.json["error"]["code"] == "INVALID_ARGUMENT", (bad, r.json)
    # A bound equal to replicas follows it; one set apart keeps its value.
    d = client.patch("/models/sax/test/fixed", json={"replicas": 3}).json
    assert (d["min_replicas"], d["max_replicas"], d["target_replicas"]) == (3, 3, 3)
    d = client.patch("/models/sax/test/auto", json={"replicas": 2}).json
    assert (d["min_replicas"], d["max_replicas"], d["target_replicas"]) == (0, 3, 2)
    r = client.patch("/models/sax/test/auto", json={"max_replicas": 1})  # below replicas 2
    assert r.status_code == 400 and "min_replicas <= replicas <= max_replicas" in r.json["error"]["message"]
    d = client.patch("/models/sax/test/auto", json={"replicas": 1, "max_replicas": 1, "idle_seconds": 5}).json
    assert (d["min_replicas"], d["max_replicas"], d["target_replicas"], d["idle_seconds"]) == (0, 1, 1, 5)
    # A call waiting for a model that can load is noted; one that can never load is told why.
    r = client.post("/demand/sax/test/auto")
    assert r.status_code == 200 and r.json["loading"] is True and r.json["addresses"] == []
    publish(client, "/sax/test/never", 0)
    r = client.post("/demand/sax/test/never")
    assert r.json["loading"] is False and "max_replicas 0" in r.json["reason"]
    assert client.post("/demand/sax/test/nope").status_code == 404
