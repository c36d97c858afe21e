"""Registry, serving knobs and the forward/KV-cache contract (on test.tiny, no torch)."""
from __future__ import annotations

import dataclasses
import functools
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
from model_server.knobs import OverrideError, ServingKnobs, parse_overrides
from model_server.models import base, tiny
from model_server.registry import ModelPathError


@pytest.fixture(scope="module")
def model() -> registry.LoadedModel:
    return registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": 64, "dtype": "float32"})


_PAD = 48


@functools.lru_cache(maxsize=None)
def _nocache_fwd(spec):
    return jax.jit(base.make_forward(spec))


def _full_logits(model, seq) -> np.ndarray:
    """Cache-free logits of `seq`, padded to one length so that a single compile serves all."""
    toks = np.zeros((1, _PAD), np.int32)
    toks[0, :len(seq)] = seq
    logits, _ = _nocache_fwd(model.spec)(model.params, toks, np.arange(_PAD, dtype=np.int32)[None], None, None)
    return np.asarray(logits[0, :len(seq)])


# --------------------------------------------------------------------------- knobs

def test_parse_overrides():
    k = parse_overrides({"num_slots": 16, "max_seq_len": "512", "prefill_buckets": [32, 128, 512],
                         "dtype": "bfloat16", "max_queue": 0, "ram": 1 << 30, "alias": "x",
                         "constraints": ["a"]})
    assert k == ServingKnobs(16, 512, (32, 128, 512), "bfloat16", 0)
    assert parse_overrides(None) == ServingKnobs()
    assert parse_overrides({"prefill_buckets": "[16, 64]"}).prefill_buckets == (16, 64)


