"""LoRA adapters through a whole cell: admin, model servers and a frontend (real processes,
real HTTP, the official openai client).

A random-weight Llama base is published with `max_loras`; two PEFT adapters (tests/
lora_models.py: ranks 4 and 8, every linear projection, non-zero weights) are published as
`lm.lora` models over it. Twelve concurrent greedy completions, mixed over the base and both
adapters, must be transformers + PEFT's text with echoed prompt logprobs within 1e-3; every data
route takes an adapter's id; /v1/models lists the adapters with their parent; unpublishing the
base is refused while adapters need it; an adapter published on a running base is ready in
under 5 s with none of the base's concurrent requests failing; with two servers, adapters land
beside the base, and kill -9 of that server moves base and adapters together.
"""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from tests import lora_models as LM
from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, publish_and_wait, small_cell, wait_until

pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BASE = "/sax/test/base"
ADAPTERS = {"ada": "/sax/test/ada", "bob": "/sax/test/bob"}
OVERRIDES = {"num_slots": 4, "max_seq_len": 64, "prefill_buckets": [16, 64], "dtype": "float32",
             "max_queue": 32, "max_loras": 2, "max_lora_rank": 8}
ATOL = 1e-3


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return LM.build(tmp_path_factory.mktemp("lora_cell_models"))


@pytest.fixture(scope="module")
def torch_models(lora_dirs) -> dict:
    base_dir, ads = lora_dirs
    return {name: LM.torch_model(base_dir, ads.get(name)) for name in (None, "ada", "bob")}


def _publish_adapter(admin: AdminProcess, model_id: str, path: Path) -> requests.Response:
    return requests.post(f"{admin.url}/models", timeout=10, json={
        "model_id": model_id, "model_path": "lm.lora", "checkpoint": str(path), "replicas": 1,
        "overrides": {"base": BASE}})


def _ready(admin: AdminProcess, model_id: str) -> dict:
    return wait_until(lambda: (lambda d: d if d["active_replicas"] >= 1 else None)(
        requests.get(f"{admin.url}/models{model_id}", timeout=10).json()), timeout=120, interval=0.1,
        what=f"{model_id} ready")


@pytest.fixture(scope="module")
def lora_cell(lora_dirs, tmp_path_factory) -> Iterator[tuple[AdminProcess, ModelServerProcess, FrontendProcess]]:
    with small_cell(tmp_path_factory.mktemp("lora_cell")) as (admin, ms, frontend):
        publish_and_wait(admin.url, BASE, model_path="lm.llama", checkpoint=str(lora_dirs[0]),
                         overrides=OVERRIDES, timeout=600)
        for name, model_id in ADAPTERS.items():
            assert _publish_adapter(admin, model_id, lora_dirs[1][name]).status_code == 201
        for model_id in ADAPTERS.values():
            _ready(admin, model_id)
        yield admin, ms, frontend


