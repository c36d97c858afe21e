"""LoRA adapters (`lm.lora`, override `base`) in the reconciler's plan: only beside a LOADED
replica of their base, counting their memory, and moving with it."""
from __future__ import annotations

from tests.admin.test_reconciler_plan import GiB, NOW, S, added, model, plan, rep, server

PATHS = ("m.a", "lm.lora")
BASE = "/sax/c/base"


def adapter(mid: str, replicas: int = 1, ram: int = GiB // 4):  # type: ignore[no-untyped-def]
    return model(mid, replicas, ram, path="lm.lora", base=BASE)


def test_adapters_wait_for_a_loaded_base() -> None:
    servers = [server("s1", paths=PATHS), server("s2", paths=PATHS)]
    p = plan(NOW, S, servers, [model(BASE), adapter("/sax/c/ada")], [])
    assert added(p) == [(BASE, "s1")]
    assert "waiting for a LOADED replica of its base" in p.notes["/sax/c/ada"]
    # the base still loading: nothing either
    p = plan(NOW, S, servers, [model(BASE), adapter("/sax/c/ada")], [rep(BASE, "s2", observed="NONE")])
    assert added(p) == []


def test_adapters_go_only_beside_the_base() -> None:
    servers = [server("s1", paths=PATHS, mem=32 * GiB), server("s2", paths=PATHS)]
    p = plan(NOW, S, servers, [model(BASE), adapter("/sax/c/ada", replicas=2), adapter("/sax/c/bob")],
             [rep(BASE, "s2")])
    # s1 has more free memory but no base: ada gets the one server with the base now, and the
    # base a second replica (on s1) because ada wants two
    assert sorted(added(p)) == [("/sax/c/ada", "s2"), (BASE, "s1"), ("/sax/c/bob", "s2")]


def test_adapter_memory_counts() -> None:
    servers = [server("s1", paths=PATHS, mem=GiB + GiB // 2)]
    p = plan(NOW, S, servers, [model(BASE), adapter("/sax/c/ada"), adapter("/sax/c/bob"),
                               adapter("/sax/c/cy")], [rep(BASE, "s1")])
    assert len(p.add) == 2  # half a GiB left: two adapters of a quarter


def test_adapters_move_with_their_base() -> None:
    """The base's server died: the base goes elsewhere; once it is LOADED there, so do its adapters."""
    servers = [server("s1", paths=PATHS, age=10), server("s2", paths=PATHS)]
    models = [model(BASE), adapter("/sax/c/ada")]
    p = plan(NOW, S, servers, models, [rep(BASE, "s1"), rep("/sax/c/ada", "s1")])
    assert p.dead_servers == ["s1"] and added(p) == [(BASE, "s2")]
    p = plan(NOW, S, servers[1:], models, [rep(BASE, "s2")])
    assert added(p) == [("/sax/c/ada", "s2")]


def test_an_adapter_left_without_its_base_unloads() -> None:
    servers = [server("s1", paths=PATHS), server("s2", paths=PATHS)]
    stray = rep("/sax/c/ada", "s1")
    p = plan(NOW, S, servers, [model(BASE), adapter("/sax/c/ada")], [stray, rep(BASE, "s2")])
    assert stray.id in p.unload
    assert added(p) == [("/sax/c/ada", "s2")]
