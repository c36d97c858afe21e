"""Random-weight Qwen3-MoE and Mixtral checkpoints from transformers' PyTorch classes.

Configurations vary as real checkpoints do: one KV head and two, dense layers between sparse
ones (`decoder_sparse_step` 2, `mlp_only_layers`), `norm_topk_prob` false and true, tied and
untied embeddings, Mixtral without a sliding window. Saved with `save_pretrained` as sharded
safetensors next to the test tokenizer (test.tiny's BPE) carrying the family's chat template.
"""
from __future__ import annotations

from pathlib import Path

VOCAB = 384  # test.tiny's tokenizer

#: Mixtral's instruction format (Mistral's template without the system-message branch)
MIXTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}<|endoftext|>{% endif %}{% endfor %}")


def configs() -> dict:
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=16,
                  max_position_embeddings=256, initializer_range=0.1, eos_token_id=0, pad_token_id=0)
    return {
        # MQA, layers 0 and 2 dense (decoder_sparse_step 2), top-2 of 8 not renormalised
        "qwen3_moe": Qwen3MoeConfig(**common, num_hidden_layers=3, num_key_value_heads=1,
                                    intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                    num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=False,
                                    tie_word_embeddings=False),
        # GQA 4:2, layer 1 dense (mlp_only_layers), top-3 of 8 renormalised, tied embeddings
        "qwen3_moe_dense_mid": Qwen3MoeConfig(**common, num_hidden_layers=3, num_key_value_heads=2,
                                              intermediate_size=80, moe_intermediate_size=24, num_experts=8,
                                              num_experts_per_tok=3, decoder_sparse_step=1,
                                              mlp_only_layers=[1], norm_topk_prob=True, tie_word_embeddings=True),
        # Mixtral: every layer sparse, top-2 of 4 (always renormalised), MQA, no sliding window
        "mixtral": MixtralConfig(**{k: v for k, v in common.items() if k != "head_dim"}, num_hidden_layers=2,
                                 num_key_value_heads=1, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
    }


def build(name: str, out: Path):
    """(eval torch model, its saved directory) for configuration `name`."""
    import torch
    from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM

    from model_server.models import tiny

    cfg = configs()[name]
    torch.manual_seed(sorted(configs()).index(name))
    model = (MixtralForCausalLM if name == "mixtral" else Qwen3MoeForCausalLM)(cfg).eval()
    with torch.no_grad():
        if cfg.tie_word_embeddings:  # small tied embeddings: greedy output does not just repeat
            model.get_input_embeddings().weight.normal_(0.0, 0.02)
    model.save_pretrained(str(out), max_shard_size="100KB")
    tok = tiny.build_hf_tokenizer()
    if name == "mixtral":
        tok.chat_template = MIXTRAL_TEMPLATE
    tok.save_pretrained(str(out))
    return model, out
