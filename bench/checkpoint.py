"""Checkpoint load benchmark: a Hugging Face directory against its Orbax conversion.

    python -m bench.checkpoint              # three cases, warm and cold page cache (~2 minutes)
    python -m bench.checkpoint --rounds 7
    python -m bench.checkpoint --small      # tiny models: checks the bench itself

Times what the model server does to get a model's weights: `open_checkpoint` then
`load_params` until the arrays are ready (the engine's warm-up compilation follows either way
and is not counted). Cases, random weights written the way real checkpoints are:

* ``gpt2 fp32``: GPT-2 small, stored float32 in GPT-2's Conv1D layout ([in, out] weights and a
  fused qkv), which every HF load transposes and splits; served float32.
* ``llama bf16->fp32``: a 156M-parameter Llama (GQA, untied) stored in bfloat16, as published
  Llama and Qwen2 checkpoints are, served in float32, the CPU default.
* ``llama bf16``: the same served in bfloat16 (the accelerators' default): nothing to convert.

Each Orbax checkpoint is written by `model_server.convert` in the serving dtype. Warm: the
files in the page cache (a model reloaded on the same host). Cold: the page cache dropped
before every load (``/proc/sys/vm/drop_caches``; needs root, skipped otherwise). Rounds
alternate the formats; the median and the best of the rounds are printed, and every Orbax
load is checked to give the same arrays as the HF one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _specs(small: bool) -> dict[str, Any]:
    from model_server.models import base

    from bench.engine import gpt2_small_spec

    gpt2 = gpt2_small_spec()
    llama = base.ModelSpec(
        family="llama", model_type="llama", architecture="LlamaForCausalLM", vocab_size=32000,
        hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
        intermediate_size=2816, max_position_embeddings=2048, eos_token_ids=(2,))
    if small:
        shrink = dict(vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128,
                      max_position_embeddings=128)
        gpt2 = dataclasses.replace(gpt2, num_heads=4, num_kv_heads=4, head_dim=16, **shrink)
        llama = dataclasses.replace(llama, num_heads=4, num_kv_heads=2, head_dim=16, **shrink)
    return {"gpt2": gpt2, "llama": llama}


def write_hf(out: Path, spec, store_dtype: str) -> Path:
    """Random weights as an HF directory, stored in `store_dtype`."""
    from model_server import checkpoint as ck
    from model_server.models import base

    config = {**base.hf_config_of(spec), "dtype": store_dtype}
    return ck.save_hf(out, spec, base.random_params(spec, seed=0), config, dtype=store_dtype)


def drop_page_cache() -> bool:
    """Drop the clean page cache (root only); False where it is not permitted."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed_load(path: Path, dtype: str, before: Callable[[], object] = lambda: None) -> tuple[float, Any]:
    import jax

    from model_server import checkpoint as ck

    before()
    t0 = time.perf_counter()
    params = ck.load_params(ck.open_checkpoint(str(path)), dtype)
    jax.block_until_ready(params)
    return time.perf_counter() - t0, params


def same_arrays(a: Any, b: Any) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def run(root: Path, rounds: int, small: bool, cold: bool) -> list[dict]:
    from model_server import convert
    from model_server.models import base

    specs = _specs(small)
    cases = [("gpt2 fp32", "gpt2", "float32", "float32"),
             ("llama bf16->fp32", "llama", "bfloat16", "float32"),
             ("llama bf16", "llama", "bfloat16", "bfloat16")]
    rows = []
    for name, model, stored, served in cases:
        spec = specs[model]
        hf = root / f"{model}-{stored}"
        if not hf.exists():
            write_hf(hf, spec, stored)
        orbax = root / f"{model}-{stored}-orbax-{served}"
        t0 = time.perf_counter()
        convert.convert(str(hf), str(orbax), served)
        converted = time.perf_counter() - t0
        times: dict[str, dict[str, list[float]]] = {"warm": {"hf": [], "orbax": []}, "cold": {"hf": [], "orbax": []}}
        modes = ["warm"] + (["cold"] if cold else [])
        for _ in range(rounds):
            for mode in modes:
                before = drop_page_cache if mode == "cold" else (lambda: None)
                dt_hf, p_hf = timed_load(hf, served, before)
                dt_ob, p_ob = timed_load(orbax, served, before)
                if not same_arrays(p_hf, p_ob):
                    raise SystemExit(f"{name}: the Orbax checkpoint does not hold the HF weights")
                del p_hf, p_ob
                times[mode]["hf"].append(dt_hf)
                times[mode]["orbax"].append(dt_ob)
        rows.append({"case": name, "params_m": base.param_count(spec) / 1e6,
                     "mb": base.param_bytes(spec, served) / 1e6,
                     "hf_mb": sum(f.stat().st_size for f in hf.iterdir()) / 1e6,
                     "orbax_mb": sum(f.stat().st_size for f in orbax.rglob("*") if f.is_file()) / 1e6,
                     "convert_s": converted, "times": {m: t for m, t in times.items() if t["hf"]}})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| case | mode | HF load (s) | Orbax load (s) | HF / Orbax |",
             "|---|---|---|---|---|"]
    for row in rows:
        for mode, t in row["times"].items():
            hf, ob = statistics.median(t["hf"]), statistics.median(t["orbax"])
            lines.append(f"| {row['case']} ({row['mb']:.0f} MB served) | {mode} | {hf:.3f} (best {min(t['hf']):.3f}) "
                         f"| {ob:.3f} (best {min(t['orbax']):.3f}) | {hf / ob:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny models (checks the bench, not the speed)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold page-cache loads")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args(argv)
    cold = not args.no_cold and drop_page_cache()
    if not args.no_cold and not cold:
        print("# cold loads skipped: dropping the page cache needs root", flush=True)
    with tempfile.TemporaryDirectory(prefix="saxplane-bench-ckpt-", dir=args.dir) as tmp:
        rows = run(Path(tmp), args.rounds, args.small, cold)
    for row in rows:
        print(f"# {row['case']}: {row['params_m']:.1f}M params; HF {row['hf_mb']:.0f} MB on disk, Orbax "
              f"{row['orbax_mb']:.0f} MB; conversion {row['convert_s']:.1f}s", flush=True)
    print(format_table(rows))
    print(f"# {os.cpu_count()} CPUs; {args.rounds} alternating rounds, median (best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
