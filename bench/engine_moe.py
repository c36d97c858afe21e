"""Engine benchmark, mixture-of-experts row: a Qwen3-MoE shaped like Qwen3-30B-A3B, scaled down.

    python -m bench.engine --model qwen3-moe                  # (= python -m bench.engine_moe)
    python -m bench.engine_moe --new-tokens 16 --concurrency 8

128 experts with 8 active per token, as Qwen3-30B-A3B, and its total / active parameter ratio
(about 9.2; printed) at hidden 512, 5 layers (8 query heads, 2 KV heads of 64), experts of
width 192, a 6144-token vocabulary: ~200M parameters, 0.8 GB in float32. transformers'
Qwen3MoeForCausalLM is built with random weights and saved with `save_pretrained` (sharded
safetensors); our engine loads that checkpoint, so both run the same weights, in this process,
alternating. Decode throughput excludes prefill on both sides. transformers runs one static
batch as `generate` would, with its phases timed apart (one forward over the prompts, then
single-token steps on its KV cache, timed alone): B * (new - 1) / (time of the steps). Ours,
all B submitted at once through the engine: B / the mean time per output token on the
engine's own clock (each token after a sequence's first, from the step before: timing by the
consumer threads, or T(new) - T(1), drowns in the noise of a loaded 2-core machine at 8 new
tokens). Steps that mix decode rows with other rows' prefill count against ours. So short
prompts and few new tokens suffice, and transformers' slow batched prefill through the
experts (126 s at 8 x 64 tokens on a loaded machine) is paid once per size.
Prefill throughput at one prompt is a separate row. transformers runs each phase with its
fastest experts implementation on this CPU (`--hf-prefill-experts`, `--hf-decode-experts`).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import types

import numpy as np

from bench.baseline import hf_decode, synthetic_tokenizer
from bench.engine import ENGINE_COMPILES, run_ours

VOCAB = 6144


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=512, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=1536, moe_intermediate_size=192, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=VOCAB - 1, pad_token_id=0)


def active_params(spec) -> int:
    """Parameters a token uses: all but the experts not chosen."""
    from model_server.models import base

    unused = (spec.num_experts - spec.num_experts_per_tok) * 3 * spec.moe_intermediate_size * spec.hidden_size
    return base.param_count(spec) - len(spec.moe_layers) * unused


def ours_tpot(engine, prompts, new_tokens) -> float:
    """Mean time per output token of `prompts` run at once, from the engine's own clock (its
    TPOT histogram: each token after a sequence's first, from the step that made the one
    before); a decode step of B rows makes B tokens, so B / TPOT is decode throughput."""
    before = engine.h_tpot.snapshot()
    run_ours(engine, prompts, new_tokens)
    after = engine.h_tpot.snapshot()
    return (after["sum"] - before["sum"]) / (after["count"] - before["count"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; best figure kept")
    impls = ["batched_mm", "grouped_mm", "eager"]
    ap.add_argument("--hf-prefill-experts", default="grouped_mm", choices=impls,
                    help="transformers' experts implementation for its prefill (its default, grouped_mm, "
                         "took 16.5 s for 8 x 64 tokens on 2 loaded AMD EPYC cores; batched_mm 126 s)")
    ap.add_argument("--hf-decode-experts", default="batched_mm", choices=impls,
                    help="and for its decode steps (one 8-row step on the same loaded cores: batched_mm "
                         "3.0 s, grouped_mm 5.2 s, eager 11.3 s)")
    args = ap.parse_args(argv)

    import torch
    torch.set_flush_denormal(True)  # as XLA:CPU does (see bench.engine)
    torch.set_num_threads(os.cpu_count() or 1)
    import jax
    from transformers import Qwen3MoeForCausalLM

    from model_server import checkpoint
    from model_server.engine import Engine, SamplingParams
    from model_server.models import base

    t0 = time.time()
    torch.manual_seed(0)
    hf_model = Qwen3MoeForCausalLM(qwen3_moe_config()).eval()
    tmp = tempfile.TemporaryDirectory(prefix="bench-moe-")
    hf_model.save_pretrained(tmp.name, max_shard_size="200MB")
    ckpt, params = checkpoint.load_checkpoint(tmp.name, "float32")
    spec = ckpt.spec
    total, active = base.param_count(spec), active_params(spec)
    print(f"# random Qwen3-MoE: {total / 1e6:.1f}M params, {active / 1e6:.1f}M active per token "
          f"(ratio {total / active:.2f}; Qwen3-30B-A3B: 30.5B / 3.3B = 9.2), {spec.num_experts} experts, top "
          f"{spec.num_experts_per_tok}, {base.param_bytes(spec, 'float32') / 1e6:.0f} MB fp32 ({time.time() - t0:.1f}s); "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}, transformers experts "
          f"{args.hf_prefill_experts!r} (prefill) / {args.hf_decode_experts!r} (decode)", flush=True)

    pl, nt, pf = args.prompt_tokens, args.new_tokens, args.prefill_tokens
    max_conc = max(args.concurrency)
    model = types.SimpleNamespace(spec=spec, params=params, tokenizer=synthetic_tokenizer(VOCAB), mesh=None)
    t0 = time.time()
    eng = Engine(model, num_slots=max_conc, max_seq_len=pl + nt, prefill_buckets=[pl], max_queue=4 * max_conc)
    eng.start()
    eng_pf = Engine(model, num_slots=1, max_seq_len=pf + 8, prefill_buckets=[pf], max_queue=4)
    eng_pf.start()
    print(f"# engines warm in {time.time() - t0:.1f}s", flush=True)

    rng = np.random.default_rng(0)
    sets = {b: rng.integers(1, VOCAB - 1, size=(b, pl)).tolist() for b in args.concurrency}
    pp = rng.integers(1, VOCAB - 1, size=(1, pf)).tolist()
    phases = dict(prefill_experts=args.hf_prefill_experts, decode_experts=args.hf_decode_experts)
    hf_decode(hf_model, sets[min(args.concurrency)][:1], 2, **phases)  # warm up
    run_ours(eng, sets[min(args.concurrency)][:1], 4)
    results: dict[str, dict[str, float]] = {"ours": {}, "transformers": {}}

    def keep(side, key, value):
        results[side][key] = max(value, results[side].get(key, 0.0))

    for rnd in range(args.rounds):
        for b in args.concurrency:
            tpot = ours_tpot(eng, sets[b], nt)
            keep("ours", f"tput{b}", b / tpot)
            hpf, hdt, _ = hf_decode(hf_model, sets[b], nt, **phases)
            keep("transformers", f"tput{b}", b * (nt - 1) / hdt)
            print(f"#   [{rnd}] {b} seqs: ours mean time per output token {1e3 * tpot:.1f} ms (engine clock); "
                  f"transformers prefill {hpf:.2f}s, then {nt - 1} decode steps {hdt:.2f}s", flush=True)
        keep("ours", "prefill", pf / run_ours(eng_pf, pp, 1)[0])
        keep("transformers", "prefill", pf / hf_decode(hf_model, pp, 1, **phases)[0])

    check, nc = sets[min(args.concurrency)][0], nt
    ours_tokens = eng.submit(check, SamplingParams(max_tokens=nc, temperature=0.0, ignore_eos=True)).result()[0].token_ids
    hf_tokens = hf_decode(hf_model, [check], nc, **phases)[2]
    eng.stop()
    eng_pf.stop()
    print(f"# greedy tokens identical to transformers on a {nc}-token check: {hf_tokens[0] == ours_tokens}")
    print()
    rows = [(f"decode tok/s, {b} seq{'s' if b > 1 else ''}", f"tput{b}") for b in args.concurrency]
    rows.append((f"prefill tok/s, {pf}-token prompt", "prefill"))
    print(f"| {'Qwen3-MoE (128 experts, top 8), metric':<44} | {'ours (JAX)':>11} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 13}|{'-' * 14}|{'-' * 8}|")
    for label, key in rows:
        o, h = results["ours"][key], results["transformers"][key]
        print(f"| {label:<44} | {o:>11.1f} | {h:>12.1f} | {o / h:>5.2f}x |")
    print(f"XLA compilations while the engines served (after warm-up): {ENGINE_COMPILES[0]}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
