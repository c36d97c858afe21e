"""The reconciler's pure planning step, case by case."""
from __future__ import annotations

from admin_server.reconciler import ModelView, ReplicaView, ServerView, plan
from admin_server.settings import AdminSettings

NOW = 1000.0
S = AdminSettings(heartbeat_interval_s=1.0, retry_backoff_s=1.0, retry_backoff_max_s=8.0)
GiB = 1 << 30


def server(addr: str, mem: int = 16 * GiB, paths=("m.a",), chip="cpu", tags=(), age=0.0) -> ServerView:  # type: ignore[no-untyped-def]
    return ServerView(addr, chip, mem, list(tags), list(paths), NOW - age)


def model(mid: str, replicas: int = 1, ram: int = GiB, gen: int = 1, path: str = "m.a", state="ACTIVE",
          failures=0, retry_after=None, **ov) -> ModelView:  # type: ignore[no-untyped-def]
    return ModelView(mid, path, "ckpt", gen, replicas, {"ram": ram, **ov}, state, None, failures, retry_after)


_ids = iter(range(1, 10**6))


def rep(mid: str, srv: str, gen: int = 1, wanted="LOADED", observed="LOADED", retry_after=None,
        error=None) -> ReplicaView:  # type: ignore[no-untyped-def]
    return ReplicaView(next(_ids), mid, srv, gen, wanted, observed, error, retry_after, None)


def added(p) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return sorted((a["model_id"], a["server_address"]) for a in p.add)


def test_places_replicas_on_distinct_servers_that_can_serve_and_fit() -> None:
    servers = [server("s1", paths=("m.b",)), server("s2", mem=GiB // 2), server("s3"), server("s4")]
    p = plan(NOW, S, servers, [model("/sax/c/x", replicas=3)], [])
    assert added(p) == [("/sax/c/x", "s3"), ("/sax/c/x", "s4")]  # s1 cannot serve, s2 too small


def test_several_models_share_a_server_when_memory_allows() -> None:
    p = plan(NOW, S, [server("s1", mem=3 * GiB)],
             [model("/sax/c/a"), model("/sax/c/b"), model("/sax/c/c"), model("/sax/c/d")], [])
    assert len(p.add) == 3  # the fourth does not fit


def test_chip_and_constraints() -> None:
    servers = [server("gpu", chip="h100", tags=("fast",)), server("cpu")]
    p = plan(NOW, S, servers, [model("/sax/c/a", chip="h100"), model("/sax/c/b", constraints=["fast"]),
                               model("/sax/c/c", constraints=["slow"])], [])
    assert added(p) == [("/sax/c/a", "gpu"), ("/sax/c/b", "gpu")]


def test_dead_servers_lose_replicas_which_move() -> None:
    servers = [server("s1", age=10), server("s2")]
    p = plan(NOW, S, servers, [model("/sax/c/a")], [rep("/sax/c/a", "s1")])
    assert p.dead_servers == ["s1"]
    assert added(p) == [("/sax/c/a", "s2")]


def test_failed_load_backs_off_and_avoids_the_server() -> None:
    servers = [server("s1"), server("s2")]
    r = rep("/sax/c/a", "s1", observed="FAILED", error="boom")
    p = plan(NOW, S, servers, [model("/sax/c/a")], [r])
    assert p.failed == [(r.id, NOW + 4.0)]
    fails, retry_at, err = p.model_failures["/sax/c/a"]
    assert (fails, retry_at) == (1, NOW + 1.0) and "s1: boom" in err
    assert p.add == []  # backs off first
    # After the back-off: placed elsewhere while the failed server is still blocked.
    later = NOW + 0.5
    m = model("/sax/c/a", failures=1, retry_after=NOW + 0.4)
    tomb = rep("/sax/c/a", "s1", wanted="UNLOADED", observed="NONE", retry_after=later + 5)
    p2 = plan(later, S, servers, [m], [tomb])
    assert added(p2) == [("/sax/c/a", "s2")] and p2.delete == []
    # Exponential back-off, capped.
    m3 = model("/sax/c/a", failures=5)
    p3 = plan(NOW, S, servers, [m3], [rep("/sax/c/a", "s2", observed="FAILED")])
    assert p3.model_failures["/sax/c/a"][1] == NOW + 8.0


def test_rolling_update_loads_new_before_unloading_old() -> None:
    servers = [server("s1"), server("s2"), server("s3")]
    old = [rep("/sax/c/a", "s1", gen=1), rep("/sax/c/a", "s2", gen=1)]
    m = model("/sax/c/a", replicas=2, gen=2)
    p = plan(NOW, S, servers, [m], old)
    assert p.unload == []  # nothing new is ready yet
    assert len(p.add) == 2 and ("/sax/c/a", "s3") in added(p)  # the free server first
    assert {a["generation"] for a in p.add} == {2}
    new = [rep("/sax/c/a", "s3", gen=2), rep("/sax/c/a", "s1", gen=2, observed="LOADING")]
    p = plan(NOW, S, servers, [m], old + new)
    assert len(p.unload) == 1 and p.add == []  # one new ready -> one old goes
    new[1].observed = "LOADED"
    p = plan(NOW, S, servers, [m], old + new)
    assert sorted(p.unload) == sorted(r.id for r in old)


def test_replicas_only_update_reloads_nothing() -> None:
    servers = [server("s1"), server("s2"), server("s3")]
    current = [rep("/sax/c/a", "s1"), rep("/sax/c/a", "s2")]
    up = plan(NOW, S, servers, [model("/sax/c/a", replicas=3)], current)
    assert added(up) == [("/sax/c/a", "s3")] and up.unload == []
    down = plan(NOW, S, servers, [model("/sax/c/a", replicas=1)], current)
    assert len(down.unload) == 1 and down.add == []


def test_unpublish_unloads_then_drops() -> None:
    r = rep("/sax/c/a", "s1")
    p = plan(NOW, S, [server("s1")], [model("/sax/c/a", state="UNPUBLISHING")], [r])
    assert p.unload == [r.id] and p.drop_models == []
    gone = rep("/sax/c/a", "s1", wanted="UNLOADED", observed="NONE")
    p = plan(NOW, S, [server("s1")], [model("/sax/c/a", state="UNPUBLISHING")], [gone])
    assert p.delete == [gone.id] and p.drop_models == ["/sax/c/a"]


def test_memory_of_unloading_replicas_still_counts() -> None:
    servers = [server("s1", mem=2 * GiB)]
    leaving = rep("/sax/c/a", "s1", wanted="UNLOADED", observed="UNLOADING")
    p = plan(NOW, S, servers, [model("/sax/c/a", replicas=0, ram=2 * GiB),
                               model("/sax/c/b", ram=GiB)], [leaving])
    assert p.add == []
