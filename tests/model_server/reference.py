"""The reference the model-layer tests hold the engine and the forward contract against: a
cache-free `base.forward` over the whole sequence at every step, in float64 on the host."""
from __future__ import annotations

import functools

import jax
import numpy as np

from model_server.models import base


@functools.lru_cache(maxsize=None)
def _forward(spec):  # type: ignore[no-untyped-def]
    return jax.jit(base.make_forward(spec))


def full_logits(model, seq, *, pad: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Cache-free logits [len(seq), V], float64 (padded to `pad` tokens: one compile serves all)."""
    toks = np.zeros((1, pad), np.int32)
    toks[0, :len(seq)] = seq
    logits, _ = _forward(model.spec)(model.params, toks, np.arange(pad, dtype=np.int32)[None], None, None)
    return np.asarray(logits[0, :len(seq)], np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_greedy(model, prompt, n, *, pad: int, presence=0.0, frequency=0.0, repetition=1.0,  # type: ignore[no-untyped-def]
               bias=None):
    """Greedy tokens with vLLM's penalty semantics, and the raw logits of every step."""
    v = model.spec.vocab_size
    seq, out, steps = list(prompt), [], []
    counts = np.zeros(v)
    in_prompt = np.zeros(v, bool)
    in_prompt[list(prompt)] = True
    for _ in range(n):
        raw = full_logits(model, seq, pad=pad)[-1]
        steps.append(raw)
        lg = raw.copy()
        for t, b in (bias or {}).items():
            lg[t] += b
        seen = counts > 0
        lg = np.where((seen | in_prompt) & (repetition != 1), np.where(lg > 0, lg / repetition, lg * repetition), lg)
        lg = lg - frequency * counts - presence * seen
        tok = int(np.argmax(lg))
        out.append(tok)
        counts[tok] += 1
        seq.append(tok)
    return out, steps


def prompt_of(model, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return model.tokenizer.encode(text, add_special_tokens=False)
