"""transformers' side of the engine benchmarks, and what both sides share: the synthetic
tokenizer, GPT-2-small in PyTorch on our weights, `generate` runs, a decode-only loop (prefill
timed apart from decode) and the settle pause before every timed run."""
from __future__ import annotations

import time

import numpy as np

VOCAB = 50257


def synthetic_tokenizer(vocab_size: int = VOCAB):
    """A valid byte-level BPE with exactly `vocab_size` tokens (GPT-2's 50257: 256 bytes,
    50000 pair merges, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def torch_model(spec, params):
    """transformers' GPT2LMHeadModel holding exactly `params`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=spec.vocab_size, n_embd=spec.hidden_size, n_layer=spec.num_layers,
                     n_head=spec.num_heads, n_positions=spec.max_position_embeddings,
                     layer_norm_epsilon=spec.norm_eps, activation_function=spec.activation)
    model = GPT2LMHeadModel(cfg).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))  # noqa: E731
    tt = lambda a: t(np.asarray(a).T)  # noqa: E731  ours [out, in] -> Conv1D [in, out]
    sd = {"transformer.wte.weight": t(params["embed"]), "transformer.wpe.weight": t(params["pos_embed"]),
          "transformer.ln_f.weight": t(params["final_norm"]), "transformer.ln_f.bias": t(params["final_norm_b"])}
    for i, p in enumerate(params["layers"]):
        pre = f"transformer.h.{i}."
        sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = t(p["attn_norm"]), t(p["attn_norm_b"])
        sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = t(p["mlp_norm"]), t(p["mlp_norm_b"])
        sd[pre + "attn.c_attn.weight"] = tt(np.concatenate([p["wq"], p["wk"], p["wv"]], axis=0))
        sd[pre + "attn.c_attn.bias"] = t(np.concatenate([p["bq"], p["bk"], p["bv"]]))
        sd[pre + "attn.c_proj.weight"], sd[pre + "attn.c_proj.bias"] = tt(p["wo"]), t(p["bo"])
        sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"] = tt(p["w_fc"]), t(p["b_fc"])
        sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"] = tt(p["w_proj"]), t(p["b_proj"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m or "attn.bias" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


#: Pause before every timed run, ours and transformers' alike: after returning, each runtime's
#: worker threads keep spinning for a while (XLA's pool; libgomp's default wait policy under
#: torch), which the other side's next run would otherwise share its cores with. Measured on
#: the 512-token prefill: transformers' 6% slower straight after ours than 50 ms later, ours
#: 1.5% slower straight after transformers'.
SETTLE_S = 0.05


def gemm_rates(m: int = 512, k: int = 768, n: int = 3072) -> tuple[float, float]:
    """fp32 GEMM GFLOPS of XLA and torch (best of several), for context."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(lambda x, y: x @ y)
    f(ja, jb).block_until_ready()
    torch.mm(ta, tb)
    out = []
    for fn in (lambda: f(ja, jb).block_until_ready(), lambda: torch.mm(ta, tb)):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            best = min(best, (time.perf_counter() - t0) / 5)
        out.append(2 * m * k * n / best / 1e9)
    return out[0], out[1]


def run_hf(model, prompts, new_tokens):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1]:].tolist()




def hf_decode(model, prompts, new_tokens, prefill_experts: str | None = None,
              decode_experts: str | None = None):
    """Greedy decode of `prompts` (one static batch) with prefill and decode timed apart:
    one forward over the prompts (prefill: it yields the first token), then `new_tokens - 1`
    single-token steps on the KV cache. Returns (prefill s, decode s, tokens [B, new_tokens]).
    `prefill_experts` / `decode_experts`: an MoE model's experts implementation for each phase
    (on CPU each phase has a different fastest one)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    time.sleep(SETTLE_S)
    with torch.inference_mode():
        if prefill_experts:
            model.set_experts_implementation(prefill_experts)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks, cache = [nxt], out.past_key_values
        if decode_experts:
            model.set_experts_implementation(decode_experts)
        t1b = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
            toks.append(nxt)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1b, torch.cat(toks, dim=1).tolist()
