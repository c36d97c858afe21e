"""Guided decoding in the engine on test.tiny (random weights): outputs match their grammar
by construction, whatever the model would say; unconstrained rows of the same batch are
unchanged; nothing compiles while serving."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from model_server import registry
from model_server.engine import Engine, InvalidRequest, SamplingParams, compile_count
from model_server.engine.guided import GuidedSpec

SLOTS, WINDOW = 4, 128
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["n"], "additionalProperties": False},
    },
    "required": ["ok", "kind", "tags", "inner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    model = registry.load_model("test.tiny", None, {"num_slots": SLOTS, "max_seq_len": WINDOW})
    eng = Engine(model, num_slots=SLOTS, max_seq_len=WINDOW, prefill_buckets=[16], max_queue=16,
                 decode_buckets=[2])
    eng.start()
    yield eng
    eng.stop()


def _prompt(engine):
    return engine.tokenizer.encode("Hello world")


def test_json_schema_outputs_validate_with_unconstrained_rows_unchanged(engine):
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.submit(_prompt(engine), free).result()[0]
    compiles = compile_count()
    guided = [engine.submit(_prompt(engine), SamplingParams(
        max_tokens=96, temperature=1.0, seed=s, n=1 + (s % 2), guided=GuidedSpec("json_schema", SCHEMA)))
        for s in range(3)]
    beside = engine.submit(_prompt(engine), free)
    for h in guided:
        for c in h.result():
            jsonschema.validate(json.loads(c.text), SCHEMA)
            assert c.finish_reason == "stop"
    assert beside.result()[0].token_ids == alone.token_ids  # same seed, same tokens
    assert compile_count() == compiles
    assert engine.stats()["compiles_since_ready"] == 0


def test_regex_choice_and_json_object(engine):
    rx = engine.submit(_prompt(engine), SamplingParams(
        max_tokens=40, temperature=1.0, seed=3, guided=GuidedSpec("regex", r"[0-9]{3}-(yes|no)"))).result()[0]
    assert re.fullmatch(r"[0-9]{3}-(yes|no)", rx.text), rx.text
    ch = engine.submit(_prompt(engine), SamplingParams(
        max_tokens=20, temperature=1.0, seed=4, logprobs=2,
        guided=GuidedSpec("choice", ["red pill", "blue pill"]))).result()[0]
    assert ch.text in ("red pill", "blue pill")
    assert len(ch.logprobs) == len(ch.token_ids) and all(e.logprob <= 0 for e in ch.logprobs)
    close = engine.tokenizer.encode("}")[0]
    obj = engine.submit(_prompt(engine), SamplingParams(
        max_tokens=100, temperature=1.0, seed=5, logit_bias={close: 8.0},
        guided=GuidedSpec("json_object"))).result()[0]
    assert isinstance(json.loads(obj.text), dict)


def test_unsupported_schema_keyword_is_named(engine):
    with pytest.raises(InvalidRequest, match="dependentRequired"):
        engine.submit(_prompt(engine), SamplingParams(guided=GuidedSpec(
            "json_schema", {"type": "object", "dependentRequired": {"a": ["b"]}})))
    with pytest.raises(InvalidRequest):
        engine.submit(_prompt(engine), SamplingParams(guided=GuidedSpec("regex", "(unclosed")))


def test_masked_sampling_picks_the_only_allowed_token():
    """Rows with one allowed token among 32,000 at temperature 1: always that token. (A uniform
    draw that rounded to 1.0 gave +inf Gumbel noise, which beat the mask now and then.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model_server.engine import sampling

    b, v = 32, 32000
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda lg, p, mask, c: sampling.sample(
        lg, p, lambda: jnp.zeros((b, v), jnp.int32), lambda: jnp.zeros((b, v), bool), c, mask))
    u = np.asarray(sampling.uniform(jnp.asarray(rng.integers(0, 2 ** 32, (b, 2), dtype=np.uint32)),
                                    jnp.arange(b), v))
    assert u.max() < 1.0 and u.min() > 0.0
    for trial in range(12):
        allowed = rng.integers(0, v, size=b)
        bits = np.zeros((b, (v + 31) // 32 * 32), np.uint8)
        bits[np.arange(b), allowed] = 1
        p = {"active": np.ones(b, bool), "guided": np.ones(b, bool), "temperature": np.ones(b, np.float32),
             "top_k": np.zeros(b, np.int32), "top_p": np.ones(b, np.float32),
             "presence": np.zeros(b, np.float32), "frequency": np.zeros(b, np.float32),
             "repetition": np.ones(b, np.float32), "has_bias": np.zeros(b, bool),
             "bias_ids": np.full((b, 4), v, np.int32), "bias_vals": np.zeros((b, 4), np.float32),
             "keys": rng.integers(0, 2 ** 32, size=(b, 2), dtype=np.uint32)}
        out = fn(rng.normal(size=(b, v)).astype(np.float32) * 5, p,
                 np.packbits(bits, axis=1, bitorder="little").view(np.int32), np.full(b, trial, np.int32))
        assert (np.asarray(out) == allowed).all()


def test_mask_thread_fills_the_rows_fill_does(engine):
    """`Guide.fill_async` (a guided step fills its masks on this thread while the loop thread
    makes the previous step's outputs) writes what `fill` writes, for the matchers' states."""
    import numpy as np

    from model_server.engine.guided import Guide

    g = Guide(engine.guide._hf, engine.spec.vocab_size, 2, engine.eos_token_ids)
    grammar = g.compile(GuidedSpec("choice", ["red pill", "blue pill"]))
    a, b = g.matcher(grammar), g.matcher(grammar)
    assert a.accept(engine.tokenizer.encode("red pill")[0])
    rows = [(a, 0), (b, 1)]
    threaded = g.fill_async(rows).result()
    assert np.array_equal(threaded, g.fill(rows))
    assert not np.array_equal(threaded[0], threaded[1])  # a took a token, b did not
    g.close()
    assert np.array_equal(g.fill_async(rows).result(), threaded)  # a new mask thread after close
    g.close()
