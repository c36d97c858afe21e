"""Engine v2 on the tiny model: prefix caching, chunked prefill and preemption give exactly the
outputs of the plain path, and nothing compiles while serving."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from model_server import registry
from model_server.engine import Engine, SamplingParams, compile_count
from model_server.models import base

WINDOW = 128


@functools.lru_cache(maxsize=None)
def _fwd(spec):
    return jax.jit(base.make_forward(spec))


def ref_greedy(model, prompt, n):
    """Greedy tokens by cache-free forwards (padded to the window: one compile serves all)."""
    seq = list(prompt)
    for _ in range(n):
        toks = np.zeros((1, WINDOW), np.int32)
        toks[0, :len(seq)] = seq
        logits, _ = _fwd(model.spec)(model.params, toks, np.arange(WINDOW, dtype=np.int32)[None], None, None)
        seq.append(int(np.asarray(logits[0, len(seq) - 1]).argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": WINDOW})


def make(model, **kw) -> Engine:
    kw = {"num_slots": 4, "max_seq_len": WINDOW, "prefill_buckets": [16, 64], "max_queue": 16,
          "dtype": "float32", **kw}
    eng = Engine(model, **kw)
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engine(model):
    eng = make(model, max_num_batched_tokens=24)
    yield eng
    eng.stop()


PREFIX = [(7 * i) % 300 + 5 for i in range(50)]
GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_a_cached_prefix_gives_the_same_tokens_and_prompt_logprobs(engine, model):
    prompts = [PREFIX + [11, 12, 13], PREFIX + [40, 41]]
    want = [ref_greedy(model, p, 6) for p in prompts]
    c0 = compile_count()
    params = SamplingParams(max_tokens=6, logprobs=2, prompt_logprobs=True, **GREEDY)
    hits0 = engine.stats()["prefix_cache_hits_total"]
    # one at a time: a scoring pass batched with another prompt rounds differently
    cold = [engine.submit(p, SamplingParams(**{**params.__dict__, "prefix_caching": False})) for p in prompts[:1]]
    cold_out = [cold[0].result()[0]]
    cold.append(engine.submit(prompts[1], SamplingParams(**{**params.__dict__, "prefix_caching": False})))
    cold_out.append(cold[1].result()[0])
    assert engine.stats()["prefix_cache_hits_total"] == hits0
    engine.submit(prompts[0], SamplingParams(max_tokens=1, **GREEDY)).result()  # fills the cache
    warm, warm_out = [], []
    for p in prompts:
        warm.append(engine.submit(p, params))
        warm_out.append(warm[-1].result()[0])
    assert engine.stats()["prefix_cache_hits_total"] - hits0 >= 2 * 48
    for ref, c, w, hc, hw in zip(want, cold_out, warm_out, cold, warm):
        assert w.token_ids == c.token_ids == ref
        # generated tokens' logprobs: the suffix's chunk is a smaller product than the whole
        # prompt's, so they agree to rounding; prompt logprobs (one cache-free pass) exactly
        assert [lp.logprob for lp in w.logprobs] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-5)
        assert [x and x.logprob for x in hw.prompt_logprobs] == [x and x.logprob for x in hc.prompt_logprobs]
    assert compile_count() == c0


def test_a_long_prompt_prefills_in_chunks_beside_decodes(engine, model):
    long_prompt = [(5 * i) % 280 + 9 for i in range(100)]
    want_long, want_short = ref_greedy(model, long_prompt, 5), ref_greedy(model, [3, 4, 5], 60)
    c0 = compile_count()
    calls = engine.stats()["prefill_calls_total"]
    short = engine.submit([3, 4, 5], SamplingParams(max_tokens=60, **GREEDY))
    long = engine.submit(long_prompt, SamplingParams(max_tokens=5, prefix_caching=False, **GREEDY))
    assert long.result()[0].token_ids == want_long
    assert short.result()[0].token_ids == want_short
    # the long prompt's first chunk fills the step's budget beside the short prompt at most
    # (nothing decodes yet: 64 tokens), its rest goes in chunks of 23 beside the short decode
    assert engine.stats()["prefill_calls_total"] - calls >= 3
    assert compile_count() == c0


def test_a_pool_too_small_for_everyone_preempts_and_finishes_all(model):
    eng = make(model, num_blocks=8 + 4 + 2)  # one window and the slots' own blocks, and two
    try:
        prompts = [[(k * 13 + i) % 250 + 3 for i in range(20)] for k in range(4)]
        want = [ref_greedy(model, p, 40) for p in prompts]
        c0 = compile_count()
        handles = [eng.submit(p, SamplingParams(max_tokens=40, **GREEDY)) for p in prompts]
        outs = [h.result()[0] for h in handles]
        for ref, o in zip(want, outs):
            assert o.token_ids == ref and o.finish_reason == "length"
        st = eng.stats()
        assert st["num_preemptions_total"] > 0 and st["requests_finished_total"]["length"] == 4
        assert st["kv_cache_usage_perc"] == 0.0
        assert compile_count() == c0
    finally:
        eng.stop()


def test_n_samples_share_the_prompt_and_seeds_repeat(engine):
    p = PREFIX[:37]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3)
    a = [c.token_ids for c in engine.submit(p, params).result()]
    b = [c.token_ids for c in engine.submit(p, params).result()]
    assert a == b and len({tuple(x) for x in a}) > 1


def test_a_request_waiting_past_its_deadline_gets_the_retryable_refusal(model):
    from model_server.engine import QueueFull

    eng = make(model, num_slots=1, decode_buckets=[1], max_queue_wait_s=0.01)
    try:
        busy = eng.submit(PREFIX[:20], SamplingParams(max_tokens=100, **GREEDY))
        late = eng.submit(PREFIX[:21], SamplingParams(max_tokens=4, **GREEDY))
        with pytest.raises(QueueFull, match="waited") as e:
            late.result()
        assert e.value.retry_after > 0
        assert busy.result()[0].finish_reason == "length"  # the running request is untouched
        st = eng.stats()
        assert st["requests_refused_total"] == 1 and st["waiting_samples"] == 0
        assert eng.submit(PREFIX[:21], SamplingParams(max_tokens=4, **GREEDY)).result()[0].finish_reason == "length"
    finally:
        eng.stop()
