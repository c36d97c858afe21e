"""The leader's autoscaling, eviction and placement notes (the pure planning step), case by case."""
from __future__ import annotations

from dataclasses import replace

from admin_server.reconciler import ModelView, ReplicaView, ServerView, plan
from admin_server.settings import AdminSettings

NOW = 10_000.0
S = AdminSettings(heartbeat_interval_s=1.0, scale_up_waiting=1.0, scale_up_window_s=5.0, scale_down_load=1.0)
GiB = 1 << 30
_ids = iter(range(1, 10**6))


def server(addr: str, mem: int = 2 * GiB, paths=("m.a",), chip="cpu", tags=()) -> ServerView:  # type: ignore[no-untyped-def]
    return ServerView(addr, chip, mem, list(tags), list(paths), NOW + 1000)  # alive throughout


def model(mid: str, target: int = 1, lo: int = 0, hi: int = 3, idle: float = 60.0, ram: int = GiB,
          path: str = "m.a", **kw) -> ModelView:  # type: ignore[no-untyped-def]
    ov = {"ram": ram, **kw.pop("overrides", {})}
    return ModelView(mid, path, None, 1, target, ov, "ACTIVE", None, 0, None, lo, hi, idle, **kw)


def rep(mid: str, srv: str, observed="LOADED", wanted="LOADED", running=0, waiting=0,
        used: float | None = None, created: float = NOW - 1000) -> ReplicaView:  # type: ignore[no-untyped-def]
    return ReplicaView(next(_ids), mid, srv, 1, wanted, observed, None, None, GiB, running, waiting, used, created)


def added(p) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return sorted((a["model_id"], a["server_address"]) for a in p.add)


def test_queue_above_target_for_the_window_adds_one_replica() -> None:
    servers = [server("s1"), server("s2"), server("s3")]
    m = model("/sax/c/x", target=1, lo=1, hi=3)
    busy = [rep("/sax/c/x", "s1", running=4, waiting=20, used=NOW)]
    first = plan(NOW, S, servers, [m], busy)
    assert first.add == [] and first.scale["/sax/c/x"].busy_since == NOW  # the window starts
    assert first.next_due == NOW + S.scale_up_window_s
    m2 = replace(model("/sax/c/x", target=1, lo=1, hi=3), busy_since=NOW)
    later = plan(NOW + 5, S, servers, [m2], busy)
    scaled = later.scale["/sax/c/x"]
    assert scaled.target == 2 and "20 requests queued on 1 ready replicas" in scaled.reason
    assert len(later.add) == 1 and later.add[0]["server_address"] != "s1"


def test_no_scale_up_past_max_and_a_loading_replica_counts_as_capacity() -> None:
    servers = [server("s1"), server("s2"), server("s3")]
    at_max = model("/sax/c/x", target=2, lo=1, hi=2, busy_since=NOW - 100)
    reps = [rep("/sax/c/x", "s1", waiting=9, used=NOW), rep("/sax/c/x", "s2", waiting=9, used=NOW)]
    p = plan(NOW, S, servers, [at_max], reps)
    assert p.add == [] and "/sax/c/x" not in p.scale  # at its maximum: nothing moves
    # 10 queued on one ready replica with a second loading: 5 per wanted replica, still busy.
    loading = model("/sax/c/x", target=2, lo=1, hi=3, busy_since=NOW - 100)
    reps = [rep("/sax/c/x", "s1", waiting=10, used=NOW), rep("/sax/c/x", "s2", observed="LOADING")]
    p = plan(NOW, S, servers, [loading], reps)
    assert p.scale["/sax/c/x"].target == 3 and added(p) == [("/sax/c/x", "s3")]
    # 3 queued over two wanted replicas (1.5 each) is over the target too; 2 is not.
    reps[0].waiting = 2
    assert plan(NOW, S, servers, [model("/sax/c/x", target=2, lo=1, hi=3, busy_since=NOW - 100)],
                reps).add == []


def test_low_load_for_idle_seconds_removes_one_replica_then_idle_goes_to_zero() -> None:
    servers = [server("s1"), server("s2")]
    reps = [rep("/sax/c/x", "s1", running=1, used=NOW), rep("/sax/c/x", "s2", used=NOW - 500)]
    calm = plan(NOW, S, servers, [model("/sax/c/x", target=2, lo=0, hi=3, idle=60)], reps)
    assert calm.scale["/sax/c/x"].calm_since == NOW and calm.unload == []
    down = plan(NOW + 60, S, servers, [model("/sax/c/x", target=2, lo=0, hi=3, idle=60, calm_since=NOW)], reps)
    assert down.scale["/sax/c/x"].target == 1 and "fits on 1 replicas" in down.scale["/sax/c/x"].reason
    assert down.unload == [reps[1].id]  # the idle one (least loaded, least recently used) drains
    one = [reps[0]]
    one[0].running, one[0].last_used_at = 0, NOW + 60
    m = model("/sax/c/x", target=1, lo=0, hi=3, idle=60, calm_since=NOW + 61, scaled_at=NOW + 60)
    assert "/sax/c/x" not in plan(NOW + 100, S, servers, [m], one).scale  # used 40 s ago: stays
    zero = plan(NOW + 121, S, servers, [m], one)
    assert zero.scale["/sax/c/x"].target == 0 and "no request for 60s" in zero.scale["/sax/c/x"].reason
    assert zero.unload == [one[0].id]


