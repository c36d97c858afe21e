"""What LoRA adapters ask of their base, through a whole cell (an admin, two model servers and a
frontend: real processes, a random-weight Llama base and two PEFT adapters from
tests/lora_models.py).

* An adapter wanting two replicas gives its one-replica base a second one; `/listcell` and the
  status page say the base's own target, its effective count and that the adapter drives it.
* A rolling update of the base (a new checkpoint) under adapter and base traffic fails no
  request: the adapters reload beside the new base before the old replicas go, and still give
  the same (adapted) text.
* A base idle past its idle_seconds keeps the replica an adapter wants (and, since adapter
  traffic runs on the base's engine, while the adapter has traffic); once the adapter idles
  out too both go, and a call to the adapter brings both back.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests import lora_models as LM
from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, publish_and_wait, wait_until

pytest.importorskip("peft")
pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BASE, ADA, BOB = "/sax/test/base", "/sax/test/ada", "/sax/test/bob"
OVERRIDES = {"num_slots": 4, "max_seq_len": 64, "prefill_buckets": [16, 64], "dtype": "float32",
             "max_queue": 32, "max_loras": 2, "max_lora_rank": 8}
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return LM.build(tmp_path_factory.mktemp("lora_base_models"))


@pytest.fixture(scope="module")
def cell(dirs, tmp_path_factory) -> Iterator[tuple[AdminProcess, list[ModelServerProcess], FrontendProcess]]:
    tmp = tmp_path_factory.mktemp("lora_base_cell")
    admin = AdminProcess(tmp, root=str(tmp / "root")).start()
    servers = [ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}") for _ in range(2)]
    frontend = None
    try:
        for ms in servers:
            ms.start()
        frontend = FrontendProcess(tmp, admin.port, "--workers", "1").start()
        publish_and_wait(admin.url, BASE, model_path="lm.llama", checkpoint=str(dirs[0]),
                         overrides=OVERRIDES, timeout=600)
        yield admin, servers, frontend
    finally:
        if frontend is not None:
            frontend.stop()
        for ms in servers:
            ms.stop()
        admin.stop()


def _detail(admin: AdminProcess, model_id: str) -> dict:
    return requests.get(f"{admin.url}/models{model_id}", timeout=10).json()


def _loaded_on(admin: AdminProcess, model_id: str) -> set[str]:
    return {r["address"] for r in _detail(admin, model_id)["replicas"]
            if r["status"] == "LOADED" and r["wanted"] == "LOADED"}


def _complete(frontend: FrontendProcess, model: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{frontend.url}/v1/completions", timeout=timeout, json={
        "model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})


def _publish_adapter(admin: AdminProcess, model_id: str, path: Path, **scaling) -> None:  # type: ignore[no-untyped-def]
    r = requests.post(f"{admin.url}/models", timeout=10, json={
        "model_id": model_id, "model_path": "lm.lora", "checkpoint": str(path), "overrides": {"base": BASE},
        **({"replicas": 1} | scaling)})
    assert r.status_code == 201, r.text


class Traffic:
    """Client threads sending completions to `models` until stopped; every non-200 is kept."""

    def __init__(self, frontend: FrontendProcess, models: list[str]) -> None:
        self.frontend, self.models = frontend, models
        self.failures: list[str] = []
        self.ok = {m: 0 for m in models}
        self.texts: dict[str, set[str]] = {m: set() for m in models}
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(m,), daemon=True) for m in models]

    def _run(self, model: str) -> None:
        while not self._done.is_set():
            try:
                r = _complete(self.frontend, model, timeout=60)
            except requests.RequestException as e:
                self.failures.append(f"{model}: {e!r}")
                continue
            if r.status_code != 200:
                self.failures.append(f"{model}: {r.status_code} {r.text[:300]}")
            else:
                self.ok[model] += 1
                self.texts[model].add(r.json()["choices"][0]["text"])

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=120)


def test_an_adapter_wanting_two_replicas_gives_its_base_a_second(cell, dirs):
    admin, servers, frontend = cell
    assert len(_loaded_on(admin, BASE)) == 1
    _publish_adapter(admin, ADA, dirs[1]["ada"], replicas=2)
    _publish_adapter(admin, BOB, dirs[1]["bob"])
    every = {ms.address for ms in servers}
    wait_until(lambda: _loaded_on(admin, BASE) == every and _loaded_on(admin, ADA) == every
               and _loaded_on(admin, BOB), timeout=300, interval=0.3, what="base and ada on both servers")
    d = _detail(admin, BASE)
    assert (d["requested_replicas"], d["target_replicas"], d["effective_replicas"]) == (1, 1, 2)
    assert d["adapters"] == {ADA: 2, BOB: 1} and d["state"] == "READY"
    assert "2 replicas for its LoRA adapters (its own target is 1): /sax/test/ada (2)" in d["replicas_reason"]
    r = requests.post(f"{frontend.url}/listcell", timeout=10, json={"model": BASE})
    assert r.status_code == 200, r.text
    listed = r.json()
    assert (listed["target_replicas"], listed["effective_replicas"], listed["active_replicas"]) == (1, 2, 2)
    assert ADA in listed["replicas_reason"] and listed["adapters"][ADA] == 2
    page = requests.get(f"{admin.url}/model{BASE}", timeout=10, headers={"Accept": "text/html"}).text
    assert "2 active / 2 wanted" in page and "2 replicas for its LoRA adapters" in page
    cell_page = requests.get(f"{admin.url}/", timeout=10, headers={"Accept": "text/html"}).text
    assert "1 own, rest for adapters" in cell_page
    for model in (BASE, ADA, BOB):
        assert _complete(frontend, model).status_code == 200


def test_a_rolling_update_of_the_base_fails_no_adapter_request(cell, dirs, tmp_path):
    admin, servers, frontend = cell
    before = {m: _complete(frontend, m).json()["choices"][0]["text"] for m in (BASE, ADA, BOB)}
    assert len(set(before.values())) == 3  # the adapters change the text
    v2 = tmp_path / "base-v2"
    shutil.copytree(dirs[0], v2)  # the same weights at a new checkpoint: the text must not change
    gens = {m: _detail(admin, m)["generation"] for m in (BASE, ADA, BOB)}
    with Traffic(frontend, [ADA, BOB, ADA, BASE]) as traffic:
        wait_until(lambda: min(traffic.ok.values()) >= 2, timeout=120, what="traffic running")
        r = requests.patch(f"{admin.url}/models{BASE}", timeout=10, json={"checkpoint": str(v2)})
        assert r.status_code == 200, r.text

        def rolled() -> bool:  # every replica (base 2, ada 2, bob 1) at its model's new generation
            for m, count in ((BASE, 2), (ADA, 2), (BOB, 1)):
                d = _detail(admin, m)
                reps = d["replicas"]
                if d["generation"] != gens[m] + 1 or len(reps) != count or any(
                        r["generation"] != d["generation"] or r["status"] != "LOADED" for r in reps):
                    return False
            return True
        wait_until(rolled, timeout=600, interval=0.3, what="base and adapters at their new generation")
        done = dict(traffic.ok)
        wait_until(lambda: all(traffic.ok[m] >= done[m] + 2 for m in (ADA, BOB, BASE)), timeout=120,
                   what="answers after the update")
    assert not traffic.failures, traffic.failures[:5]
    assert {r["checkpoint"] for r in _detail(admin, BASE)["replicas"]} == {str(v2)}
    for m in (BASE, ADA, BOB):
        assert traffic.texts[m] == {before[m]}, m
    for ms in servers:  # each server holds only the new generations
        held = [(x["model_id"], x["generation"]) for x in requests.get(f"{ms.url}/models", timeout=10).json()["models"]]
        assert sorted(held) == sorted((m, gens[m] + 1) for m in (BASE, ADA, BOB) if ms.address in _loaded_on(admin, m))


def test_an_idle_base_stays_for_a_wanted_adapter_and_both_load_on_demand(cell):
    admin, servers, frontend = cell
    assert requests.delete(f"{admin.url}/models{BOB}", timeout=10).status_code == 200
    r = requests.patch(f"{admin.url}/models{ADA}", timeout=10, json={"replicas": 1, "min_replicas": 1,
                                                                     "max_replicas": 1})
    assert r.status_code == 200, r.text
    r = requests.patch(f"{admin.url}/models{BASE}", timeout=10, json={"replicas": 1, "min_replicas": 0,
                                                                      "max_replicas": 1, "idle_seconds": 2})
    assert r.status_code == 200, r.text
    # Nobody calls the base: its own target drops to zero; its replica under ada (wanted) stays.
    d = wait_until(lambda: (lambda d: d if d["target_replicas"] == 0 and len(d["replicas"]) == 1
                            and d["effective_replicas"] == 1 else None)(_detail(admin, BASE)),
                   timeout=180, interval=0.3, what="the base idle by itself, one replica left")
    assert "1 replica for its LoRA adapters (its own target is 0)" in d["replicas_reason"]
    assert d["state"] == "READY" and _loaded_on(admin, ADA) == _loaded_on(admin, BASE)
    # ada's traffic runs on the base's engine: the base stays while it lasts, failing nothing
    r = requests.patch(f"{admin.url}/models{ADA}", timeout=10, json={"min_replicas": 0, "idle_seconds": 4})
    assert r.status_code == 200, r.text
    with Traffic(frontend, [ADA, ADA]) as traffic:
        wait_until(lambda: traffic.ok[ADA] >= 4, timeout=60, what="ada answering")
        seen = traffic.ok[ADA]
        time.sleep(6)  # longer than both idle_seconds
        assert traffic.ok[ADA] > seen and len(_loaded_on(admin, BASE)) == 1 and _loaded_on(admin, ADA)
    assert not traffic.failures, traffic.failures[:5]
    # No traffic: ada idles out, then its base goes too.
    wait_until(lambda: (lambda b, a: not b["replicas"] and not a["replicas"] and b["state"] == "IDLE")(
        _detail(admin, BASE), _detail(admin, ADA)), timeout=180, interval=0.5, what="base and ada unloaded")
    r = _complete(frontend, ADA, timeout=600)  # load on demand: the base first, then the adapter
    assert r.status_code == 200, r.text
    assert _loaded_on(admin, BASE) and _loaded_on(admin, ADA)
