"""Registry, serving knobs and HF config parsing (on test.tiny, no torch); the forward/KV-cache
contract is in test_forward_contract.py."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from model_server import registry
from model_server.knobs import OverrideError, ServingKnobs, parse_overrides
from model_server.models import base, tiny
from model_server.registry import ModelPathError


@pytest.fixture(scope="module")
def model() -> registry.LoadedModel:
    return registry.load_model("test.tiny", None, {"num_slots": 4, "max_seq_len": 64, "dtype": "float32"})


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
