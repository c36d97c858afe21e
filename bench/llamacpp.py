"""llama.cpp (Q8_0 and F32) against our int8 engine on the engine benchmark's GPT-2-small.

    python -m bench.llamacpp --work /work/llama --setup   # pip download + cmake build, then the rest
    python -m bench.llamacpp --work /work/llama           # build already in WORK/build
    python -m bench.llamacpp --work /work/llama --no-ours # llama.cpp only

Steps (each skipped when its output exists):

1. `--setup`: the llama-cpp-python sdist from PyPI (`pip download --no-deps --no-binary :all:`),
   which vendors llama.cpp under vendor/llama.cpp, unpacked in WORK; its tools built CPU-only
   (`-DGGML_NATIVE=ON`, Release; llama-bench, llama-batched-bench, llama-quantize) in WORK/build
   with `nice -n 19` and `-j2`.
2. The exact weights `bench.engine --model gpt2-int8` serves (`base.random_params(seed=0)`, as
   transformers' GPT2LMHeadModel, tied head) saved with `save_pretrained` in WORK/gpt2-rand with the
   synthetic 50257-token tokenizer; llama.cpp's convert_hf_to_gguf.py (with its own gguf-py) writes
   an F32 GGUF (its BPE pre-tokenizer check is told "gpt-2": the synthetic tokenizer has no known
   hash and the benchmarks never tokenize), `llama-quantize` a Q8_0 one.
3. `llama-bench` (decode of `--new-tokens` at batch 1 after a `--prompt-tokens` context `-d`, and a
   `--prefill-tokens` prefill) and `llama-batched-bench` (1/8/32 sequences, `--prompt-tokens`
   prompts, `--new-tokens` each), `--threads` threads, both files; then (unless `--no-ours`)
   `python -m bench.engine --model gpt2-int8 --stagger 0 --share-rounds 0` with the same sizes
   (all 32 sequences submitted at once, as llama-batched-bench starts them), printed as it runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
#: convert_hf_to_gguf.py, with the BPE pre-tokenizer check answered "gpt-2" (argv: script, args...).
CONVERT = """import sys, runpy
sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0])
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def sh(*cmd: str, **kw) -> str:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def setup(work: Path) -> Path:
    """Download and build llama.cpp from the llama-cpp-python sdist; returns its source dir."""
    if not glob.glob(str(work / "dl" / "llama_cpp_python-*.tar.gz")):
        sh(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "llama-cpp-python", "-d", str(work / "dl"))
    src = source_dir(work)
    if src is None:
        sh("tar", "xzf", sorted(glob.glob(str(work / "dl" / "llama_cpp_python-*.tar.gz")))[-1], "-C", str(work))
        src = source_dir(work)
    assert src is not None
    if not all((work / "build" / "bin" / t).exists() for t in TOOLS):
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        sh("nice", "-n", "19", "cmake", "-S", str(src), "-B", str(work / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
           "-DBUILD_SHARED_LIBS=OFF")
        sh("nice", "-n", "19", "cmake", "--build", str(work / "build"), "-j2", "--target", *TOOLS)
    return src


def source_dir(work: Path) -> Path | None:
    found = sorted(glob.glob(str(work / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    return Path(found[-1]) if found else None


def make_gguf(work: Path, src: Path, build: Path) -> dict[str, Path]:
    """The engine benchmark's random GPT-2 small as F32 and Q8_0 GGUF files."""
    hf_dir, f32, q8 = work / "gpt2-rand", work / "gpt2-rand-f32.gguf", work / "gpt2-rand-q8_0.gguf"
    if not (hf_dir / "config.json").exists():
        from bench.engine import gpt2_small_spec, synthetic_tokenizer, torch_model
        from model_server.models import base

        spec = gpt2_small_spec()
        torch_model(spec, base.random_params(spec, seed=0, dtype="float32")).save_pretrained(hf_dir)
        synthetic_tokenizer().save_pretrained(hf_dir)
        cfg = json.loads((hf_dir / "config.json").read_text())  # the converter reads n_ctx, which
        cfg["n_ctx"] = cfg["n_positions"]  # transformers 5 no longer writes
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if not f32.exists():
        sh(sys.executable, "-c", CONVERT, str(src / "convert_hf_to_gguf.py"), str(hf_dir),
           "--outtype", "f32", "--outfile", str(f32), env={**os.environ, "TQDM_DISABLE": "1"})
    if not q8.exists():
        sh(str(build / "bin" / "llama-quantize"), str(f32), str(q8), "Q8_0")
    return {"F32": f32, "Q8_0": q8}


def llama_figures(build: Path, path: Path, args) -> dict[str, float]:
    """llama-bench's decode and prefill tok/s and llama-batched-bench's 1/8/32-sequence figures."""
    t = str(args.threads)
    out = json.loads(sh(str(build / "bin" / "llama-bench"), "-m", str(path), "-t", t, "-r", str(args.reps),
                        "-p", str(args.prefill_tokens), "-n", str(args.new_tokens),
                        "-d", f"0,{args.prompt_tokens}", "-o", "json"))
    res = {}
    for r in out:
        if r["n_gen"] and r["n_depth"] == args.prompt_tokens:
            res["llama-bench tg, batch 1"] = r["avg_ts"]
        if r["n_prompt"] and not r["n_depth"]:
            res[f"llama-bench pp{args.prefill_tokens}"] = r["avg_ts"]
    npl = ",".join(map(str, args.concurrency))
    ctx = max(args.concurrency) * (args.prompt_tokens + args.new_tokens)
    for line in sh(str(build / "bin" / "llama-batched-bench"), "-m", str(path), "-t", t, "-tb", t,
                   "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(args.prompt_tokens),
                   "-ntg", str(args.new_tokens), "-npl", npl, "--output-format", "jsonl").splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            res[f"batched {r['pl']} seqs: S_TG"] = r["speed_tg"]
            res[f"batched {r['pl']} seqs: generated / total"] = r["pl"] * r["tg"] / r["t"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the sdist, build and model files live")
    ap.add_argument("--setup", action="store_true", help="download and build llama.cpp in WORK first")
    ap.add_argument("--build", type=Path, help="llama.cpp build dir (default WORK/build)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-ours", action="store_true")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = setup(work) if args.setup else source_dir(work)
    if src is None:
        ap.error(f"no llama.cpp sources under {work} (run with --setup)")
    build = (args.build or work / "build").resolve()
    missing = [t for t in TOOLS if not (build / "bin" / t).exists()]
    if missing:
        ap.error(f"{', '.join(missing)} not in {build}/bin (build them: --setup, or pass --build)")
    commit = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %cs"], text=True,
                            capture_output=True).stdout.strip() or "unknown"
    print(f"# llama.cpp {src.parent.parent.name} (vendored commit {commit}), {args.threads} threads", flush=True)
    files = make_gguf(work, src, build)
    table = {name: llama_figures(build, path, args) for name, path in files.items()}
    print(f"\n| llama.cpp metric (tok/s) | {' | '.join(table)} |\n|---|{'---|' * len(table)}")
    for key in table["Q8_0"]:
        print(f"| {key} | " + " | ".join(f"{t.get(key, float('nan')):.1f}" for t in table.values()) + " |")
    if not args.no_ours:
        print("\n# ours: python -m bench.engine --model gpt2-int8", flush=True)
        sizes = ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                 "--prefill-tokens", str(args.prefill_tokens), "--concurrency", *map(str, args.concurrency)]
        subprocess.run([sys.executable, "-m", "bench.engine", "--model", "gpt2-int8", "--stagger", "0",
                        "--share-rounds", "0", *sizes], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
