"""The engine's device programs: pure functions, compiled ahead of time for every shape.

* ``prefill[(T, B)]``: write the KV of B prompts (padded to bucket T) into their slots, set the
  slots' device state (last prompt token and its position, fresh counts, prompt mask) and
  return the last prompt token's logits (padded to the most rows any prefill takes).
* ``first``: sample the first token of the prefilled slots from those logits (same sampling
  code and counters as a decode step, under the rows' token bitmask) and advance their state.
* ``decode[(B, K)]``: one token for B rows of slots (B == num_slots: all slots, no gather;
  smaller B: the rows' cache is gathered, worth it while few slots are busy), reading and
  writing only the first K blocks of the KV cache (the engine picks the fewest that hold every
  row's position): forward + sampling + logprobs in one call; the cache and state are donated.
* ``forward[K]`` and ``guided``: the decode step of all slots split in two for batches with
  a grammar-guided row: the forward pass (its logits stay on the device) runs while the host
  fills the rows' token bitmask from the previous step's tokens; ``guided`` then samples
  under that mask ([num_slots, ceil(V/32)] int32) and advances the state. Batches without a
  grammar never run these.
* ``copy``: copy one slot's KV cache and prompt to another (n > 1 samples share one prefill;
  the copy samples its own first token in the next decode step by re-feeding the last prompt
  token).
* ``score[(T, B)]``: cache-free pass returning every prompt token's logprob and top logprobs.
* ``embed[T]``: mean-pooled final hidden state.

Everything is lowered and compiled in `compile_all` (warm-up); the engine calls the compiled
executables only, so a steady-state call can never compile anything.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from model_server.engine import guided, sampling
from model_server.engine.types import MAX_LOGIT_BIAS, MAX_LOGPROBS
from model_server.models import base, layers

log = logging.getLogger(__name__)

F32 = jnp.float32
#: Padded prompt tokens per batched prefill / scoring call; rows = clamp(this // T, 1, 8).
ROW_TOKENS = 256
MAX_ROWS = 8
#: Longest stretch of a scoring pass projected to the vocabulary at once.
SCORE_CHUNK = 256


def rows_for(bucket: int, cap: int) -> int:
    return max(1, min(MAX_ROWS, cap, ROW_TOKENS // bucket))


def default_decode_buckets(num_slots: int) -> list[int]:
    """Row counts of the gathered decode variants (plus num_slots itself).

    A gathered row copies its slot's cache (gather) before attending to it, a full step reads
    every slot once and computes every row; measured on CPU, gathering pays up to about half
    of the slots.
    """
    out, b = [], 1
    while 2 * b <= num_slots:
        out.append(b)
        b *= 2
    return out + [num_slots]


def kv_block_variants(blocks: int) -> list[int]:
    """Cache-block counts the decode programs are compiled for: powers of two and all of them."""
    out, k = [], 1
    while k < blocks:
        out.append(k)
        k *= 2
    return out + [blocks]


def _score_chunk(t: int) -> int:
    if t <= SCORE_CHUNK:
        return t
    for c in range(SCORE_CHUNK, 0, -1):
        if t % c == 0:
            return c
    return t


class Programs:
    """Builds the step functions for one model/config and holds their compiled executables."""

    def __init__(self, spec: base.ModelSpec, *, num_slots: int, max_seq_len: int,
                 buckets: list[int], decode_buckets: list[int], mesh: jax.sharding.Mesh,
                 cache_sharding: NamedSharding):
        self.spec = spec
        self.n = num_slots
        self.s = max_seq_len
        self.v = spec.vocab_size
        self.buckets = buckets
        self.decode_buckets = decode_buckets
        self.mesh = mesh
        self.rep = NamedSharding(mesh, P())
        self.cache_sharding = cache_sharding
        self.prefill: dict[tuple[int, int], Any] = {}
        self.decode: dict[tuple[int, int], Any] = {}
        self.kv_variants = kv_block_variants(len(layers.kv_block_sizes(max_seq_len)))
        self.score: dict[tuple[int, int], Any] = {}
        self.embed: dict[int, Any] = {}
        self.forward: dict[int, Any] = {}
        self.guided: Any = None
        self.copy: Any = None
        self.first: Any = None
        self.mask_words = guided.words_for(self.v)
        self.k = min(MAX_LOGPROBS, self.v)
        #: rows of the first-token program: the most prompts one prefill call takes
        self.first_rows = max(max(self.prefill_rows(t)) for t in buckets)

    # ------------------------------------------------------------------ variants

    def prefill_rows(self, t: int) -> list[int]:
        r = rows_for(t, self.n)
        return [1] if r == 1 else [1, r]

    def score_rows(self, t: int) -> list[int]:
        r = rows_for(t, MAX_ROWS)
        return [1] if r == 1 else [1, r]

    # ------------------------------------------------------------------ state

    def init_state(self) -> dict:
        n, v = self.n, self.v
        make = jax.jit(lambda: {
            "tokens": jnp.zeros((n,), jnp.int32), "positions": jnp.zeros((n,), jnp.int32),
            "counts": jnp.zeros((n, v), jnp.int32), "prompt_mask": jnp.zeros((n, v), jnp.bool_)},
            out_shardings=self.rep)
        return make()

    def host_slot_params(self) -> dict[str, np.ndarray]:
        n = self.n
        return {
            "active": np.zeros((n,), np.bool_), "temperature": np.zeros((n,), np.float32),
            "top_k": np.zeros((n,), np.int32), "top_p": np.ones((n,), np.float32),
            "presence": np.zeros((n,), np.float32), "frequency": np.zeros((n,), np.float32),
            "repetition": np.ones((n,), np.float32), "has_bias": np.zeros((n,), np.bool_),
            "bias_ids": np.full((n, MAX_LOGIT_BIAS), self.v, np.int32),
            "bias_vals": np.zeros((n, MAX_LOGIT_BIAS), np.float32),
            "keys": np.zeros((n, 2), np.uint32), "logprobs": np.full((n,), -1, np.int32),
            "guided": np.zeros((n,), np.bool_),
        }

    # ------------------------------------------------------------------ functions

    def _advance(self, state: dict, p: dict, logits: jax.Array, rows: Optional[jax.Array],
                 token_mask: Optional[jax.Array] = None):
        """Sample one token per row (all slots when `rows` is None), then advance the state."""
        n = self.n
        full = rows is None
        tokens = state["tokens"] if full else state["tokens"][rows]
        pos = state["positions"] if full else state["positions"][rows]
        counts_fn = (lambda: state["counts"]) if full else (lambda: state["counts"][rows])
        mask_fn = (lambda: state["prompt_mask"]) if full else (lambda: state["prompt_mask"][rows])
        nxt = sampling.sample(logits, p, counts_fn, mask_fn, pos, token_mask)
        act = p["active"]
        want = jnp.any(act & (p["logprobs"] >= 0))
        want_top = jnp.any(act & (p["logprobs"] > 0))
        lp = sampling.logprob_outputs(logits, nxt, want, want_top, self.k)
        row_slots = jnp.arange(n, dtype=jnp.int32) if full else rows
        new_tokens = jnp.where(act, nxt, tokens)
        new_pos = pos + act.astype(jnp.int32)
        state = dict(state)
        if full:
            state["tokens"], state["positions"] = new_tokens, new_pos
        else:
            state["tokens"] = state["tokens"].at[rows].set(new_tokens)
            state["positions"] = state["positions"].at[rows].set(new_pos)
        state["counts"] = state["counts"].at[row_slots, nxt].add(act.astype(jnp.int32))
        return state, (nxt,) + tuple(lp)

    def _decode_fn(self, b: int, kv_blocks: int) -> Callable:
        spec, n = self.spec, self.n
        fwd_last = base.make_forward_last(spec, kv_blocks=kv_blocks)
        full = b == n

        def decode(params, cache, state, sp, rows):
            if full:
                p = sp
                tokens, pos = state["tokens"], state["positions"]
                slot_ids = None
            else:
                p = jax.tree.map(lambda a: a[rows], sp)
                tokens, pos = state["tokens"][rows], state["positions"][rows]
                slot_ids = rows
            logits, cache = fwd_last(params, tokens[:, None], pos[:, None], cache, slot_ids,
                                     jnp.zeros((b,), jnp.int32))
            state, out = self._advance(state, p, logits, None if full else rows)
            return cache, state, out

        return decode

    def _forward_fn(self, kv_blocks: int) -> Callable:
        """All slots' forward pass of a decode step (the first half of a guided step)."""
        n = self.n
        fwd_last = base.make_forward_last(self.spec, kv_blocks=kv_blocks)

        def forward(params, cache, state):
            logits, cache = fwd_last(params, state["tokens"][:, None], state["positions"][:, None],
                                     cache, None, jnp.zeros((n,), jnp.int32))
            return cache, logits

        return forward

    def _guided_fn(self) -> Callable:
        """Sample all slots from `forward`'s logits under the token bitmask; advance the state."""
        def guided_step(state, sp, logits, token_mask):
            return self._advance(state, sp, logits, None, token_mask)

        return guided_step

    def _prefill_fn(self, t: int, b: int) -> Callable:
        spec, n, s, r = self.spec, self.n, self.s, self.first_rows
        fwd_last = base.make_forward_last(spec, fresh=True, kv_blocks=base.kv_blocks_for(s, t))

        def prefill(params, cache, state, tokens, slot_ids, lens):
            t_idx = jnp.arange(t, dtype=jnp.int32)[None, :]
            valid = lens > 0
            # Padding rows write beyond the window (dropped) and touch no state.
            positions = jnp.where(valid[:, None], t_idx, s + t_idx)
            last_index = jnp.maximum(lens - 1, 0)
            logits, cache = fwd_last(params, tokens, positions, cache, slot_ids, last_index)
            dst = jnp.where(valid, slot_ids, n)
            last = jnp.take_along_axis(tokens, last_index[:, None], axis=1)[:, 0]
            state = dict(state)
            state["tokens"] = state["tokens"].at[dst].set(last, mode="drop")
            state["positions"] = state["positions"].at[dst].set(lens - 1, mode="drop")
            state["counts"] = state["counts"].at[dst].set(0, mode="drop")
            pm = state["prompt_mask"].at[dst].set(False, mode="drop")
            tok_rows = jnp.where(t_idx < lens[:, None], dst[:, None], n)
            state["prompt_mask"] = pm.at[tok_rows, tokens].set(True, mode="drop")
            if b < r:
                logits = jnp.concatenate([logits, jnp.zeros((r - b, logits.shape[1]), logits.dtype)])
            return cache, state, logits

        return prefill

    def _first_fn(self) -> Callable:
        """Sample the first token of freshly prefilled slots from their last-prompt logits."""
        n = self.n

        def first(state, sp, logits, slot_ids, valid, token_mask):
            p = jax.tree.map(lambda a: a[slot_ids], sp)
            p["active"] = p["active"] & valid
            pos = state["positions"][slot_ids]  # len - 1, as a decode step re-feeding it would
            nxt = sampling.sample(logits, p, lambda: state["counts"][slot_ids],
                                  lambda: state["prompt_mask"][slot_ids], pos, token_mask[slot_ids])
            act = p["active"]
            want = jnp.any(act & (p["logprobs"] >= 0))
            want_top = jnp.any(act & (p["logprobs"] > 0))
            lp = sampling.logprob_outputs(logits, nxt, want, want_top, self.k)
            dst = jnp.where(act, slot_ids, n)
            state = dict(state)
            state["tokens"] = state["tokens"].at[dst].set(nxt, mode="drop")
            state["positions"] = state["positions"].at[dst].set(pos + 1, mode="drop")
            state["counts"] = state["counts"].at[dst, nxt].add(1, mode="drop")
            return state, (nxt,) + tuple(lp)

        return first

    def _copy_fn(self) -> Callable:
        def copy(cache, state, src, dst, token, position):
            """Slot `dst` gets `src`'s KV cache and prompt, and re-feeds the last prompt token
            (`token` at `position`) in the next decode step to sample its own first token."""
            cache = jax.tree.map(lambda a: a.at[dst].set(a[src]), cache)
            state = dict(state)
            state["prompt_mask"] = state["prompt_mask"].at[dst].set(state["prompt_mask"][src])
            state["counts"] = state["counts"].at[dst].set(0)
            state["tokens"] = state["tokens"].at[dst].set(token)
            state["positions"] = state["positions"].at[dst].set(position)
            return cache, state

        return copy

    def _score_fn(self, t: int, b: int) -> Callable:
        spec, k = self.spec, self.k
        hidden_fn = base.make_hidden_fn(spec)
        chunk = _score_chunk(t)

        def score(params, tokens, want_top):
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
            hidden, _ = hidden_fn(params, tokens, positions, None, None)
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

    def _embed_fn(self, t: int) -> Callable:
        hidden_fn = base.make_hidden_fn(self.spec)

        def embed(params, tokens, lens):
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
            hidden, _ = hidden_fn(params, tokens, positions, None, None)
            mask = (positions < lens[:, None]).astype(F32)[..., None]
            return (jnp.sum(hidden.astype(F32) * mask, axis=1) / lens[:, None].astype(F32))[0]

        return embed

    # ------------------------------------------------------------------ compile

    def _arg(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self.rep)

    def compile_all(self, params: Any, cache: Any, state: Any, sp_dev: Any,
                    threads: Optional[int] = None,
                    progress: Optional[Callable[[int, int, str], None]] = None) -> dict[str, float]:
        """Lower and compile every variant (in parallel threads); returns timings.
        `progress(done, total, name)` is called before the first and after each program."""
        rep, cs = self.rep, self.cache_sharding
        cache_out = jax.tree.map(lambda _: cs, cache)
        jobs: list[tuple[str, Any, Callable]] = []
        i32 = np.int32

        for b in self.decode_buckets:
            for kb in self.kv_variants:
                fn = jax.jit(self._decode_fn(b, kb), donate_argnums=(1, 2), out_shardings=(cache_out, rep, rep))
                jobs.append((f"decode[{b}x{kb}]", ("decode", (b, kb)),
                             functools.partial(fn.lower, params, cache, state, sp_dev, self._arg((b,), i32))))
        words = self.mask_words
        for kb in self.kv_variants:
            fn = jax.jit(self._forward_fn(kb), donate_argnums=(1,), out_shardings=(cache_out, rep))
            jobs.append((f"forward[{kb}]", ("forward", kb), functools.partial(fn.lower, params, cache, state)))
        fn = jax.jit(self._guided_fn(), donate_argnums=(0,), out_shardings=(rep, rep))
        jobs.append(("guided", ("guided", None), functools.partial(
            fn.lower, state, sp_dev, self._arg((self.n, self.v), np.float32),
            self._arg((self.n, words), i32))))
        for t in self.buckets:
            for b in self.prefill_rows(t):
                fn = jax.jit(self._prefill_fn(t, b), donate_argnums=(1, 2), out_shardings=(cache_out, rep, rep))
                jobs.append((f"prefill[{t}x{b}]", ("prefill", (t, b)), functools.partial(
                    fn.lower, params, cache, state, self._arg((b, t), i32), self._arg((b,), i32),
                    self._arg((b,), i32))))
            for b in self.score_rows(t):
                fn = jax.jit(self._score_fn(t, b), out_shardings=rep)
                jobs.append((f"score[{t}x{b}]", ("score", (t, b)), functools.partial(
                    fn.lower, params, self._arg((b, t), i32), self._arg((), np.bool_))))
            fn = jax.jit(self._embed_fn(t), out_shardings=rep)
            jobs.append((f"embed[{t}]", ("embed", t), functools.partial(
                fn.lower, params, self._arg((1, t), i32), self._arg((1,), i32))))
        fn = jax.jit(self._copy_fn(), donate_argnums=(0, 1), out_shardings=(cache_out, rep))
        jobs.append(("copy", ("copy", None), functools.partial(
            fn.lower, cache, state, *[self._arg((), i32)] * 4)))
        r = self.first_rows
        fn = jax.jit(self._first_fn(), donate_argnums=(0,), out_shardings=(rep, rep))
        jobs.append(("first", ("first", None), functools.partial(
            fn.lower, state, sp_dev, self._arg((r, self.v), np.float32), self._arg((r,), i32),
            self._arg((r,), np.bool_), self._arg((self.n, words), i32))))

        timings: dict[str, float] = {}

        def build(job):
            name, key, lower = job
            t0 = time.monotonic()
            compiled = lower().compile()
            timings[name] = time.monotonic() - t0
            return key, compiled

        threads = threads or min(len(jobs), max(1, os.cpu_count() or 1))
        if progress is not None:
            progress(0, len(jobs), "")
        with ThreadPoolExecutor(threads, thread_name_prefix="engine-compile") as ex:
            for done, (job, ((kind, key), compiled)) in enumerate(zip(jobs, ex.map(build, jobs)), 1):
                if progress is not None:
                    progress(done, len(jobs), job[0])
                if kind in ("copy", "first", "guided"):
                    setattr(self, kind, compiled)
                else:
                    getattr(self, kind)[key] = compiled
        return timings
