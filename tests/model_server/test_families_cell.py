"""Qwen3, Phi-3, Gemma 2, Gemma 3 and a windowed Mistral through a whole cell.

One admin, one model server and a frontend (real processes, real HTTP); each family's
random-weight checkpoint (conftest `torch_models`: transformers' PyTorch classes, sharded
`save_pretrained`, sliding windows of 6 to 10 positions) is published by its model path.
Through the frontend: greedy completions must be transformers' `generate` for 24 tokens on
prompts longer than every window, echoed prompt logprobs torch's log_softmax within 1e-3,
and chat completions `generate` on the family's chat template. Unservable configurations fail
their load naming the field, visible at the admin, in /listcell and in `saxutil ls`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from tests.cluster import AdminProcess, FrontendProcess, small_cell, wait_loaded, wait_until

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # five models compile at setup

#: family -> its model path
FAMILIES = {"qwen3_sw": "lm.qwen3", "mistral_sw": "lm.llama", "phi3": "lm.phi3", "gemma2": "lm.gemma",
            "gemma3": "lm.gemma"}
#: chat templates in each family's style (the test tokenizer's vocabulary spells them out)
CHAT_TEMPLATES = {
    "qwen3_sw": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "mistral_sw": "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "gemma2": "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}
CHAT_TEMPLATES["gemma3"] = CHAT_TEMPLATES["gemma2"]
OVERRIDES = {"num_slots": 2, "max_seq_len": 64, "prefill_buckets": [64], "dtype": "float32", "max_queue": 8}
PROMPT_LEN, NEW_TOKENS, CHAT_TOKENS, ATOL = 30, 24, 12, 1e-3


def _model_id(family: str) -> str:
    return f"/sax/test/{family.replace('_', '-')}"


@pytest.fixture(scope="module")
def checkpoints(torch_models, tmp_path_factory) -> dict[str, Path]:
    """Each family's checkpoint with its chat template."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"cell_{family}") / family
        shutil.copytree(torch_models[family][1], path)
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATES[family])
        out[family] = path
    return out


@pytest.fixture(scope="module")
def family_cell(checkpoints, tmp_path_factory) -> Iterator[tuple[AdminProcess, FrontendProcess]]:
    with small_cell(tmp_path_factory.mktemp("families_cell")) as (admin, _, frontend):
        for family, path in checkpoints.items():
            requests.post(f"{admin.url}/models", timeout=10, json={
                "model_id": _model_id(family), "model_path": FAMILIES[family], "checkpoint": str(path),
                "replicas": 1, "overrides": OVERRIDES}).raise_for_status()
        for family in checkpoints:
            assert wait_loaded(admin.url, _model_id(family))["active_replicas"] == 1
        yield admin, frontend


def _reference(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and log_softmax over prompt + tokens."""
    ids = torch.tensor([prompt], dtype=torch.long)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
        logprobs = torch.log_softmax(model(seq).logits[0, :-1].double(), dim=-1).numpy()
    return seq[0, len(prompt):].tolist(), logprobs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_text_and_prompt_logprobs_match_transformers(family_cell, torch_models, checkpoints, family):
    from transformers import AutoTokenizer

    _, frontend = family_cell
    model = torch_models[family][0]
    tok = AutoTokenizer.from_pretrained(str(checkpoints[family]))
    prompt = np.random.default_rng(7).integers(3, model.config.vocab_size, PROMPT_LEN).tolist()
    assert 0 < model.config.sliding_window < PROMPT_LEN
    want, ref = _reference(model, prompt, NEW_TOKENS)
    assert len(set(want)) >= 4, "degenerate reference output makes a weak test"

    r = requests.post(f"{frontend.url}/v1/completions", timeout=120, json={
        "model": _model_id(family), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "logprobs": 1, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == tok.decode(prompt + want), family
    lps = choice["logprobs"]["token_logprobs"]
    assert len(lps) == PROMPT_LEN + NEW_TOKENS and lps[0] is None
    seq = prompt + want
    got = np.array(lps[1:], np.float64)
    np.testing.assert_allclose(got, ref[np.arange(len(seq) - 1), seq[1:]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_completions_through_the_family_template(family_cell, torch_models, checkpoints, family):
    import openai
    from transformers import AutoTokenizer

    _, frontend = family_cell
    tok = AutoTokenizer.from_pretrained(str(checkpoints[family]))
    messages = [{"role": "user", "content": "Hello world!"}]  # Gemma's turn markers take 40 tokens here
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    want, _ = _reference(torch_models[family][0], ids, CHAT_TOKENS)
    client = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=_model_id(family), messages=messages, max_tokens=CHAT_TOKENS,
                                         temperature=0)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == tok.decode(want, skip_special_tokens=True)


def _broken(src: Path, out: Path, **config: object) -> Path:
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


def test_unservable_models_fail_naming_the_field(family_cell, checkpoints, tmp_path):
    admin, frontend = family_cell
    cases = {
        "arch": (checkpoints["qwen3_sw"], {"architectures": ["Qwen3NextForCausalLM"]},
                 "unknown architecture 'Qwen3NextForCausalLM' (config.json architectures)"),
        "rope": (checkpoints["phi3"], {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                                        "long_factor": [1.0]}, "rope_parameters": None},
                 "config.json rope_scaling.rope_type"),
        "variant": (checkpoints["gemma3"], {"layer_types": ["chunked_attention"] * 7},
                    "unsupported attention variant 'chunked_attention' (config.json layer_types"),
    }
    for name, (src, change, reason) in cases.items():
        path = _broken(src, tmp_path / name, **change)
        requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": f"/sax/test/bad-{name}", "model_path": "lm.hf", "checkpoint": str(path), "replicas": 1,
            "overrides": OVERRIDES}).raise_for_status()
    for name, (_, _, reason) in cases.items():
        bad = wait_until(lambda: (lambda d: d if d["last_error"] else None)(
            requests.get(f"{admin.url}/models/sax/test/bad-{name}", timeout=5).json()), timeout=60,
            what=f"{name} failure")
        assert reason in bad["last_error"], bad
        listed = requests.get(f"{frontend.url}/listcell", json={"model": f"/sax/test/bad-{name}"}, timeout=10).json()
        assert listed["active_replicas"] == 0 and reason in listed["last_error"], listed
        ls = subprocess.run([sys.executable, "-m", "client.cli", "--admin", f"127.0.0.1:{admin.port}", "ls",
                             f"/sax/test/bad-{name}"], capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0 and reason in ls.stdout, ls.stdout + ls.stderr
