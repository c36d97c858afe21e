"""Qwen3-MoE and Mixtral through a whole cell: admin, a model server, the frontend (gunicorn).

Random-weight checkpoints from transformers' PyTorch classes (tests/moe_checkpoints.py:
one and two KV heads, dense layers between sparse ones by `decoder_sparse_step` and by
`mlp_only_layers`, `norm_topk_prob` false and true, Mixtral without a sliding window), saved
as sharded safetensors and published by their model paths. Over the frontend's OpenAI API:
greedy text equal to `generate`, token and prompt log-probabilities (echo) within 1e-3 of
torch's, chat through each family's chat template; a variant we do not implement fails its
load with the config field named at the admin.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from tests import moe_checkpoints
from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, publish_and_wait, wait_until

torch = pytest.importorskip("torch")
#: three models load and compile in the module's fixture (about a minute each on 2 idle cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

OVERRIDES = {"num_slots": 2, "max_seq_len": 64, "prefill_buckets": [64], "dtype": "float32", "max_queue": 8}
#: configuration -> the model path it is published under
MODELS = {"qwen3_moe": "lm.qwen3_moe", "qwen3_moe_dense_mid": "lm.hf", "mixtral": "lm.mixtral"}
NEW_TOKENS = 22
ATOL = 1e-3


@pytest.fixture(scope="module")
def moe_cell(tmp_path_factory) -> Iterator[tuple[str, str, dict]]:
    """(frontend url, admin url, {name: (torch model, checkpoint dir)}) with every model ready."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("moe-cell")
    models = {name: moe_checkpoints.build(name, tmp / name) for name in MODELS}
    procs: list = []
    try:
        admin = AdminProcess(tmp, root=str(tmp / "root")).start()
        procs.append(admin)
        server = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}")
        procs.append(server.start())
        frontend = FrontendProcess(tmp, admin.port, "--workers", "1")
        procs.append(frontend.start())
        for name, path in MODELS.items():
            publish_and_wait(admin.url, f"/sax/test/{name.replace('_', '-')}", 1, model_path=path,
                             checkpoint=str(models[name][1]), overrides=OVERRIDES, timeout=600)
        yield frontend.url, admin.url, models
    finally:
        for p in reversed(procs):
            p.stop()


def _post(url: str, path: str, body: dict) -> dict:
    r = requests.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _reference(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """HF greedy tokens and torch's log_softmax over prompt + tokens [L - 1, V]."""
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
        lp = torch.log_softmax(model(seq).logits[0, :-1].double(), -1).numpy()
    return seq[0, len(prompt):].tolist(), lp


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_text_and_logprobs_match_transformers(moe_cell, name):
    url, _, models = moe_cell
    model, path = models[name]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    prompt = np.random.default_rng(len(name)).integers(1, model.config.vocab_size, 21).tolist()
    want, lp = _reference(model, prompt, NEW_TOKENS)
    assert len(set(want)) >= 4, f"{name}: degenerate reference output makes a weak test"
    model_id = f"/sax/test/{name.replace('_', '-')}"
    out = _post(url, "/v1/completions", {"model": model_id, "prompt": prompt, "max_tokens": NEW_TOKENS,
                                         "temperature": 0, "logprobs": 1, "ignore_eos": True})
    choice = out["choices"][0]
    assert choice["text"] == tok.decode(want), name
    assert out["usage"]["completion_tokens"] == NEW_TOKENS
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"],
                               [lp[len(prompt) - 1 + i, t] for i, t in enumerate(want)], atol=ATOL)
    # scoring: echo with max_tokens 0, the prompt's log-probabilities
    echo = _post(url, "/v1/completions", {"model": model_id, "prompt": prompt, "max_tokens": 0, "echo": True,
                                          "logprobs": 0})["choices"][0]["logprobs"]["token_logprobs"]
    assert echo[0] is None and len(echo) == len(prompt)
    np.testing.assert_allclose(echo[1:], [lp[j - 1, prompt[j]] for j in range(1, len(prompt))], atol=ATOL)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_chat_through_the_family_template(moe_cell, name):
    url, _, models = moe_cell
    model, path = models[name]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert ("[INST]" if name == "mixtral" else "<|im_start|>") in tok.decode(ids)
    want, _ = _reference(model, ids, 20)
    out = _post(url, "/v1/chat/completions", {"model": f"/sax/test/{name.replace('_', '-')}", "messages": messages,
                                              "max_tokens": 20, "temperature": 0, "ignore_eos": True})
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)


def test_unsupported_variant_fails_its_load_naming_the_field(moe_cell, tmp_path: Path):
    _, admin_url, models = moe_cell
    bad = tmp_path / "shared-experts"
    shutil.copytree(models["qwen3_moe"][1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "shared_expert_intermediate_size": 64}))
    r = requests.post(f"{admin_url}/models", timeout=10, json={
        "model_id": "/sax/test/shared", "model_path": "lm.hf", "checkpoint": str(bad), "replicas": 1,
        "overrides": OVERRIDES})
    assert r.status_code == 201, r.text
    failed = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
        requests.get(f"{admin_url}/models/sax/test/shared", timeout=5).json()), timeout=120, what="load failure")
    assert "shared_expert_intermediate_size" in failed["last_error"], failed
    assert [rep["status"] for rep in failed["replicas"]] == ["FAILED"], failed
