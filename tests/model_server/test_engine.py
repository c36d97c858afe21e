"""The continuous-batching engine on test.tiny, checked against a plain reference loop.

One engine (4 slots, window 64, buckets 16/64, queue bound 2) serves every test of this
module; the reference is a cache-free `base.forward` over the whole sequence each step.
"""
from __future__ import annotations

import functools
import jax
import numpy as np
import pytest

from model_server import kernels, registry
from model_server.engine import (Engine, EngineError, InvalidRequest, QueueFull, SamplingParams,
                                 compile_count)
from model_server.models import base
from tests.cluster import wait_until
from tests.model_server import reference
from tests.model_server.reference import log_softmax, prompt_of

SLOTS, WINDOW = 4, 64


@pytest.fixture(scope="module")
def model():
    return registry.load_model("test.tiny", None, {"num_slots": SLOTS, "max_seq_len": WINDOW})


@pytest.fixture(scope="module")
def engine(model):
    """KV blocks of 16 positions: every test's sequences cross block boundaries (and, on the
    pure-JAX path, decode steps switch between the 1-, 2- and 4-block programs as they grow)."""
    with pytest.MonkeyPatch.context() as mp:
        eng = Engine(model, num_slots=SLOTS, max_seq_len=WINDOW, prefill_buckets=[16, 64], max_queue=2,
                     dtype="float32", decode_buckets=[2])
        eng.start()
        assert eng.programs.kv_variants == ([4] if kernels.enabled() else [1, 2, 4])
        yield eng
        eng.stop()


# The reference: a cache-free forward over the whole sequence, padded to the window.
ref_logits = functools.partial(reference.full_logits, pad=WINDOW)
ref_greedy = functools.partial(reference.ref_greedy, pad=WINDOW)


PROMPTS = ["Hello world! This is", "The quick brown fox jumps over the lazy dog. Once upon a time there",
           "def add(a, b):"]


