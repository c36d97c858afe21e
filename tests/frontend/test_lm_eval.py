"""lm-evaluation-harness's `local-completions` model against the frontend (no dataset download).

Log-likelihoods must equal the model server's own scores (POST /lm/score on a replica);
`is_greedy` must agree with the model's true argmax (transformers' PyTorch model on the
same weights, an independent oracle).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.frontend.conftest import MODEL, Cell, FrontendProcess

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: tokenizers and weights come from a local dir

CONTEXTS = ["Once upon a time there was", "The quick brown fox", "Hello world! This is a",
            "The rain in Spain stays", "def add(a, b):\n   ", "Saxplane serves language"]


@pytest.fixture(scope="module")
def lm_eval():  # type: ignore[no-untyped-def]
    if any(importlib.util.find_spec(m) is None for m in ("lm_eval", "tenacity", "aiohttp")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lm-eval[api]"], check=True, timeout=900)
    import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions)
    from lm_eval.api import registry

    return registry


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_server.models import tiny

    return tiny.save_hf(tmp_path_factory.mktemp("lm-eval") / "tiny")


@pytest.fixture(scope="module")
def oracle(hf_dir: Path):  # type: ignore[no-untyped-def]
    """(tokenizer, next-token logits function) of the same weights in PyTorch."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()

    def logprobs(ids: list[int]):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return tok, logprobs


def _greedy_case(oracle) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A (context, continuation) whose continuation is the model's greedy choice and survives
    lm-eval's re-tokenization (context + continuation encodes to context ids + that token)."""
    tok, logprobs = oracle
    for ctx in CONTEXTS:
        ids = tok.encode(ctx, add_special_tokens=False)
        lp = logprobs(ids)[-1]
        top2 = lp.topk(2)
        g = int(top2.indices[0])
        cont = tok.decode([g])
        if float(top2.values[0] - top2.values[1]) > 1e-3 and \
                tok.encode(ctx + cont, add_special_tokens=False) == ids + [g]:
            return ctx, cont
    pytest.fail("no context whose greedy token round-trips through the tokenizer (test.tiny is deterministic: the search itself is wrong)")


def _really_greedy(oracle, ctx: str, cont: str) -> bool:  # type: ignore[no-untyped-def]
    tok, logprobs = oracle
    ctx_ids = tok.encode(ctx, add_special_tokens=False)
    whole = tok.encode(ctx + cont, add_special_tokens=False)
    lp = logprobs(whole)
    return all(int(lp[i - 1].argmax()) == whole[i] for i in range(len(ctx_ids), len(whole)))


def _score(cell: Cell, ctx: str, cont: str) -> float:
    r = cell.direct("/lm/score", {"model": MODEL, "prefix": ctx, "suffixes": [cont]})
    assert r.status_code == 200, r.text
    return r.json()["scores"][0]


def _loglikelihood_requests(cases: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=case, idx=i) for i, case in enumerate(cases)]


def test_loglikelihood_and_generate_until(cell: Cell, lm_eval, hf_dir: Path,  # type: ignore[no-untyped-def]
                                          oracle) -> None:
    from lm_eval.api.instance import Instance

    lm = lm_eval.get_model("local-completions")(
        base_url=f"{cell.url}/v1/completions", model=MODEL, tokenizer_backend="huggingface",
        tokenizer=str(hf_dir), batch_size=4, max_length=128, max_gen_toks=6, num_concurrent=2, max_retries=1)
    greedy = _greedy_case(oracle)
    cases = [greedy, ("The quick brown", " fox jumps"), ("Hello world! This is", " a tiny model"),
             ("Once upon a time", " there was"), ("The rain in Spain", " stays mainly in the plain.")]
    results = lm.loglikelihood(_loglikelihood_requests(cases), disable_tqdm=True)
    assert len(results) == len(cases)
    for (ctx, cont), (ll, is_greedy) in zip(cases, results):
        assert ll == pytest.approx(_score(cell, ctx, cont), abs=1e-4), (ctx, cont)
        assert is_greedy == _really_greedy(oracle, ctx, cont), (ctx, cont)
    assert results[0][1] is True and not all(g for _, g in results[1:])

    gen = [Instance(request_type="generate_until", doc={}, idx=i,
                    arguments=(ctx, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0}))
           for i, ctx in enumerate(CONTEXTS[:4])]
    outputs = lm.generate_until(gen, disable_tqdm=True)
    tok, _ = oracle
    for ctx, out in zip(CONTEXTS[:4], outputs):
        direct = cell.direct("/v1/completions", {
            "model": MODEL, "prompt": tok.encode(ctx, add_special_tokens=False), "max_tokens": 6, "temperature": 0,
            "stop": ["\n\n"]}).json()["choices"][0]["text"]
        assert out == direct


def test_remote_tokenizer_and_loglikelihood(cell: Cell, lm_eval, hf_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """lm-eval's remote tokenizer (vLLM's /tokenizer_info, /tokenize, /detokenize) names no model:
    a frontend with --default-model serves it."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    from transformers import AutoTokenizer

    fe = FrontendProcess(cell.tmp, cell.admin.port, "--default-model", "tiny", "--workers", "1",
                         name="lm-eval").start()
    try:
        base = f"{fe.url}/v1/completions"
        assert check_remote_tokenizer_support(base)
        remote, local = RemoteTokenizer(base), AutoTokenizer.from_pretrained(str(hf_dir))
        text = "The quick brown fox jumps over the lazy dog."
        assert remote.encode(text) == local.encode(text, add_special_tokens=False)
        assert remote.decode(local.encode(text, add_special_tokens=False)) == text
        assert remote.eos_token == local.eos_token
        lm = lm_eval.get_model("local-completions")(base_url=base, model="tiny", tokenizer_backend="remote",
                                                    batch_size=2, max_length=128)
        cases = [("The quick brown", " fox jumps"), ("Hello world! This is", " a tiny model")]
        for (ctx, cont), (ll, _) in zip(cases, lm.loglikelihood(_loglikelihood_requests(cases),
                                                                disable_tqdm=True)):
            assert ll == pytest.approx(_score(cell, ctx, cont), abs=1e-4)
        assert requests.get(f"{fe.url}/tokenizer_info", timeout=10).json()["eos_token"] == local.eos_token
    finally:
        fe.stop()
