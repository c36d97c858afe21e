"""Token-mask cost of xgrammar and llguidance on this CPU: one step of 32 rows.

Builds a byte-level BPE tokenizer (`--vocab` tokens, trained with `tokenizers` on Python's
standard-library sources: no hub is reachable) wrapped as a Hugging Face tokenizer, compiles
one JSON schema with each library, then walks 32 matchers through random allowed tokens and
times, per step, filling the packed [32, ceil(V/32)] int32 bitmask (the batch call each
library offers, with its own threads) and accepting one token per row.

    python -m bench.guided_masks [--vocab 32000] [--steps 40]
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
        "role": {"enum": ["user", "staff", "owner"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "admin", "role", "tags", "address"],
    "additionalProperties": False,
}


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _walk(rows: int, steps: int, fill, accept, reset, vocab: int, seed: int = 0) -> list[float]:
    """Per-step seconds of fill + accept over `rows` matchers; a finished row starts over."""
    rng = np.random.default_rng(seed)
    words = (vocab + 31) // 32
    mask = np.zeros((rows, words), np.int32)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill(mask)
        t1 = time.perf_counter()
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        toks = [int(rng.choice(np.flatnonzero(bits[r]))) for r in range(rows)]
        t2 = time.perf_counter()
        accept(toks)
        times.append((t1 - t0) + (time.perf_counter() - t2))  # the token choice is not counted
        reset()
    return times


def bench_xgrammar(hf, rows: int, steps: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    comp = xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1)
    t0 = time.perf_counter()
    cg = comp.compile_json_schema(SCHEMA, any_whitespace=False)
    compile_s = time.perf_counter() - t0
    ms = [xgr.GrammarMatcher(cg) for _ in range(rows)]
    batch = xgr.BatchGrammarMatcher(os.cpu_count() or 1)

    def fill(mask):
        batch.batch_fill_next_token_bitmask(ms, mask)

    def accept(toks):
        for m, t in zip(ms, toks):
            assert m.accept_token(t)

    def reset():
        for m in ms:
            if m.is_terminated():
                m.reset()

    return compile_s, _walk(rows, steps, fill, accept, reset, len(hf))


def bench_llguidance(hf, rows: int, steps: int):
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lln

    lt = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
    t0 = time.perf_counter()
    g = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    ms = [llguidance.LLMatcher(lt, g) for _ in range(rows)]
    ms[0].compute_bitmask()  # the lazy lexer build happens on first use
    compile_s = time.perf_counter() - t0
    ex = llguidance.LLExecutor(os.cpu_count() or 1)

    def fill(mask):
        lln.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], mask)

    def accept(toks):
        for m, t in zip(ms, toks):
            assert m.consume_token(t), m.get_error()

    def reset():
        for m in ms:
            if m.is_stopped():
                m.reset()

    return compile_s, _walk(rows, steps, fill, accept, reset, len(hf))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    hf = build_tokenizer(a.vocab)
    print(f"tokenizer: byte-level BPE, {len(hf)} tokens, trained in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        compile_s, times = fn(hf, a.rows, a.steps)
        steady = times[2:]
        print(f"{name:11s} compile+first {compile_s * 1e3:7.1f} ms | step ({a.rows} rows, fill+accept, "
              f"random walk) median {statistics.median(steady) * 1e3:6.2f} ms  p90 "
              f"{np.percentile(steady, 90) * 1e3:6.2f} ms  max {max(steady) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
