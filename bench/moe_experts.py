"""The two ways `model_server.models.experts` computes a sparse MoE layer, timed side by side.

    python -m bench.moe_experts               # Qwen3-MoE bench shape: 128 experts, top 8
    python -m bench.moe_experts --rows 1 8 32 512

One layer's experts (router, gate, up, down) on random float32 weights of bench.engine's
Qwen3-MoE row (hidden 512, moe_intermediate 192), jitted once per row count; per row count
the median of several calls of each path, interleaved so that both see the same load of a
shared machine. Decode steps are 1, 8 and 32 rows; prefill chunks the larger counts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from model_server.models import experts as X

    e, d, i = args.experts, args.hidden, args.intermediate
    rng = np.random.default_rng(0)
    router = jnp.asarray(rng.standard_normal((e, d), np.float32))
    gate = jnp.asarray(rng.standard_normal((e, i, d), np.float32) / np.sqrt(d))
    up = jnp.asarray(rng.standard_normal((e, i, d), np.float32) / np.sqrt(d))
    down = jnp.asarray(rng.standard_normal((e, d, i), np.float32) / np.sqrt(i))
    jitted = {impl: jax.jit(lambda h, *w, impl=impl: X.moe_mlp(h, *w, args.top_k, True, jax.nn.silu, impl))
              for impl in ("grouped", "dense")}
    fns = {k: (lambda h, f=f: f(h, router, gate, up, down)) for k, f in jitted.items()}
    print(f"experts {e}, top {args.top_k}, hidden {d}, moe_intermediate {i}, float32; "
          f"ms per layer (median of {args.repeats})")
    print(f"{'rows':>6} {'grouped':>10} {'dense':>10} {'dense/grouped':>14}")
    for n in args.rows:
        h = jnp.asarray(rng.standard_normal((n, d), np.float32))
        outs = {k: f(h).block_until_ready() for k, f in fns.items()}
        np.testing.assert_allclose(np.asarray(outs["grouped"]), np.asarray(outs["dense"]), atol=2e-4, rtol=1e-4)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(h).block_until_ready()
                times[k].append((time.perf_counter() - t0) * 1e3)
        g, dn = statistics.median(times["grouped"]), statistics.median(times["dense"])
        print(f"{n:>6} {g:>10.2f} {dn:>10.2f} {dn / g:>13.1f}x", flush=True)


if __name__ == "__main__":
    main()
