"""Fixtures for the model layer: tiny HF checkpoints and a tokenizer dir.

The GCS emulator fixtures (`gcs_host`, `gcs_bucket`) come from tests/conftest.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = 384  # = the test.tiny tokenizer, so its files can sit next to every test model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained with `tokenizers`, wrapped and saved with a chat template."""
    from model_server.models import tiny

    out = tmp_path_factory.mktemp("tokenizer")
    tiny.build_hf_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """test.tiny exported as a Hugging Face directory (no torch needed)."""
    from model_server.models import tiny

    return tiny.save_hf(tmp_path_factory.mktemp("tiny_hf") / "tiny")


def _hf_configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                           initializer_range=0.3, bos_token_id=0, eos_token_id=0),
        # GQA, untied embeddings, Llama-3 rope scaling.
        "llama": LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             tie_word_embeddings=False, initializer_range=0.1,
                             bos_token_id=None, eos_token_id=0, pad_token_id=0),
        # Mistral-shaped without a sliding window (MQA: one kv head).
        "mistral": MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 max_position_embeddings=256, sliding_window=None,
                                 initializer_range=0.1, eos_token_id=0),
        # q/k/v biases, tied embeddings; saved sharded to exercise the index.
        "qwen2": Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=True,
                             initializer_range=0.3, eos_token_id=0),
        # q/k norms, head_dim 32 != hidden / heads, one kv head, untied.
        "qwen3": Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
                             initializer_range=0.1, eos_token_id=0),
    }


def _windowed_configs():
    """Configurations with sliding windows shorter than the test prompts (see SLIDING)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config)

    return {
        # every layer windowed (8 positions), GQA
        "mistral_sw": MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, sliding_window=8, initializer_range=0.1,
                                    eos_token_id=0),
        # layers from max_window_layers on windowed (12), tied, q/k norms
        "qwen3_sw": Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256, use_sliding_window=True, sliding_window=12,
                                max_window_layers=1, tie_word_embeddings=True, initializer_range=0.1,
                                eos_token_id=0),
        # fused qkv_proj / gate_up_proj, window 10, partial RoPE, one kv head
        "phi3": Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                           original_max_position_embeddings=256, sliding_window=10,
                           partial_rotary_factor=0.5, tie_word_embeddings=False, initializer_range=0.1,
                           bos_token_id=1, eos_token_id=0, pad_token_id=0),
        # local/global alternation (window 8), soft-capping, query_pre_attn_scalar != head_dim
        "gemma2": Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               query_pre_attn_scalar=24, sliding_window=8, max_position_embeddings=256,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0),
        # the default 5-local:1-global pattern over 7 layers (window 6), q/k norms, local RoPE
        # base, linear RoPE scaling on the global layer, MQA, untied
        "gemma3": Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
                                   max_position_embeddings=256, rope_theta=100000.0, rope_local_base_freq=1000.0,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0},
                                   tie_word_embeddings=False, initializer_range=0.1,
                                   bos_token_id=2, eos_token_id=1, pad_token_id=0),
    }


@pytest.fixture(scope="session")
def torch_models(tmp_path_factory, tokenizer_dir):
    """{family: (torch model, saved HF dir)} built with transformers' PyTorch classes."""
    torch = pytest.importorskip("torch")
    from transformers import (Gemma2ForCausalLM, Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM,
                              MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)

    torch.set_num_threads(2)
    torch.manual_seed(0)
    classes = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
               "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "mistral_sw": MistralForCausalLM,
               "qwen3_sw": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM, "gemma2": Gemma2ForCausalLM,
               "gemma3": Gemma3ForCausalLM}
    out = {}
    for name, cfg in {**_hf_configs(), **_windowed_configs()}.items():
        model = classes[name](cfg).eval()
        with torch.no_grad():
            if cfg.tie_word_embeddings:  # small tied embeddings: greedy output does not just repeat
                model.get_input_embeddings().weight.normal_(0.0, 0.02)
            if name == "qwen2":  # random biases (HF initialises them to zero)
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0.0, 0.5)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        sharded = name in ("qwen2", "qwen3_sw", "phi3", "gemma2", "gemma3")
        model.save_pretrained(str(path), **({"max_shard_size": "40KB"} if sharded else {}))
        for f in tokenizer_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        out[name] = (model, path)
    return out