@pytest.mark.parametrize("overrides, match", [
    ({"batch_size": 4}, "unknown override key.*'batch_size'.*accepted: num_slots"),
    ({"num_slots": 0}, "'num_slots' must be an integer >= 1"),
    ({"num_slots": True}, "num_slots"),
    ({"num_slots": 2.5}, "num_slots"),
    ({"max_seq_len": 1}, "max_seq_len"),
    ({"dtype": "float16"}, "'dtype' must be one of float32, bfloat16"),
    ({"prefill_buckets": [64, 32]}, "strictly increasing"),
    ({"prefill_buckets": []}, "non-empty list"),
    ({"prefill_buckets": [16, 128], "max_seq_len": 64}, "exceeds max_seq_len"),
    ({"max_queue": -1}, "max_queue"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(OverrideError, match=match):
        parse_overrides(overrides)
    assert issubclass(OverrideError, ValueError)


def test_resolve_knobs():
    k = ServingKnobs().resolve(256, platform="cpu")
    assert (k.max_seq_len, k.dtype, k.prefill_buckets) == (256, "float32", (16, 32, 64, 128, 256))
    assert ServingKnobs().resolve(100_000, platform="gpu") == ServingKnobs(
        8, 2048, (16, 32, 64, 128, 256, 512, 1024, 2048), "bfloat16", 64, kv_cache_dtype="bfloat16")
    assert ServingKnobs(max_seq_len=48).resolve(256, "cpu").prefill_buckets == (16, 32, 48)
    with pytest.raises(OverrideError, match="exceeds the model's limit of 256"):
        ServingKnobs(max_seq_len=512).resolve(256, "cpu")
    with pytest.raises(OverrideError, match="bucket 128 exceeds max_seq_len 64"):
        ServingKnobs(max_seq_len=64, prefill_buckets=(16, 128)).resolve(256, "cpu")


# --------------------------------------------------------------------------- registry

def test_model_paths_and_validation():
    assert {"lm.hf", "lm.gpt2", "lm.llama", "lm.qwen2", "test.tiny"} <= set(registry.list_model_paths())
    with pytest.raises(ModelPathError, match="unknown model_path 'lm.bert'"):
        registry.validate("lm.bert", "/x", None)
    with pytest.raises(ModelPathError, match="needs a checkpoint"):
        registry.validate("lm.hf", None, None)
    with pytest.raises(ModelPathError, match="needs a checkpoint"):
        registry.validate("lm.llama", "None", None)
    with pytest.raises(ModelPathError, match="checkpoint must be None"):
        registry.validate("test.tiny", "/some/dir", None)
    with pytest.raises(OverrideError):
        registry.validate("test.tiny", None, {"bogus": 1})
    assert registry.validate("test.tiny", "None", {"num_slots": 2}).num_slots == 2


def test_families_register_explicitly():
    """Every family is a DecoderModel subclass in the table; each model path names its class."""
    from model_server.models import gemma, gpt2, llama, moe

    assert base.families() == ("gemma", "gpt2", "llama", "moe")
    for cls in (gpt2.GPT2, llama.Llama, gemma.Gemma, moe.MoE):
        assert base.family_class(cls.family) is cls and issubclass(cls, base.DecoderModel)
        assert all(base.architectures()[a] == cls.family for a in cls.architectures)
    expected = {"lm.gpt2": gpt2.GPT2, "lm.llama": llama.Llama, "lm.qwen2": llama.Llama, "lm.qwen3": llama.Llama,
                "lm.phi3": llama.Llama, "lm.gemma": gemma.Gemma, "lm.qwen3_moe": moe.MoE, "lm.mixtral": moe.MoE}
    for path, cls in expected.items():
        entry = registry.lookup(path)
        assert entry.family is cls and entry.architectures <= set(cls.architectures), path
    assert registry.lookup("lm.llama").architectures == {"LlamaForCausalLM", "MistralForCausalLM"}
    assert registry.lookup("lm.hf").family is None and registry.lookup("lm.hf").architectures is None
    assert registry.lookup("test.tiny").builtin == "tiny"
    assert base.family_class(tiny.spec()) is llama.Llama
    with pytest.raises(base.ModelConfigError, match="unknown model family 'bert'.*registered: gemma, gpt2"):
        base.family_class("bert")
    with pytest.raises(base.ModelConfigError, match="the moe family has no config.json writer"):
        base.hf_config_of(dataclasses.replace(tiny.spec(), family="moe"))
    assert base.hf_config_of(tiny.spec())["architectures"] == ["LlamaForCausalLM"]


def test_register_family_refuses_duplicates_and_incomplete_classes():
    from model_server.models import llama

    contract = dict(spec_from_hf_config=llama.spec_from_hf_config, param_shapes=llama.param_shapes,
                    hf_rules=llama.hf_rules, partition_specs=llama.partition_specs)

    class Again(llama.Llama):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        base.register_family("llama2", ("LlamaForCausalLM",), **contract)(Again)  # llama's architecture

    class Half(base.DecoderModel):
        pass

    with pytest.raises(TypeError, match="Half leaves .*embed_tokens.* abstract"):
        base.register_family("half", ("HalfForCausalLM",), **contract)(Half)
    assert base.families() == ("gemma", "gpt2", "llama", "moe")
    assert base.spec_from_hf_config(llama.to_hf_config(tiny.spec())).family == "llama"
    with pytest.raises(ValueError, match="not all served by family 'gpt2'"):
        registry.ModelPathEntry("lm.x", "x", base.family_class("gpt2"), frozenset({"LlamaForCausalLM"}))


def test_tiny_is_deterministic(model):
    other = registry.load_model("test.tiny", "None", {"dtype": "float32"})
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(other.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.tokenizer.encode("héllo 世界") == other.tokenizer.encode("héllo 世界")
    assert model.spec == other.spec == tiny.spec()
    assert model.spec.vocab_size == model.tokenizer.vocab_size
    assert set(model.eos_token_ids) == {model.tokenizer.hf.convert_tokens_to_ids(t)
                                        for t in ("<|endoftext|>", "<|im_end|>")}
    assert model.tokenizer.has_chat_template


def test_loaded_model_knobs_and_memory(model):
    assert model.knobs == ServingKnobs(4, 64, (16, 32, 64), "float32", 64, kv_cache_dtype="float32")
    spec = model.spec
    assert model.param_bytes() == 4 * base.param_count(spec)
    # default pool: 4 sequences of 64 positions in blocks of 16, and one block per slot
    assert model.num_blocks() == 4 * 4 + 4
    assert model.kv_cache_bytes() == spec.num_layers * 2 * 20 * 16 * spec.num_kv_heads * spec.head_dim * 4
    assert model.memory_bytes() == model.param_bytes() + model.kv_cache_bytes()
    assert registry.estimate_memory_bytes("test.tiny", None, {"num_slots": 4, "max_seq_len": 64,
                                                               "dtype": "float32"}) == model.memory_bytes()
    assert model.stats()["memory_bytes"] == model.memory_bytes()
    cache = model.init_cache()
    assert len(cache) == spec.num_layers
    assert cache[0][0].shape == (20, spec.num_kv_heads, 16, spec.head_dim)
    small = registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": 64, "dtype": "float32",
                                                    "kv_cache_bytes": 12 * 16 * base.kv_bytes_per_token(spec, "float32")})
    assert small.num_blocks() == 12 and small.init_cache()[0][0].shape[0] == 12
    with pytest.raises(OverrideError, match="kv_cache_bytes"):
        registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": 64, "kv_cache_bytes": 1000})


def test_unload():
    m = registry.load_model("test.tiny", None, {"dtype": "float32"})
    leaf = jax.tree.leaves(m.params)[0]
    m.unload()
    assert m.params is None and leaf.is_deleted()


# --------------------------------------------------------------------------- forward / KV cache contract

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
        np.testing.assert_allclose(np.asarray(logits[0, :len(prompt)]), _full_logits(model, prompt), atol=1e-5)
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
            np.testing.assert_allclose(np.asarray(logits[row, 0]), _full_logits(model, seq)[-1], atol=1e-5)
            seq.append(int(np.asarray(logits[row, 0]).argmax()))


def test_a_chunk_after_a_cached_prefix_matches_the_whole_prompt(model):
    """A prompt prefilled in chunks (the first shared by two rows' tables, as a prefix-cache
    hit) gives the logits of the one-shot prefill and of the cache-free pass."""
    seq = list(np.arange(45) % 50 + 3)
    want = _full_logits(model, seq)
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
    want = _full_logits(model, seq)
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


# --------------------------------------------------------------------------- HF config parsing

_LLAMA_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
              "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 4096}


def test_spec_from_config_variants():
    # transformers 4.x layout: top-level rope_theta + rope_scaling (with the old "type" key)
    old = dict(_LLAMA_CFG, rope_theta=5e5, eos_token_id=[1, 2], bos_token_id=0,
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    s = base.spec_from_hf_config(old, {"eos_token_id": [2, 3, 500]})
    assert (s.rope_type, s.rope_theta, s.rope_factor) == ("llama3", 5e5, 8.0)
    assert s.eos_token_ids == (1, 2, 3) and s.bos_token_id == 0  # 500 is outside the vocabulary
    assert (s.num_kv_heads, s.head_dim, s.tie_word_embeddings) == (4, 16, False)
    # transformers 5 layout: rope_parameters
    new = dict(_LLAMA_CFG, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert base.spec_from_hf_config(new).rope_type == "linear"
    with pytest.raises(base.ModelConfigError, match="unsupported rope_scaling type 'yarn'"):
        base.spec_from_hf_config(dict(_LLAMA_CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(base.ModelConfigError, match="lacks 'hidden_size'"):
        base.spec_from_hf_config({k: v for k, v in _LLAMA_CFG.items() if k != "hidden_size"})
    with pytest.raises(base.ModelConfigError, match="multiple of num_kv_heads"):
        base.spec_from_hf_config(dict(_LLAMA_CFG, num_key_value_heads=3))


def test_sliding_window_does_not_cap_sequence_length():
    mistral = dict(_LLAMA_CFG, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=1024)
    s = base.spec_from_hf_config(mistral)
    assert s.sliding_window == 1024 and s.window_of(0) == 1024 and s.max_seq_len_limit == 4096
    assert ServingKnobs(max_seq_len=4096).resolve(s.max_seq_len_limit, "cpu").max_seq_len == 4096
    qwen = dict(_LLAMA_CFG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=1024,
                use_sliding_window=False)
    q = base.spec_from_hf_config(qwen)
    assert q.window_of(0) is None
    assert q.max_seq_len_limit == 4096 and q.qkv_bias and not q.o_bias