def run_all(engine, prompts, params):
    """Submit every prompt at once (so they share decode steps); returns each handle's result."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    return [h.result() for h in handles], handles


# --------------------------------------------------------------------------- tests

def test_greedy_matches_reference_loop(engine, model):
    prompts = [prompt_of(model, t) for t in PROMPTS]
    assert len(prompts[1]) > 16 >= len(prompts[0])  # both buckets
    results, handles = run_all(engine, prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for p, (c,), h in zip(prompts, results, handles):
        want, _ = ref_greedy(model, p, 10)
        assert c.token_ids == want
        assert c.finish_reason == "length"
        assert h.prompt_tokens == len(p) and h.completion_tokens == 10
        assert c.text == model.tokenizer.decode(want)


def test_logprobs_match_log_softmax_of_reference(engine, model):
    p = prompt_of(model, PROMPTS[0])
    (c,), = run_all(engine, [p], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    want, steps = ref_greedy(model, p, 6)
    assert c.token_ids == want and len(c.logprobs) == 6
    for tok, lp, raw in zip(want, c.logprobs, steps):
        ref = log_softmax(raw)
        assert lp.token_id == tok and lp.token == model.tokenizer.decode([tok], skip_special_tokens=False)
        assert abs(lp.logprob - ref[tok]) < 1e-4
        order = np.argsort(-ref)[:3]
        assert [t for t, _, _ in lp.top] == [int(i) for i in order]
        np.testing.assert_allclose([x for _, _, x in lp.top], ref[order], atol=1e-4)
    # logprobs=0: the chosen token's logprob only
    (c0,), = run_all(engine, [p], SamplingParams(max_tokens=2, temperature=0.0, logprobs=0, ignore_eos=True))[0]
    assert [lp.top for lp in c0.logprobs] == [[], []]


def test_prompt_logprobs_scoring(engine, model):
    prompts = [prompt_of(model, t) for t in PROMPTS]
    long = (prompts[1] * 3)[:WINDOW]  # exactly the window: still scored
    sp = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=2)
    results, handles = run_all(engine, prompts + [long], sp)
    for p, (c,), h in zip(prompts + [long], results, handles):
        assert c.token_ids == [] and c.text == "" and c.finish_reason == "length"
        assert h.completion_tokens == 0
        lps = h.prompt_logprobs
        assert len(lps) == len(p) and lps[0] is None
        ref = log_softmax(ref_logits(model, p))
        for j in range(1, len(p)):
            assert lps[j].token_id == p[j]
            assert abs(lps[j].logprob - ref[j - 1, p[j]]) < 1e-4
            order = np.argsort(-ref[j - 1])[:2]
            assert [t for t, _, _ in lps[j].top] == [int(i) for i in order]
            np.testing.assert_allclose([x for _, _, x in lps[j].top], ref[j - 1, order], atol=1e-4)
    # echo + generation: prompt logprobs, then the usual tokens
    h = engine.submit(prompts[0], SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=True,
                                                 logprobs=0, ignore_eos=True))
    (c,) = h.result()
    assert c.token_ids == ref_greedy(model, prompts[0], 3)[0]
    assert len(h.prompt_logprobs) == len(prompts[0]) and h.prompt_logprobs[1].top == []


def test_seed_determinism_independent_of_batch(engine, model):
    p = prompt_of(model, PROMPTS[0])
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    (alone,), = run_all(engine, [p], sp)[0]
    companions = [prompt_of(model, PROMPTS[1]), prompt_of(model, PROMPTS[2]), p]
    results, _ = run_all(engine, [p] + companions, [sp, SamplingParams(max_tokens=20, temperature=0.7, seed=1),
                                                     SamplingParams(max_tokens=5, temperature=0.0),
                                                     SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                                    presence_penalty=1.0, ignore_eos=True)])
    assert results[0][0].token_ids == alone.token_ids
    assert results[0][0].text == alone.text
    assert results[3][0].token_ids != alone.token_ids  # another seed
    # plain temperature sampling (no truncation) is seeded too
    sp2 = SamplingParams(max_tokens=12, temperature=1.3, seed=7, ignore_eos=True)
    a = run_all(engine, [p], sp2)[0][0][0].token_ids
    b = run_all(engine, [p, companions[0]], [sp2, SamplingParams(max_tokens=8)])[0][0][0].token_ids
    assert a == b


def test_top_k_1_equals_greedy(engine, model):
    p = prompt_of(model, PROMPTS[2])
    want, _ = ref_greedy(model, p, 8)
    results, _ = run_all(engine, [p, p], [SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=s,
                                                         ignore_eos=True) for s in (1, 2)])
    assert [r[0].token_ids for r in results] == [want, want]
    # a tiny nucleus keeps only the best token too
    (c,), = run_all(engine, [p], SamplingParams(max_tokens=8, temperature=0.8, top_p=1e-6, seed=3,
                                                ignore_eos=True))[0]
    assert c.token_ids == want


def test_sampling_follows_the_distribution(engine, model):
    """Many seeded first tokens: their frequencies follow softmax(logits / T) truncated by top-k."""
    p = prompt_of(model, PROMPTS[0])
    probs = np.exp(log_softmax(ref_logits(model, p)[-1] / 0.7))
    top = np.argsort(-probs)[:3]
    sp = SamplingParams(max_tokens=1, temperature=0.7, top_k=3, n=SLOTS, seed=0, ignore_eos=True)
    seen = []
    for seed in range(24):
        sp.seed = seed
        seen += [c.token_ids[0] for c in engine.submit(p, sp).result()]
    assert set(seen) <= set(int(t) for t in top)
    freq = np.array([seen.count(int(t)) for t in top]) / len(seen)
    want = probs[top] / probs[top].sum()
    assert np.abs(freq - want).max() < 0.2, (freq, want)


def test_logit_bias_forces_a_token(engine, model):
    p = prompt_of(model, PROMPTS[1])
    forced = prompt_of(model, " fox")[0]
    results, _ = run_all(engine, [p, p], [SamplingParams(max_tokens=5, temperature=0.0, logit_bias={forced: 100.0},
                                                         ignore_eos=True),
                                          SamplingParams(max_tokens=5, temperature=1.0, seed=5, ignore_eos=True,
                                                         logit_bias={forced: 100.0})])
    assert [r[0].token_ids for r in results] == [[forced] * 5, [forced] * 5]
    # a strongly negative bias bans the greedy choice
    want, _ = ref_greedy(model, p, 1)
    (c,), = run_all(engine, [p], SamplingParams(max_tokens=1, temperature=0.0, logit_bias={want[0]: -100.0}))[0]
    assert c.token_ids != want


@pytest.mark.parametrize("kw", [dict(frequency=1.5), dict(presence=1.5), dict(repetition=1.8),
                                dict(presence=-1.0, frequency=0.5, bias={5: 3.0})])
def test_penalties_match_reference(engine, model, kw):
    p = prompt_of(model, PROMPTS[0])
    base_out, _ = ref_greedy(model, p, 16)
    want, _ = ref_greedy(model, p, 16, **kw)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, presence_penalty=kw.get("presence", 0.0),
                        frequency_penalty=kw.get("frequency", 0.0), repetition_penalty=kw.get("repetition", 1.0),
                        logit_bias=kw.get("bias", {}))
    # alongside an unpenalised request: penalties are per slot
    results, _ = run_all(engine, [p, p], [sp, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)])
    assert results[0][0].token_ids == want
    assert results[1][0].token_ids == base_out
    if kw.get("presence", 0) >= 0 and "bias" not in kw:
        assert want != base_out  # the penalty matters on this prompt ...
        assert len(set(want)) >= len(set(base_out))  # ... and it discourages repeats


def _forced_text_params(model, **kw):
    """Force clean ASCII text: only the tokens of a few words can win (bias +100)."""
    ids = sorted(set(prompt_of(model, "The quick brown fox jumps over the lazy dog")))
    return SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logit_bias={i: 100.0 for i in ids}, **kw)


def test_stop_strings_across_token_boundaries(engine, model):
    p = prompt_of(model, PROMPTS[0])
    (full,), = run_all(engine, [p], _forced_text_params(model))[0]
    pieces = [model.tokenizer.decode([t]) for t in full.token_ids]
    assert "".join(pieces) == full.text
    j = next(i for i in range(3, len(pieces) - 2) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    for stop in (pieces[j][-1] + pieces[j + 1][0],  # spans two tokens
                 pieces[j][-2:] + pieces[j + 1] + pieces[j + 2][:1]):  # spans three
        cut = full.text.find(stop)
        assert cut >= 0
        h = engine.submit(p, _forced_text_params(model, stop=["\x00never", stop]))
        deltas = list(h)
        text = "".join(d.text for d in deltas)
        assert text == full.text[:cut]
        assert deltas[-1].finish_reason == "stop"
        assert all(stop not in d.text for d in deltas)
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == full.token_ids[:len(ids)] and h.completion_tokens == len(ids)
        assert model.tokenizer.decode(ids).startswith(text + stop)
    # a partial match is held back, then released when it does not complete
    h = engine.submit(p, _forced_text_params(model, stop=[pieces[j][-1] + "\x00"]))
    assert "".join(d.text for d in h) == full.text


def test_stop_token_ids_and_eos(engine, model):
    p = prompt_of(model, PROMPTS[1])
    want, _ = ref_greedy(model, p, 10)
    stop_tok = want[4]
    i = want.index(stop_tok)
    (c,), = run_all(engine, [p], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_tok]))[0]
    assert c.token_ids == want[:i + 1] and c.finish_reason == "stop"
    assert c.text == model.tokenizer.decode(want[:i])
    eos = model.spec.eos_token_ids[0]
    results, handles = run_all(engine, [p, p], [SamplingParams(max_tokens=5, temperature=0.0, logit_bias={eos: 100.0}),
                                                SamplingParams(max_tokens=5, temperature=0.0, logit_bias={eos: 100.0},
                                                               ignore_eos=True)])
    assert (results[0][0].token_ids, results[0][0].finish_reason, results[0][0].text) == ([eos], "stop", "")
    assert handles[0].completion_tokens == 1
    assert (results[1][0].token_ids, results[1][0].finish_reason) == ([eos] * 5, "length")


def test_n_samples(engine, model):
    p = prompt_of(model, PROMPTS[2])
    want, _ = ref_greedy(model, p, 6)
    h = engine.submit(p, SamplingParams(max_tokens=6, temperature=0.0, n=2, ignore_eos=True))
    assert [c.token_ids for c in h.result()] == [want, want]  # the prefilled slot copied intact
    h = engine.submit(p, SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True, logprobs=1))
    outs = h.result()
    assert [c.index for c in outs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs}) == 3
    assert all(len(c.token_ids) == 8 and len(c.logprobs) == 8 and c.finish_reason == "length" for c in outs)
    assert h.completion_tokens == 24
    again = engine.submit(p, SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True)).result()
    assert [c.token_ids for c in again] == [c.token_ids for c in outs]


def test_invalid_requests(engine, model):
    p = prompt_of(model, PROMPTS[0])
    cases = [
        ([], SamplingParams(), "prompt"),
        ([1] * (WINDOW + 1), SamplingParams(max_tokens=0, prompt_logprobs=True), "prompt"),
        (p, SamplingParams(max_tokens=WINDOW - len(p) + 1), "max_tokens"),
        ([model.spec.vocab_size], SamplingParams(), "prompt"),
        ([-1], SamplingParams(), "prompt"),
        (p, SamplingParams(max_tokens=0), "max_tokens"),
        (p, SamplingParams(n=SLOTS + 1), "n"),
        (p, SamplingParams(logprobs=21), "logprobs"),
        (p, SamplingParams(top_p=1.5), "top_p"),
        (p, SamplingParams(temperature=-1.0), "temperature"),
        (p, SamplingParams(temperature=2.5), "temperature"),  # common.bounds: OpenAI's 0-2
        (p, SamplingParams(logit_bias={model.spec.vocab_size: 1.0}), "logit_bias"),
        (p, SamplingParams(stop_token_ids=[10 ** 6]), "stop_token_ids"),
    ]
    for ids, sp, param in cases:
        with pytest.raises(InvalidRequest) as e:
            engine.submit(ids, sp)
        assert e.value.param == param, (sp, e.value)
    # the longest prompt that fits still runs
    (c,), = run_all(engine, [p], SamplingParams(max_tokens=WINDOW - len(p), temperature=0.0, ignore_eos=True))[0]
    assert len(c.token_ids) == WINDOW - len(p)


def _long(model, **kw):
    p = prompt_of(model, "Hi")
    return p, SamplingParams(max_tokens=WINDOW - len(p), temperature=0.0, ignore_eos=True, **kw)


def test_queue_bound_and_cancel(engine, model):
    p, sp = _long(model)
    running = [engine.submit(p, sp) for _ in range(SLOTS)]
    waiting = [engine.submit(p, sp) for _ in range(2)]  # max_queue = 2
    with pytest.raises(QueueFull) as e:
        engine.submit(p, sp)
    assert e.value.retry_after > 0
    for h in running + waiting:
        h.cancel()
    for h in running + waiting:
        assert list(h) is not None and h.finished
    # n samples count against the bound
    running = [engine.submit(p, sp) for _ in range(SLOTS)]
    w = engine.submit(p, sp)
    with pytest.raises(QueueFull):
        engine.submit(p, SamplingParams(max_tokens=4, n=2))
    w.cancel()
    for h in running:
        h.cancel()
        list(h)
    assert engine.stats()["waiting"] == 0


def test_cancel_frees_the_slot_at_once(engine, model):
    p, sp = _long(model)
    hs = [engine.submit(p, sp) for _ in range(SLOTS)]
    its = [iter(h) for h in hs]
    for it in its:
        next(it)  # every slot is generating
    waiter = engine.submit(p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert engine.stats()["waiting"] == 1  # every slot is taken (~60 steps to go)
    hs[0].cancel()
    assert list(its[0]) is not None  # its iteration ends
    first = next(iter(waiter))  # admitted into the freed slot while the others still run
    assert first.token_ids
    assert not any(h.finished for h in hs[1:])
    assert hs[0].finish_reasons == ["cancelled"]
    waiter.result()
    for h in hs[1:]:
        h.cancel()
        list(h)
    s = engine.stats()
    assert s["slots_used"] == 0 and s["running"] == 0 and s["requests_finished_total"]["cancelled"] >= 4


def test_an_abandoned_wait_cancels_the_request(engine, model):
    """`result(abandoned)` (the caller of a non-streaming request hung up) frees the slots."""
    p, sp = _long(model)
    before = engine.stats()["requests_finished_total"]["cancelled"]
    h = engine.submit(p, sp)
    asked = []

    def gone() -> bool:
        asked.append(1)
        return len(asked) > 1  # asked every millisecond: gone at the second question

    got = list(h.deltas(gone, poll_s=0.001))
    wait_until(lambda: h.finished, timeout=10)  # the engine loop applies the cancel
    assert h.finish_reasons == ["cancelled"] and not any(d.finish_reason for d in got)
    assert sum(len(d.token_ids) for d in got) < sp.max_tokens
    wait_until(lambda: engine.stats()["slots_used"] == 0, timeout=10)
    assert engine.stats()["requests_finished_total"]["cancelled"] == before + 1


def test_embed_is_mean_of_hidden_states(engine, model):
    p = prompt_of(model, PROMPTS[0])
    vec = np.asarray(engine.embed(p))
    toks = np.zeros((1, WINDOW), np.int32)
    toks[0, :len(p)] = p
    hidden, _ = jax.jit(base.make_hidden_fn(model.spec))(model.params, toks, np.arange(WINDOW, dtype=np.int32)[None],
                                                         None, None)
    np.testing.assert_allclose(vec, np.asarray(hidden[0, :len(p)]).mean(0), atol=1e-4)
    with pytest.raises(InvalidRequest):
        engine.embed([])


def test_stats(engine, model):
    p = prompt_of(model, PROMPTS[0])
    before = engine.stats()
    run_all(engine, [p], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    s = engine.stats()
    assert s["num_slots"] == SLOTS and s["slots_used"] == 0
    assert s["prompt_tokens_total"] - before["prompt_tokens_total"] == len(p)
    assert s["generation_tokens_total"] - before["generation_tokens_total"] == 3
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "request_queue_time_seconds"):
        h = s[name]
        assert h["count"] > before[name]["count"] and h["buckets"][-1] == ["+Inf", h["count"]]
    assert s["healthy"] and engine.tokenizer.encode("Hi") == model.tokenizer.encode("Hi")
    assert len(engine.tokenizer) == model.spec.vocab_size


def test_no_compilation_after_warmup(engine, model):
    """A mix of lengths, settings, stop conditions, scoring, embedding and cancels compiles nothing."""
    prompts = [prompt_of(model, t) for t in PROMPTS] + [prompt_of(model, "Hi")]
    start = compile_count()
    mixes = [
        SamplingParams(max_tokens=5, temperature=0.0),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.8, seed=1, logprobs=5),
        SamplingParams(max_tokens=6, temperature=1.2, top_k=300, top_p=0.5, n=2, stop=["e"]),  # bisection path
        SamplingParams(max_tokens=4, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={3: 2.0},
                       stop_token_ids=[7]),
        SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=3),
        SamplingParams(max_tokens=3, prompt_logprobs=True),
    ]
    for sp in mixes:
        hs = [engine.submit(p, sp) for p in (prompts if sp.n == 1 else prompts[:2])]
        for h in hs:
            h.result()
    p, sp = _long(model)
    h = engine.submit(p, sp)
    next(iter(h))
    h.cancel()
    list(h)
    engine.embed(prompts[1])
    assert compile_count() == start


def test_submit_before_start_is_refused(model):
    eng = Engine(model, num_slots=1, max_seq_len=32, prefill_buckets=[32], max_queue=1)
    with pytest.raises(EngineError):
        eng.submit([1, 2], SamplingParams())  # not started
    assert not eng.healthy
