"""The int8 products of a GPT-2-small decode step, float form vs int16 activations
(`python -m bench.q8_gemv [--rows 8]`).

49 products (12 layers x qkv 2304x768, wo 768x768, fc 3072x768, proj 768x3072, and the
50257x768 vocabulary projection; 127 MB of int8 weights), each its own `kernels.matmul_q8`
call as in a decode step, timed with SAX_Q8_A16=0 (sign-extend, convert, FMA per 16 weights)
and =1 (int16 activations, `vpdpwssd` per 32 weights, AVX512-VNNI) in alternation; prints the
best and median ms and the GB/s of int8 weights at the best.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (a decode step's sequences, 1-8)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--alternations", type=int, default=2)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from model_server import kernels
    from model_server.models import quant

    rng = np.random.default_rng(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    ws = []
    for s in shapes:
        w = quant.quantize_array(rng.standard_normal(s).astype(np.float32) * 0.02)
        ws.append(quant.QTensor(jnp.asarray(w.q), jnp.asarray(w.scale)))
    xs = {k: jnp.asarray(rng.standard_normal((args.rows, k)).astype(np.float32)) for k in (768, 3072)}

    def chain(xs, ws):
        return [kernels.matmul_q8(xs[w.q.shape[1]], w)[0] for w in ws]

    weight_bytes = sum(int(np.prod(s)) for s in shapes)
    print(f"# {len(shapes)} products of {args.rows} row(s), {weight_bytes / 1e6:.0f} MB int8; VNNI form available: "
          f"{kernels.q8_a16()}; load average {os.getloadavg()[0]:.1f}")
    for _ in range(args.alternations):
        for flag in ("0", "1"):
            os.environ[kernels.ENV_Q8_A16] = flag
            f = jax.jit(lambda xs, ws: chain(xs, ws))  # a new function: traced with this flag
            jax.block_until_ready(f(xs, ws))
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                jax.block_until_ready(f(xs, ws))
                ts.append(time.perf_counter() - t)
            best = min(ts)
            print(f"SAX_Q8_A16={flag}: best {best * 1e3:.2f} ms, median {np.median(ts) * 1e3:.2f} ms, "
                  f"{weight_bytes / best / 1e9:.1f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
