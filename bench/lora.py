"""LoRA decode throughput: 32 sequences over 4 adapters, over 1 adapter, and the base alone.

    python -m bench.lora                   # about five minutes on 2 cores
    python -m bench.lora --new-tokens 32   # quicker

A random-weight Llama (8 layers, d=512, GQA 8/4 heads, SwiGLU 1408, vocab 8192, fp32) with
rank-16 adapters on all seven projections (q/k/v/o/gate/up/down), random non-zero weights.
Engines of 32 slots; 32 requests of 32-token prompts submitted at once, greedy, ignore_eos.
Decode throughput = 32 * (new - 1) / (T(new tokens) - T(1 token)): prefill excluded.

Runs: the base on an engine without LoRA (`max_loras` 0: the programs have no adapter code),
the base's rows on the LoRA engine (`max_loras` 4, every row index -1), 32 sequences spread
over 4 adapters (8 each), and 32 on 1 adapter. Each configuration is timed `--rounds` times,
alternating, and the median reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

VOCAB = 8192


def spec():
    from model_server.models import base

    return base.ModelSpec(family="llama", model_type="llama", architecture="LlamaForCausalLM", vocab_size=VOCAB,
                          hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                          intermediate_size=1408, max_position_embeddings=256, norm_eps=1e-5)


def adapter(sp, rank: int, seed: int):
    from model_server.adapters import Adapter
    from model_server.models import lora

    rng = np.random.default_rng(seed)
    layers = [{w: ((rng.standard_normal((rank, i)) / np.sqrt(i)).astype(np.float32),
                   (rng.standard_normal((o, rank)) * 0.02).astype(np.float32))
               for w, (i, o) in lora.projection_dims(sp).items()} for _ in range(sp.num_layers)]
    return Adapter(f"bench-{seed}", rank, 2.0 * rank, False, tuple(lora.TARGETS), layers)


def engine(max_loras: int, slots: int):
    import types

    from bench.baseline import synthetic_tokenizer
    from model_server.engine import Engine
    from model_server.models import base

    sp = spec()
    model = types.SimpleNamespace(spec=sp, params=base.random_params(sp, 0), tokenizer=synthetic_tokenizer(VOCAB),
                                  mesh=None, eos_token_ids=())
    eng = Engine(model, num_slots=slots, max_seq_len=128, prefill_buckets=[32], dtype="float32",
                 decode_buckets=[], max_loras=max_loras, max_lora_rank=16, max_queue=64)
    eng.start()
    return eng


def timed(eng, adapters: list, n: int, new: int, rng) -> float:
    from model_server.engine import SamplingParams

    prompts = [rng.integers(1, VOCAB - 1, 32).tolist() for _ in range(n)]
    p = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    hs = [eng.submit(pr, p, adapter=adapters[i % len(adapters)] if adapters else None) for i, pr in enumerate(prompts)]
    for h in hs:
        h.result()
    return time.perf_counter() - t0


def throughput(eng, adapters: list, n: int, new: int, rng) -> float:
    t1 = timed(eng, adapters, n, 1, rng)
    tn = timed(eng, adapters, n, new, rng)
    return n * (new - 1) / max(tn - t1, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n, new = args.sequences, args.new_tokens
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    plain = engine(0, n)
    lora = engine(4, n)
    print(f"compiled both engines in {time.perf_counter() - t0:.1f}s")
    from model_server.engine.compile_counter import compile_count
    compiles = compile_count()
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        lora.add_adapter(name, adapter(spec(), 16, i + 1))
    runs = {"base, engine without LoRA": (plain, []), "base rows, LoRA engine": (lora, []),
            "4 adapters x 8 sequences": (lora, names), "1 adapter x 32 sequences": (lora, names[:1])}
    for eng, ads in runs.values():  # warm: first calls, adapters resident
        timed(eng, ads, n, 2, rng)
    figures: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for label, (eng, ads) in runs.items():
            figures[label].append(throughput(eng, ads, n, new, rng))
    base = statistics.median(figures["base, engine without LoRA"])
    for label, xs in figures.items():
        med = statistics.median(xs)
        print(f"{label:28s} {med:7.1f} tok/s  ({med / base:5.1%} of the base)  runs: "
              + ", ".join(f"{x:.1f}" for x in xs))
    print("compiles while serving:", compile_count() - compiles,
          "adapter swaps:", lora.stats()["lora_swaps_total"])
    plain.stop()
    lora.stop()


if __name__ == "__main__":
    main()