def _completion(frontend: FrontendProcess, model: str | None, prompt: list[int], n: int) -> dict:
    r = requests.post(f"{frontend.url}/v1/completions", timeout=180, json={
        "model": model or BASE, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1, "echo": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_twelve_concurrent_mixed_requests_match_peft(lora_cell, lora_dirs, torch_models):
    from transformers import AutoTokenizer

    _, _, frontend = lora_cell
    tok = AutoTokenizer.from_pretrained(str(lora_dirs[0]))
    rng = np.random.default_rng(3)
    cases = [([None, "ada", "bob"][i % 3], rng.integers(3, LM.VOCAB, 6 + 3 * i).tolist(), 8 + i % 5)
             for i in range(12)]
    with ThreadPoolExecutor(12) as ex:
        outs = list(ex.map(lambda c: _completion(frontend, ADAPTERS.get(c[0]), c[1], c[2]), cases))
    for (name, prompt, n), choice in zip(cases, outs):
        want, ref = LM.reference(torch_models[name], prompt, n)
        seq = prompt + want
        # every token, by its piece; the text too where it is valid UTF-8 (random byte tokens
        # decode to U+FFFD differently whole and incrementally)
        assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in seq], name
        if "\ufffd" not in tok.decode(seq):
            assert choice["text"] == tok.decode(seq), name
        lps = choice["logprobs"]["token_logprobs"]
        np.testing.assert_allclose(np.array(lps[1:], np.float64), ref[np.arange(len(seq) - 1), seq[1:]],
                                   atol=ATOL, rtol=0)
    assert len({tuple(o["text"]) for o in outs[:3]}) == 3


def test_every_data_route_takes_an_adapter(lora_cell, lora_dirs, torch_models):
    import openai
    from transformers import AutoTokenizer

    admin, _, frontend = lora_cell
    tok = AutoTokenizer.from_pretrained(str(lora_dirs[0]))
    client = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hello world!"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    for name in ("ada", "bob"):
        want, _ = LM.reference(torch_models[name], ids, 6)
        out = client.chat.completions.create(model=ADAPTERS[name], messages=messages, max_tokens=6, temperature=0)
        assert out.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    scores, texts = {}, {}
    for model in (BASE, *ADAPTERS.values()):
        r = requests.post(f"{frontend.url}/generate", timeout=60, json={
            "model": model, "query": "Hello world", "extra_inputs": {"temperature": 0.0,
                                                                      "per_example_max_decode_steps": 6}})
        assert r.status_code == 200, r.text
        texts[model] = r.json()[0][0]
        r = requests.post(f"{frontend.url}/score", timeout=60, json={"model": model, "prefix": "Hello",
                                                                      "suffix": [" world"]})
        assert r.status_code == 200, r.text
        scores[model] = r.json()[0]
    assert len(set(texts.values())) == 3 and len(set(scores.values())) == 3
    listed = {m.id: m for m in client.models.list().data}
    for model_id in ADAPTERS.values():
        assert listed[model_id].model_extra["parent"] == BASE
    assert "parent" not in listed[BASE].model_extra


def test_bad_adapter_publishes_are_refused_or_fail_clearly(lora_cell, lora_dirs, tmp_path):
    admin, _, _ = lora_cell
    r = requests.post(f"{admin.url}/models", timeout=10, json={
        "model_id": "/sax/test/orphan", "model_path": "lm.lora", "checkpoint": str(lora_dirs[1]["ada"]),
        "replicas": 1, "overrides": {"base": "/sax/test/nobody"}})
    assert r.status_code == 400 and "base model /sax/test/nobody is not published" in r.text
    r = requests.post(f"{admin.url}/models", timeout=10, json={
        "model_id": "/sax/test/nobase", "model_path": "lm.lora", "checkpoint": str(lora_dirs[1]["ada"]),
        "replicas": 1})
    assert r.status_code == 400 and "needs the override base" in r.text
    dora = tmp_path / "dora"
    shutil.copytree(lora_dirs[1]["ada"], dora)
    cfg = (dora / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (dora / "adapter_config.json").write_text(cfg)
    assert _publish_adapter(admin, "/sax/test/dora", dora).status_code == 201
    bad = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
        requests.get(f"{admin.url}/models/sax/test/dora", timeout=5).json()), timeout=60, what="dora failure")
    assert "DoRA adapters (use_dora) are not supported" in bad["last_error"]
    assert requests.delete(f"{admin.url}/models/sax/test/dora", timeout=10).status_code == 200


def test_unpublishing_a_base_that_adapters_need_is_refused(lora_cell):
    admin, _, frontend = lora_cell
    r = requests.delete(f"{admin.url}/models{BASE}", timeout=10)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "FAILED_PRECONDITION"
    assert "/sax/test/ada, /sax/test/bob: unpublish them first" in r.json()["error"]["message"]
    r = requests.post(f"{frontend.url}/unpublish", timeout=10, json={"model": BASE})
    assert 400 <= r.status_code < 500 and "unpublish them first" in r.text


def test_adapter_publish_on_a_running_base_is_quick_and_drops_nothing(lora_cell, lora_dirs):
    admin, _, frontend = lora_cell
    failures, done = [], threading.Event()
    count = [0]

    def traffic() -> None:
        while not done.is_set():
            r = requests.post(f"{frontend.url}/v1/completions", timeout=60, json={
                "model": BASE, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0})
            count[0] += 1
            if r.status_code != 200:
                failures.append(r.text)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        assert _publish_adapter(admin, "/sax/test/cy", lora_dirs[1]["bob"]).status_code == 201
        _ready(admin, "/sax/test/cy")
        took = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert took < 5.0, took
    assert not failures and count[0] > 3, failures[:3]
    assert requests.delete(f"{admin.url}/models/sax/test/cy", timeout=10).status_code == 200


def test_two_servers_adapters_beside_the_base_and_moving_with_it(lora_dirs, tmp_path):
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    servers = [ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}") for _ in range(2)]
    try:
        for ms in servers:
            ms.start()
        publish_and_wait(admin.url, BASE, model_path="lm.llama", checkpoint=str(lora_dirs[0]),
                         overrides=OVERRIDES, timeout=600)
        for name, model_id in ADAPTERS.items():
            assert _publish_adapter(admin, model_id, lora_dirs[1][name]).status_code == 201

        def where(model_id: str) -> set[str]:
            d = requests.get(f"{admin.url}/models{model_id}", timeout=10).json()
            return {r["address"] for r in d["replicas"] if r["status"] == "LOADED" and r["server_alive"]}

        home = wait_until(lambda: (lambda b: b if b and all(where(m) == b for m in ADAPTERS.values()) else None)(
            where(BASE)), timeout=120, what="adapters beside the base")
        victim = next(ms for ms in servers if ms.address in home)
        victim.kill9()
        other = next(ms for ms in servers if ms is not victim)
        wait_until(lambda: where(BASE) == {other.address} and all(
            where(m) == {other.address} for m in ADAPTERS.values()), timeout=300, what="moved together")
        r = requests.post(f"{other.url}/v1/completions", timeout=60, json={
            "model": ADAPTERS["ada"], "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
    finally:
        for ms in servers:
            ms.stop()
        admin.stop()
