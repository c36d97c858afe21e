"""Engine v2 workloads: a shared-prefix chat and a mixed long-prompt load, each with and
without prefix caching and chunked prefill, in one run (same random GPT-2 small as
bench.engine, its synthetic tokenizer).

    python -m bench.engine_workloads                  # both workloads, all four settings
    python -m bench.engine_workloads --prefix 1024 --users 8
    python -m bench.engine_workloads --sweep          # block sizes 16/32/64, budgets 128/256/512

* chat: `users` conversations share a `prefix`-token system prompt; each sends its own
  `question`-token message and decodes `new` tokens (arrivals `stagger` apart).
* mixed: `streams` short prompts decode `new` tokens while one `long`-token prompt arrives;
  its time to first token and the longest pause of any stream during its prefill.

Per row: throughput (generated tokens / makespan), TTFT p50, inter-token latency p50 and p99,
and the compilations while serving (0 everywhere).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
import types

import numpy as np

from bench.baseline import VOCAB, synthetic_tokenizer
from bench.engine import gpt2_small_spec


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def drive(engine, prompts, new_tokens, stagger=0.0, prefix_caching=True):
    """Submit `prompts` `stagger` apart; per request (ttft, token arrival times)."""
    from model_server.engine import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, prefix_caching=prefix_caching)
    out = [None] * len(prompts)
    threads = []
    t0 = time.perf_counter()

    def consume(i, h, t_sub):
        times = []
        for d in h:
            now = time.perf_counter()
            times += [now] * len(d.token_ids)
        out[i] = (times[0] - t_sub, times, t_sub)

    for i, p in enumerate(prompts):
        if stagger:
            time.sleep(max(0.0, t0 + i * stagger - time.perf_counter()))
        t_sub = time.perf_counter()
        th = threading.Thread(target=consume, args=(i, engine.submit(p, sp), t_sub))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return out, time.perf_counter() - t0


def summary(results, makespan):
    ttft = [r[0] for r in results]
    itl = [b - a for r in results for a, b in zip(r[1], r[1][1:])]
    ntok = sum(len(r[1]) for r in results)
    return {"tput": ntok / makespan, "ttft50": statistics.median(ttft), "itl50": _pct(itl, 0.5),
            "itl99": _pct(itl, 0.99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=768)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long", type=int, default=900)
    ap.add_argument("--stagger", type=float, default=0.05)
    ap.add_argument("--budget", type=int, default=256, help="tokens per step with chunking")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true",
                    help="caching and chunking on, for each block size (16, 32, 64) and budget (128, 256, 512)")
    args = ap.parse_args(argv)
    import jax

    from model_server.engine import Engine, compile_count
    from model_server.models import base

    spec = gpt2_small_spec()
    model = types.SimpleNamespace(spec=spec, params=jax.device_put(base.random_params(spec, 0, "float32")),
                                  tokenizer=synthetic_tokenizer(), mesh=None)
    rng = np.random.default_rng(1)
    window = max(args.prefix + args.question, args.long) + args.new
    buckets = [b for b in (16, 32, 64, 128, 256, 512) if b < window] + [window]
    if args.sweep:
        settings = [(True, b, args.budget) for b in (16, 32, 64)] + [(True, 16, t) for t in (128, 512)]
    else:
        settings = [(c, args.block_size, args.budget if k else 1 << 20) for c in (True, False) for k in (True, False)]
    engines = {}
    for caching, block, budget in settings:
        eng = Engine(model, num_slots=max(args.users, args.streams + 1), max_seq_len=window,
                     prefill_buckets=buckets, max_queue=64, block_size=block,
                     max_num_batched_tokens=budget, enable_prefix_caching=caching)
        t0 = time.time()
        eng.start()
        print(f"# engine caching={caching} budget={budget}: {eng.num_blocks} blocks of {eng.block_size}, "
              f"warm-up {time.time() - t0:.1f}s, {len(eng.compile_timings)} programs", flush=True)
        engines[(caching, block, budget)] = eng
    print("| workload | prefix caching | block size | tokens per step | tok/s | TTFT p50 (s) | ITL p50 (ms) | "
          "ITL p99 (ms) | extra | compiles |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (caching, block, budget), eng in engines.items():
        chunked = "unbounded" if budget >= 1 << 20 else budget
        c0 = compile_count()
        system = rng.integers(0, VOCAB - 1, args.prefix).tolist()
        chats = [system + rng.integers(0, VOCAB - 1, args.question).tolist() for _ in range(args.users)]
        drive(eng, chats[:1], 2)  # the first user's turn fills the cache
        res, span = drive(eng, chats[1:], args.new, args.stagger)
        s = summary(res, span)
        hits = eng.stats()["prefix_cache_hits_total"]
        print(f"| shared-prefix chat | {caching} | {block} | {chunked} | {s['tput']:.0f} | {s['ttft50']:.3f} | "
              f"{1e3 * s['itl50']:.1f} | {1e3 * s['itl99']:.1f} | {hits} cached prompt tokens | "
              f"{compile_count() - c0} |", flush=True)
        c0 = compile_count()
        shorts = [rng.integers(0, VOCAB - 1, 32).tolist() for _ in range(args.streams)]
        long_prompt = rng.integers(0, VOCAB - 1, args.long).tolist()
        box = {}

        def late():
            time.sleep(0.5)
            r, _ = drive(eng, [long_prompt], 4)
            box["long"] = r[0]

        th = threading.Thread(target=late)
        th.start()
        res, span = drive(eng, shorts, 4 * args.new)
        th.join()
        s = summary(res, span)
        lt, _, l_sub = box["long"]
        pause = max(b - a for r in res for a, b in zip(r[1], r[1][1:]) if b >= l_sub and a <= l_sub + lt)
        print(f"| mixed long prompt | {caching} | {block} | {chunked} | {s['tput']:.0f} | {s['ttft50']:.3f} | "
              f"{1e3 * s['itl50']:.1f} | {1e3 * s['itl99']:.1f} | long TTFT {lt:.2f}s, longest pause "
              f"{1e3 * pause:.0f} ms ({pause / lt:.2f} of it) | {compile_count() - c0} |", flush=True)
    for eng in engines.values():
        eng.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
