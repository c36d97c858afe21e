"""int8 weights against float32 on the engine benchmark's GPT-2-small (`python -m bench.engine
--model gpt2-int8`, or `python -m bench.engine_quant`).

One process, the same random weights: engine F serves them in float32, engine Q quantized
at load (`quantization: int8`, models/quant.py); both with float32 activations and KV cache.
Rounds alternate F and Q (best of the rounds kept, as bench/engine.py does) over:

* decode throughput at 1 and 8 concurrent sequences (128-token prompts): B * (new - 1) /
  (T(new tokens) - T(1 token)), prefill excluded;
* 32 sequences arriving every `--stagger` seconds: tokens / makespan;
* prefill throughput of a 512-token prompt (512 / time to first token);
* the batch-1 share of the int8 bandwidth ceiling of the moment: sustained read bandwidth
  (read just before and after each decode) / int8 weight bytes.

Also printed: greedy agreement of Q with F on the check prompt and the XLA compilations while
serving (0 expected). Keep runs short on a shared machine (`--new-tokens 32 --rounds 2`).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import types

import numpy as np

from bench.cli import engine_parser


def main(argv=None) -> int:
    ap = engine_parser(__doc__, prompt_tokens=128, prefill_tokens=512, rounds=2)
    ap.add_argument("--stagger", type=float, default=0.05)
    ap.add_argument("--share-rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    from bench.baseline import synthetic_tokenizer
    from bench.engine import ENGINE_COMPILES, BandwidthReaders, gpt2_small_spec, run_ours
    from model_server.engine import Engine, SamplingParams
    from model_server.models import base, quant

    spec = gpt2_small_spec()
    params = base.random_params(spec, seed=0, dtype="float32")
    f32_bytes = base.param_bytes(spec, "float32")
    q8_bytes = base.param_bytes(spec, "float32", "int8")
    print(f"# random GPT-2 small: {f32_bytes / 1e6:.0f} MB fp32, {q8_bytes / 1e6:.0f} MB int8 (+ scales); "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}", flush=True)
    tok = synthetic_tokenizer()
    pl, nt, pf = args.prompt_tokens, args.new_tokens, args.prefill_tokens
    max_conc = max(args.concurrency)
    engines = {}
    for name, p in (("float32", params), ("int8", quant.quantize_tree(params))):
        model = types.SimpleNamespace(spec=spec, params=jax.device_put(p), tokenizer=tok, mesh=None)
        t0 = time.time()
        eng = Engine(model, num_slots=max_conc, max_seq_len=pl + nt, prefill_buckets=[pl, pl + nt],
                     max_queue=4 * max_conc)
        eng.start()
        eng_pf = Engine(model, num_slots=1, max_seq_len=pf + 8, prefill_buckets=[pf], max_queue=4)
        eng_pf.start()
        engines[name] = (eng, eng_pf)
        print(f"# {name} engines: warm-up {time.time() - t0:.1f}s", flush=True)
    del params
    readers = BandwidthReaders(q8_bytes)
    rng = np.random.default_rng(0)
    sets = {b: rng.integers(0, spec.vocab_size - 1, size=(b, pl)).tolist() for b in args.concurrency}
    pp = rng.integers(0, spec.vocab_size - 1, size=(1, pf)).tolist()
    res: dict[str, dict[str, float]] = {"float32": {}, "int8": {}}

    def keep(side: str, key: str, value: float) -> None:
        res[side][key] = max(res[side].get(key, 0.0), value)

    for name, (eng, _) in engines.items():
        run_ours(eng, sets[min(args.concurrency)][:1], 4)  # settle
    for rnd in range(args.rounds):
        for name, (eng, eng_pf) in engines.items():
            for b in args.concurrency:
                ps = sets[b]
                if b > 8:
                    dt, _, ntok = run_ours(eng, ps, nt, stagger=args.stagger)
                    keep(name, f"tput{b}", ntok / dt)
                    continue
                t1 = min(run_ours(eng, ps, 1)[0] for _ in range(2))
                dt = run_ours(eng, ps, nt)[0]
                keep(name, f"tput{b}", b * (nt - 1) / (dt - t1))
            keep(name, "prefill", pf / min(run_ours(eng_pf, pp, 1)[0] for _ in range(2)))
            print(f"#   [{rnd}] {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res[name].items()), flush=True)
    shares = []
    one = sets[min(args.concurrency)][:1]
    eng_q = engines["int8"][0]
    for rnd in range(args.share_rounds):
        before = readers.sustained()
        t1 = min(run_ours(eng_q, one, 1)[0] for _ in range(2))
        tps = (nt - 1) / (run_ours(eng_q, one, nt)[0] - t1)
        after = readers.sustained()
        shares.append(tps * q8_bytes / ((before + after) / 2))
        print(f"#   [{rnd}] int8 batch-1 {tps:.1f} tok/s between {before / 1e9:.1f} and {after / 1e9:.1f} GB/s: "
              f"{100 * shares[-1]:.0f}% of the int8 ceiling", flush=True)
    burst = readers.burst()
    readers.close()
    sp = SamplingParams(max_tokens=min(16, nt), temperature=0.0, ignore_eos=True)
    outs = {name: eng.submit(one[0], sp).result()[0].token_ids for name, (eng, _) in engines.items()}
    for eng, eng_pf in engines.values():
        eng.stop()
        eng_pf.stop()

    print()
    rows = [("decode tok/s, 1 seq", "tput1"), ("decode tok/s, 8 seqs", "tput8"),
            (f"tok/s, 32 seqs (continuous, staggered {args.stagger}s)", "tput32"),
            (f"prefill tok/s, {pf}-token prompt", "prefill")]
    print(f"| {'metric':<48} | {'float32':>9} | {'int8':>9} | {'int8/f32':>8} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for label, key in rows:
        if key in res["int8"]:
            f, q = res["float32"][key], res["int8"][key]
            print(f"| {label:<48} | {f:>9.1f} | {q:>9.1f} | {q / f:>7.2f}x |")
    print()
    b1 = res["int8"].get("tput1", 0.0)
    print(f"int8 batch-1 ceiling (read bandwidth / {q8_bytes / 1e6:.0f} MB) and the share reached at {b1:.1f} tok/s:")
    for k, v in burst.items():
        print(f"  {k:<24} {v / 1e9:6.1f} GB/s (burst) -> ceiling {v / q8_bytes:6.1f} tok/s -> "
              f"{100 * b1 * q8_bytes / v:5.0f}%")
    if shares:
        print(f"  share of the sustained bandwidth around each int8 batch-1 decode: median "
              f"{100 * statistics.median(shares):.0f}% (rounds: {', '.join(f'{100 * s:.0f}%' for s in shares)})")
    same = sum(a == b for a, b in zip(outs["int8"], outs["float32"]))
    print(f"greedy tokens, int8 vs float32 on a {len(outs['int8'])}-token check: {same} identical")
    print(f"XLA compilations while the engines served (after warm-up): {ENGINE_COMPILES[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
