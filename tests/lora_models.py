"""A random-weight Llama base and two PEFT LoRA adapters on it (saved with peft's
`save_pretrained`), for the engine's and the cell's LoRA tests.

Both adapters target every linear projection (q/k/v/o/gate/up/down) with random, non-zero A and
B (`init_lora_weights=False`); "ada" has rank 4 (lora_alpha 8), "bob" rank 8 with rsLoRA
scaling (lora_alpha 16 / sqrt(8)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 384  # the test.tiny tokenizer's
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"ada": {"r": 4, "lora_alpha": 8, "use_rslora": False},
            "bob": {"r": 8, "lora_alpha": 16, "use_rslora": True}}


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    """Save the base (with the test.tiny tokenizer) and the adapters under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_server.models import tiny

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.1, eos_token_id=0, pad_token_id=0)
    base_dir = root / "base"
    LlamaForCausalLM(cfg).eval().save_pretrained(str(base_dir))
    tiny.build_hf_tokenizer().save_pretrained(str(base_dir))
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = LlamaForCausalLM.from_pretrained(str(base_dir))
        peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, init_lora_weights=False,
                                                      lora_dropout=0.0, **kw))
        with torch.no_grad():  # small enough that greedy text stays varied, large enough to matter
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.5)
        out[name] = root / name
        peft_model.save_pretrained(str(out[name]))
    return base_dir, out


def torch_model(base_dir: Path, adapter_dir: Path | None) -> Any:
    """transformers' Llama, with PEFT's adapter from `adapter_dir` over it when given."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def reference(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], Any]:
    """(greedy tokens, log_softmax [len(prompt) + new - 1, V] float64) of `model`."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=0)
        logprobs = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), dim=-1).numpy()
    return seq[0, len(prompt):].tolist(), logprobs
