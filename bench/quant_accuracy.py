"""int8 weights against float32 on the parity checkpoints of every family (a table, not a test).

    python -m bench.quant_accuracy [--prompts 16] [--new-tokens 16]

The checkpoints are those tests/model_server/test_parity.py checks against transformers
(random weights, built with transformers' PyTorch classes by the test fixtures) and the MoE
ones of tests/moe_checkpoints.py. For each: the float32 params and the same checkpoint loaded
with `quantization: int8`; random prompts of 24 tokens;

* greedy agreement: the share of prompts whose greedy continuation (`--new-tokens`) is
  identical, and the share of generated tokens before the first difference;
* prompt logprobs: mean |logp_int8 - logp_f32| of every prompt token after the first (the
  `echo` / scoring figure), and the same for the float32 model's top token at each position;
* next-token agreement over the prompts (teacher-forced: the same context for both), and the
  float32 model's median margin between its top two logprobs: random weights give nearly flat
  distributions (small margins), where a greedy continuation diverges after one flip.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile

import numpy as np

PROMPT_LEN, WIDTH = 24, 48


class _Dirs:
    """A stand-in for pytest's tmp_path_factory."""

    def __init__(self) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="quant_acc_"))

    def mktemp(self, name: str) -> pathlib.Path:
        path = pathlib.Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


def checkpoints() -> dict[str, pathlib.Path]:
    """{name: saved HF directory} of the parity and MoE checkpoints."""
    from tests import moe_checkpoints
    from tests.model_server import conftest

    dirs = _Dirs()
    tok = conftest.tokenizer_dir.__wrapped__(dirs)
    out = {name: path for name, (_, path) in conftest.torch_models.__wrapped__(dirs, tok).items()}
    for name in moe_checkpoints.configs():
        out[name] = moe_checkpoints.build(name, dirs.mktemp(name))[1]
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def measure(path: pathlib.Path, prompts: int, new_tokens: int) -> dict[str, float]:
    import jax

    from model_server import checkpoint as ck
    from model_server.models import base

    ckpt, f32 = ck.load_checkpoint(path, "float32")
    q8 = ck.load_params(ckpt, "float32", quantization="int8")
    spec = ckpt.spec
    fwd = jax.jit(functools.partial(base.forward, spec, cache=None, block_tables=None))
    rng = np.random.default_rng(11)
    start = rng.integers(1, spec.vocab_size, (prompts, PROMPT_LEN)).astype(np.int32)
    positions = np.tile(np.arange(WIDTH, dtype=np.int32), (prompts, 1))
    runs = {}
    for name, params in (("f32", f32), ("int8", q8)):
        tokens = np.zeros((prompts, WIDTH), np.int32)
        tokens[:, :PROMPT_LEN] = start
        first = None
        for i in range(new_tokens):
            logits = np.asarray(fwd(params, tokens, positions)[0], np.float64)
            if first is None:
                first = logits[:, :PROMPT_LEN]
            tokens[:, PROMPT_LEN + i] = logits[:, PROMPT_LEN + i - 1].argmax(-1)
        runs[name] = (tokens[:, PROMPT_LEN:PROMPT_LEN + new_tokens], log_softmax(first))
    (g_f, lp_f), (g_q, lp_q) = runs["f32"], runs["int8"]
    same = (g_f == g_q)
    prefix = np.where(same.all(1), new_tokens, same.argmin(1))
    targets = start[:, 1:]
    take = lambda lp, t: np.take_along_axis(lp[:, :-1], t[..., None], -1)[..., 0]  # noqa: E731
    top = lp_f[:, :-1].argmax(-1)
    srt = np.sort(lp_f, -1)
    return {"identical": float(same.all(1).mean()), "prefix": float(prefix.mean() / new_tokens),
            "next": float((lp_q.argmax(-1) == lp_f.argmax(-1)).mean()),
            "margin": float(np.median(srt[..., -1] - srt[..., -2])),
            "lp": float(np.abs(take(lp_q, targets) - take(lp_f, targets)).mean()),
            "lp_top": float(np.abs(take(lp_q, top) - take(lp_f, top)).mean()),
            "arch": spec.architecture}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    assert args.new_tokens <= WIDTH - PROMPT_LEN
    rows = {name: measure(path, args.prompts, args.new_tokens) for name, path in checkpoints().items()}
    print(f"| checkpoint | architecture | greedy identical ({args.prompts} prompts, {args.new_tokens} tokens) "
          f"| tokens before the first difference | next-token agreement (teacher-forced) "
          f"| mean abs prompt-logprob diff | same, f32's top token | f32 median top-2 margin |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['arch']} | {100 * r['identical']:.0f}% | {100 * r['prefix']:.0f}% | "
              f"{100 * r['next']:.1f}% | {r['lp']:.4f} | {r['lp_top']:.4f} | {r['margin']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
