"""The step records of a slice carry everything a follower needs.

A leader engine serves mixed requests (greedy, seeded sampling, penalties, logit bias, n=2,
logprobs, scoring, embedding, a prefix-cache hit) with its programs recorded; every record,
pickled as on the wire, is replayed at once on a second runner of the same model that has no
requests at all and whose host-side slot settings and block tables are garbage. At the end its
device state (KV pool, decode tokens, positions, token counts) is identical to the leader's.
"""
from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest

from model_server import registry
from model_server.engine import Engine, SamplingParams
from model_server.slice.lockstep import Recorder, Replayer, SliceFailed, initial_values

OVERRIDES = {"num_slots": 4, "max_seq_len": 64}


def _engine():
    model = registry.load_model("test.tiny", None, OVERRIDES)
    return Engine(model, num_slots=4, max_seq_len=64, prefill_buckets=[16, 64], max_queue=16)


@pytest.fixture(scope="module")
def pair():
    leader, follower = _engine(), _engine()
    leader.start()
    follower.runner.start()
    replayer = Replayer()
    sizes: list[int] = []

    def send(ops):
        wire = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        sizes.append(len(wire))
        replayer.apply(pickle.loads(wire))

    rec = Recorder(send)
    base = rec.reserve(len(initial_values(leader.runner)))
    rec.attach(0, leader.runner, base)
    replayer.attach(0, follower.runner, base)
    # The follower's own host state is never read: make it wrong.
    r = follower.runner
    r.sp["temperature"][:] = 7.0
    r.sp["top_k"][:] = 3
    r.sp["active"][:] = True
    r.tables[:] = 0
    yield leader, follower, rec, replayer, sizes
    leader.stop()


def _device_state(runner):
    return jax.tree.leaves((runner.cache, runner.state))


def test_follower_state_matches_leader(pair):
    leader, _, rec, replayer, sizes = pair
    tok = leader.tokenizer
    prompt = tok.encode("the quick brown fox jumps over the lazy dog")
    reqs = [
        (prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
        (prompt[:5], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True)),
        (prompt[2:], SamplingParams(max_tokens=8, temperature=1.0, top_k=5, seed=3, n=2, logprobs=2,
                                    presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=6, temperature=0.0, logit_bias={5: 3.0, 9: -2.0}, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=1)),
    ]
    handles = [leader.submit(p, sp) for p, sp in reqs]
    results = [h.result() for h in handles]
    vec = leader.embed(prompt[:7])
    assert len(vec) == leader.spec.hidden_size
    assert all(c.token_ids for r in results[:4] for c in r)
    # A second identical greedy request reuses cached prefix blocks (block copies, no prefill).
    again = leader.submit(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)).result()
    assert again[0].token_ids == results[0][0].token_ids
    assert leader.stats()["prefix_cache_hits_total"] > 0
    assert rec.calls == replayer.calls > 20

    jax.block_until_ready([v for v in replayer.values.values() if not v.is_deleted()])
    for leaf in _device_state(leader.runner):
        handle = rec._by_id[id(leaf)]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(replayer.values[handle]))
    # Freed values are dropped on the follower too: it holds about what the leader holds.
    assert len(replayer.values) <= len(rec._by_id) + 64
    # A decode step's record is small: no model-sized data travels per step.
    assert sorted(sizes)[len(sizes) // 2] < 4096


def test_failed_slice_refuses_calls(pair):
    leader, _, rec, _, _ = pair
    rec.failed = "slice rank 1 is gone"
    try:
        with pytest.raises(SliceFailed):
            leader.runner.programs.set_row(leader.runner.state, *leader.runner.put(
                np.int32(0), np.zeros((leader.spec.vocab_size,), np.int32),
                np.zeros((leader.spec.vocab_size,), np.bool_)))
    finally:
        rec.failed = None
