"""What LoRA adapters ask of their base in the leader's plan: more replicas when an adapter wants
more, base replicas holding wanted adapters kept through scale-down, scale-to-zero and
eviction, and a rolling update of the base that adapters follow before the old base goes."""
from __future__ import annotations

from dataclasses import replace

from tests.admin.test_scaling_plan import GiB, NOW, S, added, model, rep, server

PATHS = ("m.a", "lm.lora")
BASE, ADA, BOB = "/sax/c/base", "/sax/c/ada", "/sax/c/bob"


def base(target: int = 1, lo: int = 0, **kw):  # type: ignore[no-untyped-def]
    return model(BASE, target=target, lo=lo, **kw)


def adapter(mid: str, target: int = 1, lo: int = 0, **kw):  # type: ignore[no-untyped-def]
    return model(mid, target=target, lo=lo, ram=GiB // 8, path="lm.lora", overrides={"base": BASE}, **kw)


def servers(n: int = 3):  # type: ignore[no-untyped-def]
    return [server(f"s{i}", mem=4 * GiB, paths=PATHS) for i in range(1, n + 1)]


def test_an_adapter_wanting_more_replicas_adds_base_replicas_with_a_note() -> None:
    models = [base(1), adapter(ADA, target=3, hi=3), adapter(BOB)]
    p = plan_(models, [rep(BASE, "s1", used=NOW), rep(ADA, "s1", used=NOW), rep(BOB, "s1", used=NOW)])
    assert added(p) == [(BASE, "s2"), (BASE, "s3")]
    assert p.notes[BASE] == ("3 replicas for its LoRA adapters (its own target is 1): "
                             "/sax/c/ada (3), /sax/c/bob (1)")
    assert p.scale[BASE].target == 1  # its own target stays: the adapters' need is not stored as one
    assert p.notes[ADA] == "1 of 3 placed: waiting for more LOADED replicas of its base /sax/c/base"
    # once the base is LOADED there, the adapter follows onto both new servers
    reps = [rep(BASE, s, used=NOW) for s in ("s1", "s2", "s3")] + [rep(ADA, "s1", used=NOW), rep(BOB, "s1", used=NOW)]
    p = plan_(models, reps)
    assert added(p) == [(ADA, "s2"), (ADA, "s3")] and p.unload == []


def test_scale_down_keeps_the_base_replicas_that_hold_adapters() -> None:
    """The base's own load fits on one replica of three; its adapters sit on s2 and s3."""
    models = [base(3, lo=1, calm_since=NOW - 100), adapter(ADA), adapter(BOB)]
    reps = [rep(BASE, "s1", used=NOW - 1000), rep(BASE, "s2", used=NOW), rep(BASE, "s3", used=NOW),
            rep(ADA, "s2", used=NOW, running=2), rep(BOB, "s3", used=NOW, running=1)]
    p = plan_(models, reps)
    assert p.scale[BASE].target == 2
    # the least recently used replica would be s1 anyway; s2, s3 stay for the adapters
    assert p.unload == [reps[0].id]
    models[0] = base(2, lo=1, calm_since=NOW - 100)
    p = plan_(models, [r for r in reps if r.server != "s1"])
    assert p.scale[BASE].target == 1
    assert p.unload == []  # both remaining replicas hold adapters: none is surplus
    assert "2 replicas for its LoRA adapters (its own target is 1)" in p.notes[BASE]


def test_scale_down_picks_a_replica_without_adapters_even_when_busier() -> None:
    models = [base(2, lo=1), adapter(ADA)]
    models[0] = replace(models[0], requested=1)  # updated to one replica
    reps = [rep(BASE, "s1", used=NOW - 5000), rep(BASE, "s2", used=NOW, running=3), rep(ADA, "s1", used=NOW)]
    p = plan_(models, reps)
    assert p.unload == [reps[1].id]  # s1 is idler and older but holds ada


def test_base_idle_to_zero_stays_while_its_adapter_is_wanted_then_goes_with_it() -> None:
    quiet = dict(lo=0, idle=60.0, calm_since=NOW - 100, scaled_at=NOW - 5000)
    models = [base(1, **quiet), adapter(ADA, **quiet)]
    reps = [rep(BASE, "s1", used=NOW - 5000), rep(ADA, "s1", used=NOW - 5)]  # the adapter has traffic
    p = plan_(models, reps)
    assert p.scale[BASE].target == 0 and ADA not in p.scale
    assert p.unload == []  # the base replica stays: ada on it is wanted (and used)
    assert "1 replica for its LoRA adapters (its own target is 0)" in p.notes[BASE]
    # the adapter idles out too: it unloads first, the base after it
    models = [base(0, **quiet), adapter(ADA, **quiet)]
    reps[1].last_used_at = NOW - 5000
    p = plan_(models, reps)
    assert p.scale[ADA].target == 0 and p.unload == [reps[1].id]
    reps[1].wanted = "UNLOADED"
    models[1] = adapter(ADA, target=0, lo=0)
    p = plan_(models, reps)
    assert p.unload == [reps[0].id]


def test_a_call_to_an_idle_adapter_brings_its_idle_base_back() -> None:
    models = [base(0, lo=0, scaled_at=NOW - 100), adapter(ADA, target=0, lo=0, scaled_at=NOW - 100, demand_at=NOW)]
    p = plan_(models, [])
    assert p.scale[ADA].target == 1 and len(p.add) == 1 and p.add[0]["model_id"] == BASE


def test_eviction_leaves_base_replicas_that_hold_adapters() -> None:
    """A cold model needs 1 GiB: the only 1 GiB replica to take is the base's (LRU), but ada
    is on it; the other model, used more recently, goes instead."""
    srv = [server("s1", mem=2 * GiB + GiB // 8, paths=PATHS)]
    models = [base(1, lo=0), adapter(ADA), model("/sax/c/other", target=1, lo=0),
              model("/sax/c/cold", target=0, lo=0, scaled_at=NOW - 100, demand_at=NOW)]
    reps = [rep(BASE, "s1", used=NOW - 900), rep(ADA, "s1", used=NOW - 5), rep("/sax/c/other", "s1", used=NOW - 10)]
    p = plan_(models, reps, srv)
    assert reps[0].id not in p.unload and reps[2].id in p.unload


def test_rolling_update_of_the_base_keeps_adapters_served_throughout() -> None:
    """The base (and so its adapter) at generation 2: the new base loads beside the old one, the
    adapter's new replica loads beside the new base, and only then do the old ones go."""
    srv = servers(1)
    b2, a2 = replace(base(1, lo=1), generation=2), replace(adapter(ADA, lo=1), generation=2)
    old_b, old_a = rep(BASE, "s1", used=NOW), rep(ADA, "s1", used=NOW)
    p = plan_([b2, a2], [old_b, old_a], srv)
    assert added(p) == [(BASE, "s1")] and p.unload == []
    assert "waiting for a LOADED replica of its base" in p.notes[ADA]
    new_b = replace(rep(BASE, "s1", used=NOW), generation=2)
    p = plan_([b2, a2], [old_b, old_a, new_b], srv)
    assert added(p) == [(ADA, "s1")] and p.unload == []  # the old base stays for the old adapter
    new_a = replace(rep(ADA, "s1", observed="LOADING"), generation=2)
    p = plan_([b2, a2], [old_b, old_a, new_b, new_a], srv)
    assert p.add == [] and p.unload == []
    new_a.observed = "LOADED"
    p = plan_([b2, a2], [old_b, old_a, new_b, new_a], srv)
    assert p.unload == [old_a.id]
    old_a.wanted = "UNLOADED"
    p = plan_([b2, a2], [old_b, old_a, new_b, new_a], srv)
    assert p.unload == [old_b.id]


def test_rolling_update_onto_other_servers_moves_the_adapter_before_the_old_base_goes() -> None:
    srv = [server("s1", mem=GiB + GiB // 4, paths=PATHS), server("s2", mem=4 * GiB, paths=PATHS)]
    b2, a2 = replace(base(1, lo=1), generation=2), replace(adapter(ADA, lo=1), generation=2)
    old_b, old_a = rep(BASE, "s1", used=NOW), rep(ADA, "s1", used=NOW)
    p = plan_([b2, a2], [old_b, old_a], srv)
    assert added(p) == [(BASE, "s2")]  # s1 has no room for a second base
    new_b = replace(rep(BASE, "s2"), generation=2)
    p = plan_([b2, a2], [old_b, old_a, new_b], srv)
    assert added(p) == [(ADA, "s2")] and p.unload == []  # ada's only LOADED replica is still on s1
    new_a = replace(rep(ADA, "s2"), generation=2)
    p = plan_([b2, a2], [old_b, old_a, new_b, new_a], srv)
    assert p.unload == [old_a.id]
    old_a.wanted = "UNLOADED"
    p = plan_([b2, a2], [old_b, old_a, new_b, new_a], srv)
    assert p.unload == [old_b.id]


def plan_(models, reps, srv=None):  # type: ignore[no-untyped-def]
    from admin_server.reconciler import plan

    return plan(NOW, S, srv or servers(), models, reps)
