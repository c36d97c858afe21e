"""`test.tiny`: a small random-weight Llama-style model with a tokenizer built in code.

Everything is deterministic (numpy PCG64 weights from a fixed seed, a BPE trained on an
embedded corpus), so every server that loads test.tiny produces identical outputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from model_server.models.base import ModelSpec, random_params

SEED = 1234
VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny model used for testing the serving cell.",
    "Saxplane serves language models: generate, score, embed and chat.",
    "héllo wörld, ça va? naïve café résumé",
    "你好，世界。模型服务器正在运行。",
    "こんにちは世界 🙂 🚀 ✨",
    "Once upon a time there was a little model that could count: 1 2 3 4 5 6 7 8 9 10.",
    "user: what is the capital of France? assistant: Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "The rain in Spain stays mainly in the plain.",
]


def build_hf_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def spec() -> ModelSpec:
    hf = build_hf_tokenizer()
    if len(hf) != VOCAB_SIZE:  # a tokenizers release that trains differently
        raise RuntimeError(f"test.tiny tokenizer has {len(hf)} tokens, expected {VOCAB_SIZE}")
    eos = tuple(hf.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    return ModelSpec(
        family="llama", model_type="llama", architecture="LlamaForCausalLM",
        vocab_size=VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False,
        eos_token_ids=eos, bos_token_id=None, pad_token_id=eos[0])


def params(dtype: Any = "float32") -> Any:
    return random_params(spec(), SEED, dtype)


def save_hf(out_dir: str | os.PathLike) -> Path:
    """Write test.tiny as a Hugging Face directory (loads with `lm.hf` / `lm.llama`)."""
    from model_server.checkpoint import save_hf as _save
    from model_server.models import llama

    s = spec()
    out = Path(out_dir)
    config = llama.to_hf_config(s)
    gen = {"eos_token_id": list(s.eos_token_ids), "pad_token_id": s.pad_token_id}
    _save(out, s, params("float32"), config, gen)
    build_hf_tokenizer().save_pretrained(str(out))
    json.loads((out / "config.json").read_text())  # sanity: valid JSON
    return out