def test_min_replicas_is_kept_however_idle() -> None:
    reps = [rep("/sax/c/x", "s1", used=NOW - 10_000)]
    m = model("/sax/c/x", target=1, lo=1, hi=3, idle=60, calm_since=NOW - 10_000)
    p = plan(NOW, S, [server("s1")], [m], reps)
    assert p.unload == [] and (p.scale.get("/sax/c/x") is None or p.scale["/sax/c/x"].target == 1)


def test_a_call_for_an_idle_model_loads_it() -> None:
    m = model("/sax/c/x", target=0, lo=0, hi=2, scaled_at=NOW - 100, demand_at=NOW - 1)
    p = plan(NOW, S, [server("s1")], [m], [])
    assert p.scale["/sax/c/x"].target == 1 and "waiting" in p.scale["/sax/c/x"].reason
    assert added(p) == [("/sax/c/x", "s1")]
    # A demand older than the last scale-down does not count.
    stale = model("/sax/c/x", target=0, lo=0, hi=2, scaled_at=NOW - 1, demand_at=NOW - 100)
    assert plan(NOW, S, [server("s1")], [stale], []).add == []


def test_cold_model_evicts_the_least_recently_used_replica_above_its_minimum() -> None:
    servers = [server("s1"), server("s2")]  # 2 GiB each: two 1 GiB models per server
    models = [model(f"/sax/c/m{i}", target=1, lo=0) for i in range(4)]
    models.append(model("/sax/c/kept", target=1, lo=1))
    reps = [rep("/sax/c/m0", "s1", used=NOW - 50), rep("/sax/c/kept", "s1", used=NOW - 900),
            rep("/sax/c/m2", "s2", used=NOW - 10), rep("/sax/c/m3", "s2", used=NOW - 20)]
    models = [m for m in models if m.model_id != "/sax/c/m1"]
    cold = model("/sax/c/new", target=0, lo=0, scaled_at=NOW - 100, demand_at=NOW - 1)
    p = plan(NOW, S, servers, [*models, cold], reps)
    # "kept" is the least recently used but at its minimum; m0 (s1) is next.
    assert p.add == [] and p.unload == [reps[0].id]
    assert p.scale["/sax/c/m0"].target == 0 and "evicted from s1" in p.scale["/sax/c/m0"].reason
    assert "evicting /sax/c/m0" in p.notes["/sax/c/new"]
    # While m0 unloads (its memory still counted), nothing more is evicted and nothing placed.
    reps[0].wanted, reps[0].observed = "UNLOADED", "UNLOADING"
    models[0] = model("/sax/c/m0", target=0, lo=0)
    cold = replace(cold, requested=1, scaled_at=NOW)
    p = plan(NOW + 1, S, servers, [*models, cold], reps)
    assert p.add == [] and p.unload == [] and "waiting for memory being freed on s1" in p.notes["/sax/c/new"]
    # Once the server reports it gone, the new model goes there.
    reps[0].observed = "NONE"
    p = plan(NOW + 2, S, servers, [*models, cold], reps)
    assert added(p) == [("/sax/c/new", "s1")]


def test_memory_is_never_overcommitted_counting_loading_and_unloading() -> None:
    servers = [server("s1")]
    reps = [rep("/sax/c/a", "s1", observed="LOADING"), rep("/sax/c/b", "s1", wanted="UNLOADED", observed="UNLOADING")]
    models = [model("/sax/c/a"), model("/sax/c/b", target=0), model("/sax/c/c", target=1, lo=1)]
    p = plan(NOW, S, servers, models, reps)
    assert p.add == []
    assert p.notes["/sax/c/c"].startswith("not enough free memory")


def test_why_a_wanted_replica_is_not_placed() -> None:
    one = [server("s1")]
    fixed = model("/sax/c/x", target=2, lo=2, hi=2)
    p = plan(NOW, S, one, [fixed], [rep("/sax/c/x", "s1")])
    assert p.notes["/sax/c/x"] == "replicas go to distinct servers and only 1 live server can serve m.a"
    assert plan(NOW, S, one, [model("/sax/c/y", path="m.b")], []).notes["/sax/c/y"] == \
        "no live server can serve model_path m.b"
    chip = model("/sax/c/z", overrides={"chip": "tpu"})
    assert "chip tpu" in plan(NOW, S, one, [chip], []).notes["/sax/c/z"]
    big = model("/sax/c/big", ram=8 * GiB)
    assert "needs 8589934592 bytes" in plan(NOW, S, one, [big], []).notes["/sax/c/big"]
    assert plan(NOW, S, [], [model("/sax/c/x")], []).notes["/sax/c/x"] == "no live model server in the cell"
    # The note clears once placed (and is not rewritten while unchanged).
    placed = replace(model("/sax/c/x"), placement_note="old")
    assert plan(NOW, S, one, [placed], []).notes == {"/sax/c/x": None}


def test_scaling_up_again_skips_a_server_whose_replica_still_drains() -> None:
    servers = [server("s1"), server("s2")]
    reps = [rep("/sax/c/x", "s1", waiting=9, used=NOW), rep("/sax/c/x", "s2", wanted="UNLOADED")]
    m = model("/sax/c/x", target=1, lo=1, hi=3, busy_since=NOW - 10)
    p = plan(NOW, S, servers, [m], reps)
    assert p.scale["/sax/c/x"].target == 2 and p.add == []  # s2 still holds its draining replica
    assert "distinct servers" in p.notes["/sax/c/x"]
