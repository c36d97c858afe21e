"""The cache-free passes over a whole prompt: scoring (every prompt token's logprob and top
logprobs) and embedding (the mean-pooled final hidden state). Pure functions for `jit`; the
engine's `Programs` compiles them for every bucket."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from model_server.models import base

F32 = jnp.float32
#: Longest stretch of a scoring pass projected to the vocabulary at once.
SCORE_CHUNK = 256


def score_chunk(t: int) -> int:
    """The largest divisor of `t` up to SCORE_CHUNK (the pass's logits are built that many
    positions at a time)."""
    if t <= SCORE_CHUNK:
        return t
    for c in range(SCORE_CHUNK, 0, -1):
        if t % c == 0:
            return c
    return t


def score_fn(spec: base.ModelSpec, t: int, b: int, k: int, lora_of: Callable[[Any, Any], Any]) -> Callable:
    """`score(params, lora, tokens [b, t], want_top, adapters)` -> chosen [b, t], top ids and
    logprobs [b, t, k] (of token j + 1 given tokens ..j; the top ones only when `want_top`)."""
    hidden_fn = base.make_hidden_fn(spec)
    chunk = score_chunk(t)

    def score(params, lora, tokens, want_top, adapters):
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        hidden, _ = hidden_fn(params, tokens, positions, None, None, lora=lora_of(lora, adapters))
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
        nc = t // chunk
        hs = hidden.reshape(b, nc, chunk, -1).swapaxes(0, 1)
        ts = targets.reshape(b, nc, chunk).swapaxes(0, 1)

        def one(args):
            h, tg = args
            lg = base.logits_from_hidden(spec, params, h)  # [b, chunk, V] f32
            lse = jax.nn.logsumexp(lg, axis=-1)
            chosen = jnp.take_along_axis(lg, tg[..., None], axis=-1)[..., 0] - lse

            def top():
                tv, ti = lax.top_k(lg, k)
                return ti.astype(jnp.int32), tv - lse[..., None]

            ti, tl = lax.cond(want_top, top, lambda: (jnp.zeros((b, chunk, k), jnp.int32),
                                                      jnp.zeros((b, chunk, k), F32)))
            return chosen, ti, tl

        chosen, ti, tl = lax.map(one, (hs, ts))
        return (chosen.swapaxes(0, 1).reshape(b, t), ti.swapaxes(0, 1).reshape(b, t, k),
                tl.swapaxes(0, 1).reshape(b, t, k))

    return score


def embed_fn(spec: base.ModelSpec, t: int, lora_of: Callable[[Any, Any], Any]) -> Callable:
    """`embed(params, lora, tokens [1, t], lens [1], adapters)` -> the mean final hidden state
    of the first `lens` positions."""
    hidden_fn = base.make_hidden_fn(spec)

    def embed(params, lora, tokens, lens, adapters):
        positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        hidden, _ = hidden_fn(params, tokens, positions, None, None, lora=lora_of(lora, adapters))
        mask = (positions < lens[:, None]).astype(F32)[..., None]
        return (jnp.sum(hidden.astype(F32) * mask, axis=1) / lens[:, None].astype(F32))[0]

    return embed
