"""The engine's serving path on every family against transformers' PyTorch.

Windowed configurations (Qwen3, Phi-3, Gemma 2/3; windows of 6 to 12 positions) have prompts
longer than their windows, and decode past them (test_families_cell.py serves a windowed
Mistral and the others through a whole cell).

Each family's random-weight checkpoint (conftest `torch_models`) is loaded through the
registry as the server loads it and served by one engine (4 slots, window 64, buckets 16/64,
cache blocks of 16 positions). Five concurrent greedy requests for four slots cover both
buckets, batched and single-row prefill, full and gathered decode steps, sequences crossing
cache blocks and a request joining a running batch in a reused slot; their tokens must equal
`generate(do_sample=False)` and their logprobs and prompt scores torch's log_softmax.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_server import kernels, registry  # noqa: E402
from model_server.checkpoint import CheckpointError  # noqa: E402
from model_server.engine import Engine, SamplingParams  # noqa: E402

#: family -> its family-specific model path (the engine is loaded through it; lm.hf is checked too)
MODEL_PATHS = {"gpt2": "lm.gpt2", "llama": "lm.llama", "mistral": "lm.llama", "qwen2": "lm.qwen2",
               "qwen3_sw": "lm.qwen3", "phi3": "lm.phi3", "gemma2": "lm.gemma", "gemma3": "lm.gemma"}
SLOTS, WINDOW, BUCKETS, KV_BLOCK = 4, 64, [16, 64], 16
#: (prompt length, new tokens) of the concurrent requests: five for four slots, so the last one
#: waits, then is prefilled alone into a reused slot while the others decode
CASES = [(5, 20), (12, 12), (17, 24), (30, 16), (47, 16)]
TOP = 3
ATOL = 1e-4

Reference = tuple[list[int], list[int], np.ndarray]  # prompt, greedy tokens, logprobs [L - 1, V]


def _overrides() -> dict:
    return {"num_slots": SLOTS, "max_seq_len": WINDOW, "prefill_buckets": BUCKETS, "dtype": "float32"}


@pytest.fixture(scope="module", params=[f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
                                        for f in MODEL_PATHS])  # the fast tier: llama; the sweep is slow
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(torch_models, family) -> Iterator[Engine]:
    """The family's engine, built as `manager.default_loader` builds it."""
    with pytest.MonkeyPatch.context() as mp:
        model = registry.load_model(MODEL_PATHS[family], str(torch_models[family][1]), _overrides())
        k = model.knobs
        eng = Engine(model, num_slots=k.num_slots, max_seq_len=k.max_seq_len,
                     prefill_buckets=list(k.prefill_buckets), max_queue=k.max_queue, dtype=k.dtype,
                     decode_buckets=[2])
        eng.start()
        assert eng.programs.kv_variants == ([4] if kernels.enabled() else [1, 2, 4])
        yield eng
        eng.stop()


@pytest.fixture(scope="module")
def reference(torch_models, family) -> list[Reference]:
    """Per case: the prompt, HF's greedy tokens and torch's log_softmax over prompt + tokens."""
    model = torch_models[family][0]
    rng = np.random.default_rng(5)  # no repeating loop, no near-tie, in any family
    vocab = model.config.vocab_size
    model.generation_config.eos_token_id = None
    out = []
    for plen, n in CASES:
        prompt = rng.integers(1, vocab, plen).tolist()
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 eos_token_id=None, pad_token_id=0)
            logprobs = torch.log_softmax(model(seq).logits[0, :-1].double(), dim=-1).numpy()
        tokens = seq[0, plen:].tolist()
        assert len(set(tokens)) >= 4, f"{family}: degenerate reference output makes a weak test"
        out.append((prompt, tokens, logprobs))
    return out


def _check_top(top: list, ref: np.ndarray, k: int) -> None:
    """The k best alternatives, by value (robust to near-ties in the order)."""
    assert len(top) == k
    np.testing.assert_allclose([x for _, _, x in top], np.sort(ref)[::-1][:len(top)], atol=ATOL, rtol=0)
    np.testing.assert_allclose([x for _, _, x in top], [ref[t] for t, _, _ in top], atol=ATOL, rtol=0)


def test_model_paths_load_the_same_model(torch_models, family):
    """lm.hf and the family's own path load the same spec and weights; the other paths refuse."""
    path = str(torch_models[family][1])
    ours = registry.load_model(MODEL_PATHS[family], path, _overrides())
    generic = registry.load_model("lm.hf", path, _overrides())
    assert ours.spec == generic.spec and ours.source_format == generic.source_format == "hf"
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(generic.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for other in sorted(set(MODEL_PATHS.values()) - {MODEL_PATHS[family]}):
        with pytest.raises(CheckpointError, match="use lm.hf"):
            registry.load_model(other, path, _overrides())


def test_greedy_tokens_and_logprobs_match_transformers(engine, reference, family):
    handles = [engine.submit(p, SamplingParams(max_tokens=len(want), temperature=0.0, logprobs=TOP,
                                               ignore_eos=True))
               for p, want, _ in reference]
    for (prompt, want, ref), h in zip(reference, handles):
        (c,) = h.result()
        assert c.token_ids == want, f"{family}: prompt of {len(prompt)} tokens diverges"
        assert c.finish_reason == "length" and len(c.logprobs) == len(want)
        for i, (tok, lp) in enumerate(zip(want, c.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert lp.token_id == tok
            assert abs(lp.logprob - row[tok]) < ATOL, (family, len(prompt), i)
            _check_top(lp.top, row, TOP)


def test_prompt_logprobs_match_transformers(engine, reference, family):
    """Scoring only (batched cache-free passes), and echo with generation."""
    handles = [engine.submit(p, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=TOP))
               for p, _, _ in reference]
    echo = engine.submit(reference[2][0], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=True,
                                                         logprobs=0, ignore_eos=True))
    (c,) = echo.result()
    assert c.token_ids == reference[2][1][:4]
    for (prompt, _, ref), h in zip(reference + [reference[2]], handles + [echo]):
        h.result()
        lps = h.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        for j in range(1, len(prompt)):
            assert lps[j].token_id == prompt[j]
            assert abs(lps[j].logprob - ref[j - 1, prompt[j]]) < ATOL, (family, len(prompt), j)
            _check_top(lps[j].top, ref[j - 1], 0 if h is echo else TOP)
