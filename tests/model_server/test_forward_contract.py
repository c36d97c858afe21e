"""The forward/KV-cache contract the engine relies on (on test.tiny, no torch): prefill and
decode through shuffled block tables, chunks after a cached prefix, last-token logits, clipped
ids, hidden states, bfloat16 and tensor parallelism, each against a cache-free reference."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_server import registry
from model_server.models import base
from tests.model_server.reference import full_logits


@pytest.fixture(scope="module")
def model() -> registry.LoadedModel:
    return registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": 64, "dtype": "float32"})


_PAD = 48


def _tables(rows: int, width: int, seed: int = 0, pool: int = 20) -> np.ndarray:
    """Disjoint block tables in a shuffled pool (so no row's blocks are contiguous)."""
    ids = np.random.default_rng(seed).permutation(pool)[:rows * width]
    return ids.reshape(rows, width).astype(np.int32)


def test_engine_style_prefill_and_decode(model):
    """Prefill two prompts through shuffled block tables (padded buckets), then decode both.

    Each step's logits must equal a cache-free forward over the whole sequence; the blocks
    first hold a longer stale sequence that must not leak into the new ones.
    """
    fwd = jax.jit(model.forward_fn(), donate_argnums=(3,))
    cache = model.init_cache()
    bucket = 16
    rng = np.random.default_rng(0)
    tables = _tables(2, 4)

    def prefill(cache, row, prompt):
        toks = np.zeros((1, bucket), np.int32)
        toks[0, :len(prompt)] = prompt
        logits, cache = fwd(model.params, toks, np.arange(bucket, dtype=np.int32)[None], cache, tables[row:row + 1])
        np.testing.assert_allclose(np.asarray(logits[0, :len(prompt)]), full_logits(model, prompt, pad=_PAD), atol=1e-5)
        return int(np.asarray(logits[0, len(prompt) - 1]).argmax()), cache

    _, cache = prefill(cache, 0, rng.integers(1, 300, 14))  # stale occupant of row 0's blocks
    seqs = {0: list(rng.integers(1, 300, 6)), 1: list(rng.integers(1, 300, 9))}
    for row, prompt in seqs.items():
        nxt, cache = prefill(cache, row, prompt)
        seqs[row].append(nxt)
    for _ in range(14):  # across a block boundary
        tokens = np.array([[seqs[r][-1]] for r in (0, 1)], np.int32)
        positions = np.array([[len(seqs[r]) - 1] for r in (0, 1)], np.int32)
        logits, cache = fwd(model.params, tokens, positions, cache, tables)
        for row, seq in seqs.items():
            np.testing.assert_allclose(np.asarray(logits[row, 0]), full_logits(model, seq, pad=_PAD)[-1], atol=1e-5)
            seq.append(int(np.asarray(logits[row, 0]).argmax()))


def test_a_chunk_after_a_cached_prefix_matches_the_whole_prompt(model):
    """A prompt prefilled in chunks (the first shared by two rows' tables, as a prefix-cache
    hit) gives the logits of the one-shot prefill and of the cache-free pass."""
    seq = list(np.arange(45) % 50 + 3)
    want = full_logits(model, seq, pad=_PAD)
    fl = jax.jit(base.make_forward_last(model.spec), donate_argnums=(3,))
    cache = model.init_cache()
    tables = np.array([[7, 3, 11, 5], [7, 3, 2, 9]], np.int32)  # both rows share blocks 7 and 3
    toks = np.array([seq[:32]], np.int32)
    _, cache = fl(model.params, toks, np.arange(32, dtype=np.int32)[None], cache, tables[:1], np.array([31], np.int32))
    for row in (0, 1):  # the rest (13 tokens, padded to 16) after the shared 32
        chunk = np.zeros((1, 16), np.int32)
        chunk[0, :13] = seq[32:]
        logits, cache = fl(model.params, chunk, 32 + np.arange(16, dtype=np.int32)[None], cache,
                           tables[row:row + 1], np.array([12], np.int32))
        np.testing.assert_allclose(np.asarray(logits)[0], want[44], atol=1e-5)


def _tiny_gpt2_spec() -> base.ModelSpec:
    return base.ModelSpec(family="gpt2", model_type="gpt2", vocab_size=97, hidden_size=32, num_layers=2,
                          num_heads=4, num_kv_heads=4, head_dim=8, intermediate_size=64,
                          max_position_embeddings=64, norm_eps=1e-5, activation="gelu_new",
                          tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_last_for_prefill(model, family):
    """Logits at one token per row (the last layer computing the other tokens' keys and values
    only) equal the full forward's at that token, and every layer's cache is the same."""
    spec, params = model.spec, model.params
    if family == "gpt2":
        spec = _tiny_gpt2_spec()
        params = jax.device_put(base.random_params(spec, seed=3))
    toks = np.zeros((2, 16), np.int32)
    toks[0, :5], toks[1, :10] = np.arange(1, 6), np.arange(20, 30)
    pos = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    last_index = np.array([4, 9], np.int32)
    tables = np.array([[3], [1]], np.int32)
    full, cache_full = jax.jit(base.make_forward(spec))(params, toks, pos, base.init_cache(spec, 4, 16, jnp.float32),
                                                        tables)
    last, cache_last = jax.jit(base.make_forward_last(spec))(
        params, toks, pos, base.init_cache(spec, 4, 16, jnp.float32), tables, last_index)
    assert last.shape == (2, spec.vocab_size)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full)[[0, 1], last_index], atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_last), jax.tree.leaves(cache_full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_forward_last_skips_the_last_layer_for_other_tokens():
    """XLA's cost analysis: logits at one token of 16 cost fewer FLOPs than the hidden states of
    all 16 (the last layer's queries, attention output and MLP run for that token only)."""
    spec = _tiny_gpt2_spec()
    params = jax.device_put(base.random_params(spec, seed=3))
    toks, pos = np.ones((2, 16), np.int32), np.tile(np.arange(16, dtype=np.int32), (2, 1))

    def flops(fn, *args):
        cost = jax.jit(fn).lower(params, toks, pos, None, None, *args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    last = flops(base.make_forward_last(spec), np.array([4, 9], np.int32))
    hidden = flops(base.make_hidden_fn(spec))
    per_layer = hidden / spec.num_layers
    assert last < hidden - 0.5 * per_layer, (last, hidden)


def test_out_of_range_ids_are_clipped(model):
    """Garbage padding ids are clipped, never NaN."""
    bad = np.zeros((2, 16), np.int32)
    bad[:, 12:] = 10**6
    pos = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    out, _ = jax.jit(model.forward_fn())(model.params, bad, pos, None, None)
    assert np.isfinite(np.asarray(out)).all()


def test_decode_reads_only_its_table(model):
    """Decode steps through a table one block wide, then two (the pure-JAX path's narrow
    variants) give the cache-free logits; writes past the table are dropped, and a padding
    entry (an id past the pool) writes nothing."""
    spec = model.spec
    seq = list(np.arange(40) % 50 + 3)
    want = full_logits(model, seq, pad=_PAD)
    cache = base.init_cache(spec, 6, 16, jnp.float32)
    fl = jax.jit(base.make_forward_last(spec))
    table = np.array([[4, 1, 6]], np.int32)  # 6: padding (the pool has 6 blocks)
    logits, cache = fl(model.params, np.array([seq[:10]], np.int32), np.arange(10, dtype=np.int32)[None],
                       cache, table[:, :1], np.array([9], np.int32))
    np.testing.assert_allclose(np.asarray(logits)[0], want[9], atol=1e-5)
    for pos in range(10, 32):
        width = 1 if pos < 16 else 2
        logits, cache = fl(model.params, np.array([[seq[pos]]], np.int32), np.array([[pos]], np.int32),
                           cache, table[:, :width], np.array([0], np.int32))
        np.testing.assert_allclose(np.asarray(logits)[0], want[pos], atol=1e-5, err_msg=f"position {pos}")
    before = [np.asarray(a).copy() for a in jax.tree.leaves(cache)]
    _, cache = fl(model.params, np.array([[seq[32]]], np.int32), np.array([[32]], np.int32), cache, table,
                  np.array([0], np.int32))
    for a, b in zip(before, jax.tree.leaves(cache)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_hidden_states_for_embed(model):
    toks = np.array([[3, 9, 27, 81]], np.int32)
    pos = np.arange(4, dtype=np.int32)[None]
    hidden, cache = jax.jit(model.hidden_fn())(model.params, toks, pos, None, None)
    assert hidden.shape == (1, 4, model.spec.hidden_size) and cache is None
    logits, _, hidden2 = jax.jit(model.forward_fn(return_hidden=True))(model.params, toks, pos, None, None)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(hidden2), atol=1e-6)
    from_hidden = jax.jit(base.logits_from_hidden, static_argnums=0)(model.spec, model.params, hidden)
    np.testing.assert_allclose(np.asarray(from_hidden), np.asarray(logits), atol=1e-5)
    assert np.asarray(hidden).mean(axis=1).shape == (1, model.spec.hidden_size)


def test_bfloat16_model():
    m = registry.load_model("test.tiny", None, {"dtype": "bfloat16", "num_slots": 2, "max_seq_len": 32})
    cache = m.init_cache()
    assert cache[0][0].dtype == jnp.bfloat16
    logits, cache = jax.jit(m.forward_fn(), donate_argnums=(3,))(
        m.params, np.ones((2, 1), np.int32), np.zeros((2, 1), np.int32), cache, np.array([[0], [2]], np.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 1, m.spec.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_tensor_parallel_matches_single_device(tmp_path):
    """Params and KV cache sharded over 2 host devices give the same logits."""
    script = textwrap.dedent("""
        import sys, jax, numpy as np
        from model_server import convert, registry
        from model_server.models import base, tiny
        assert len(jax.devices()) == 2
        mesh = base.make_mesh()
        kn = {"dtype": "float32", "num_slots": 2, "max_seq_len": 32}
        sharded = registry.load_model("test.tiny", None, kn, mesh=mesh)
        single = registry.load_model("test.tiny", None, kn)
        tiny.save_hf(sys.argv[1] + "/hf")
        assert convert.main([sys.argv[1] + "/hf", sys.argv[1] + "/orbax"]) == 0
        hf = registry.load_model("lm.hf", sys.argv[1] + "/hf", kn, mesh=mesh)
        orbax = registry.load_model("lm.hf", sys.argv[1] + "/orbax", kn, mesh=mesh)
        for m in (sharded, hf, orbax):
            assert len(m.params["layers"][0]["wq"].sharding.device_set) == 2
        toks = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
        pos = np.tile(np.arange(4, dtype=np.int32), (2, 1))
        outs = []
        for m in (sharded, single, hf, orbax):
            f = jax.jit(m.forward_fn(), donate_argnums=(3,))
            logits, cache = f(m.params, toks, pos, m.init_cache(), np.array([[1], [3]], np.int32))
            outs.append(np.asarray(logits))
            outs.append(len(cache[0][0].sharding.device_set))
        assert outs[1] == 2 and outs[3] == 1  # kv heads sharded over both devices
        for i in (4, 6):
            assert outs[i + 1] == 2
            np.testing.assert_allclose(outs[i], outs[2], atol=1e-5)
        np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
        print("ok")
    """)
    root = str(Path(__file__).parents[2])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
