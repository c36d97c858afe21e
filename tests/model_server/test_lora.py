"""LoRA adapters over a loaded base: PEFT loading and its refusals, the adapter slots' LRU,
and the engine's batched adapters against transformers + PEFT.

The base is a random-weight Llama; the adapters (tests/lora_models.py) are PEFT's own
`save_pretrained` output, rank 4 and rank 8 (rsLoRA), on every linear projection with non-zero
A and B. Mixed batches of the base and both adapters must give PEFT's greedy tokens exactly
and its logprobs (prompt and generated) within 1e-3; with one adapter slot for two adapters
they swap LRU and stay exact; nothing compiles after the engine is ready.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from model_server import registry  # noqa: E402
from model_server.adapters import AdapterError, load_adapter  # noqa: E402
from model_server.engine import Engine, SamplingParams  # noqa: E402
from model_server.engine.lora_slots import AdapterSlots  # noqa: E402
from model_server.engine.types import EngineError  # noqa: E402
from tests import lora_models as LM  # noqa: E402

OVERRIDES = {"num_slots": 4, "max_seq_len": 64, "prefill_buckets": [16, 64], "dtype": "float32"}
TOL = 1e-3
#: (adapter, prompt length, new tokens): more requests than slots, every kind in one batch
CASES = [(None, 5, 12), ("ada", 12, 12), ("bob", 17, 10), ("ada", 30, 8), (None, 20, 8), ("bob", 6, 12),
         ("ada", 3, 10), ("bob", 40, 6)]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return LM.build(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def base_model(lora_dirs):
    return registry.load_model("lm.llama", str(lora_dirs[0]), OVERRIDES)


@pytest.fixture(scope="module")
def torch_models(lora_dirs) -> dict:
    base_dir, ads = lora_dirs
    return {name: LM.torch_model(base_dir, ads.get(name)) for name in (None, "ada", "bob")}


def _engine(model, max_loras: int, lora_dirs) -> Engine:
    eng = Engine(model, num_slots=4, max_seq_len=64, prefill_buckets=[16, 64], dtype="float32",
                 decode_buckets=[2], max_loras=max_loras, max_lora_rank=8)
    eng.start()
    for name, path in lora_dirs[1].items():
        t0 = time.monotonic()
        eng.add_adapter(name, load_adapter(str(path), model.spec, 8))
        assert time.monotonic() - t0 < 1.0
    return eng


@pytest.fixture(scope="module")
def engine(base_model, lora_dirs) -> Iterator[Engine]:
    eng = _engine(base_model, 2, lora_dirs)
    yield eng
    eng.stop()


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=True)


def _check(eng: Engine, torch_models: dict, cases, seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, LM.VOCAB, p).tolist() for _, p, _ in cases]
    handles = [eng.submit(pr, _params(n), adapter=a) for (a, _, n), pr in zip(cases, prompts)]
    results = [h.result() for h in handles]
    texts = {}
    for (a, _, n), pr, h, res in zip(cases, prompts, handles, results):
        tokens, lps = LM.reference(torch_models[a], pr, n)
        out = res[0]
        assert out.token_ids == tokens, (a, len(pr))
        got = np.array([x.logprob for x in h.prompt_logprobs[1:]])
        np.testing.assert_allclose(got, lps[np.arange(len(pr) - 1), pr[1:]], atol=TOL)
        want = lps[len(pr) - 1 + np.arange(n), tokens]
        np.testing.assert_allclose([x.logprob for x in out.logprobs], want, atol=TOL)
        texts.setdefault(tuple(pr), {})[a] = tokens
    assert eng.compiles_since_ready() == 0


def test_mixed_batches_match_peft(engine, torch_models):
    _check(engine, torch_models, CASES)
    assert engine.stats()["lora_resident"] == 2


def test_adapters_change_the_output(engine):
    prompt = list(range(5, 25))
    outs = {a: engine.submit(prompt, _params(8), adapter=a).result()[0].token_ids for a in (None, "ada", "bob")}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_prefix_cache_keys_include_the_adapter(engine, torch_models):
    """One 40-token prompt (two full blocks) for the base, then each adapter: each reuses only
    its own cached blocks, and is exact."""
    rng = np.random.default_rng(11)
    prompt = rng.integers(1, LM.VOCAB, 40).tolist()
    hits0 = engine.stats()["prefix_cache_hits_total"]
    for a in (None, "ada", "bob", "ada"):
        out = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                            adapter=a).result()[0]
        assert out.token_ids == LM.reference(torch_models[a], prompt, 6)[0], a
    # only the second "ada" request found its blocks (32 positions)
    assert engine.stats()["prefix_cache_hits_total"] - hits0 == 32


def test_one_slot_swaps_adapters_lru(base_model, lora_dirs, torch_models):
    eng = _engine(base_model, 1, lora_dirs)
    try:
        _check(eng, torch_models, CASES[:6], seed=7)
        assert eng.stats()["lora_swaps_total"] >= 1
        assert eng.stats()["lora_resident"] == 1
    finally:
        eng.stop()


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(EngineError, match="not loaded"):
        engine.submit([1, 2, 3], _params(2), adapter="nobody")


def test_no_lora_knob_refuses_adapters(base_model, lora_dirs):
    eng = Engine(base_model, num_slots=2, max_seq_len=64, prefill_buckets=[64], dtype="float32")
    with pytest.raises(ValueError, match="max_loras"):
        eng.add_adapter("ada", load_adapter(str(lora_dirs[1]["ada"]), base_model.spec, 8))


# ------------------------------------------------------------------ loading and refusals

def _edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_load_reads_peft_scaling(lora_dirs, base_model):
    ada = load_adapter(str(lora_dirs[1]["ada"]), base_model.spec, 8)
    bob = load_adapter(str(lora_dirs[1]["bob"]), base_model.spec, 8)
    assert (ada.rank, ada.alpha, ada.use_rslora) == (4, 8.0, False)
    assert (bob.rank, bob.use_rslora) == (8, True)
    assert set(ada.layers[0]) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert ada.nbytes() > 0


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "unsupported target module"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"r": 0}, "positive integer"),
])
def test_unsupported_configs_are_refused(lora_dirs, base_model, tmp_path, changes, message):
    path = _edited(lora_dirs[1]["ada"], tmp_path / "edited", **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(str(path), base_model.spec, 8)


def test_rank_above_max_lora_rank_is_refused(lora_dirs, base_model):
    with pytest.raises(AdapterError, match="exceeds the base's max_lora_rank 4"):
        load_adapter(str(lora_dirs[1]["bob"]), base_model.spec, 4)


def test_missing_files_are_refused(lora_dirs, base_model, tmp_path):
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        load_adapter(str(lora_dirs[0]), base_model.spec, 8)
    path = tmp_path / "noweights"
    path.mkdir()
    shutil.copy(lora_dirs[1]["ada"] / "adapter_config.json", path)
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(str(path), base_model.spec, 8)


def test_adapter_for_another_shape_is_refused(lora_dirs, tmp_path):
    from model_server.models import tiny

    with pytest.raises(AdapterError, match="do not fit|names layer"):
        load_adapter(str(lora_dirs[1]["ada"]), tiny.spec(), 8)


def test_adapter_from_gcs(lora_dirs, base_model, gcs_bucket):
    from model_server import checkpoint as ckpt_lib

    uri = f"gs://{gcs_bucket}/adapters/ada"
    ckpt_lib.upload_dir_to_gcs(lora_dirs[1]["ada"], uri)
    local = load_adapter(str(lora_dirs[1]["ada"]), base_model.spec, 8)
    remote = load_adapter(uri, base_model.spec, 8)
    np.testing.assert_array_equal(remote.layers[1]["w_down"][1], local.layers[1]["w_down"][1])


def test_slots_lru():
    slots = AdapterSlots(2)
    for name in "abc":
        slots.register(name, name, name)
    assert slots.acquire("a") == 0 and slots.acquire("b") == 1
    assert slots.acquire("c") is None  # both held
    slots.release(0)
    assert slots.acquire("c") == 0 and slots.swaps == 1
    assert [s for s, _ in slots.take_loads()] == [1, 0]  # a's load was overtaken by c's
    slots.release(1)
    slots.acquire("b")  # resident: no load, most recently used
    assert slots.take_loads() == []
    slots.release(1)
    slots.release(0)
    assert slots.acquire("a") == 0  # c (least recently used) goes
    assert slots.salt("a") != slots.salt("b") and slots.salt(None) == b""
    with pytest.raises(KeyError):
        slots.acquire("zzz")


def test_a_new_generation_of_an_adapter_loads_beside_the_old_one(engine, base_model, lora_dirs, torch_models):
    """A rolling update of an adapter's own checkpoint on one server: generation 2 (here bob's
    weights under ada's id) loads while generation 1 serves, and unloading generation 1 leaves
    generation 2 serving its own weights."""
    from types import SimpleNamespace

    from model_server import lora_model

    base = SimpleNamespace(engine=engine, loaded=base_model)  # what a LOADED ServedModel holds
    ads = lora_dirs[1]
    _, old = lora_model.load("/sax/t/upd", str(ads["ada"]), {"base": "/sax/t/base"}, base, None, generation=1)
    _, new = lora_model.load("/sax/t/upd", str(ads["bob"]), {"base": "/sax/t/base"}, base, None, generation=2)
    prompt = list(range(7, 19))
    want_old, _ = LM.reference(torch_models["ada"], prompt, 6)
    want_new, _ = LM.reference(torch_models["bob"], prompt, 6)
    assert old.submit(prompt, _params(6)).result()[0].token_ids == want_old
    old.stop()
    assert new.healthy and new.submit(prompt, _params(6)).result()[0].token_ids == want_new
    new.stop()
