"""The engine's device programs: pure functions, compiled ahead of time for every shape.

The KV cache is a paged pool (see `model_server.models.base`); every program that touches it
reads and writes through block tables.

* ``prefill[(T, B, K)]``: a chunk of up to T tokens of each of B sequences, at positions
  ``start[b] ..`` (after a cached prefix, or an earlier chunk), written into the pool through
  the rows' first K table entries; returns the logits of each row's last chunk token
  (padded to the most rows any prefill takes). Touches no decode state.
* ``first``: sample the first token of sequences whose prefill just ended, from those logits
  (one logits row may serve several samples of one prompt), and set their decode state.
* ``decode[(B, K)]``: one token for B rows of slots (B == num_slots: all slots, no gather;
  smaller B: the rows' state gathered, worth it while few slots are busy), through the first
  K entries of the slots' block tables: forward + sampling + logprobs in one call.
* ``forward[K]`` and ``guided``: the decode step of all slots split in two for batches with
  a grammar-guided row: the forward pass (its logits stay on the device) runs while the host
  brings the rows' grammar state up to date with the previous step's tokens and fills their
  token bitmask; ``guided`` then samples under that mask ([num_slots, ceil(V/32)] int32) and
  advances the state. Batches without a grammar never run these.
* ``copy_blocks``: copy pool blocks (the partly filled last prompt block each extra sample of
  a prompt gets as its own).
* ``set_row``: a slot's output-token counts and prompt mask (only for sequences with
  penalties; a resumed sequence's counts are those of what it generated before).
* ``score[(T, B)]``: cache-free pass returning every prompt token's logprob and top logprobs.
* ``embed[T]``: mean-pooled final hidden state.
* ``set_adapter``: write one LoRA adapter's padded weights into a slot of the adapter stack.

With LoRA enabled (``max_loras > 0``) every forward program takes the adapter stack (see
`model_server.models.lora`) and each row's adapter index (-1: the base alone): the prefill,
scoring and embedding programs as an argument, the decode programs from the slots' settings
(``sp["adapter"]``). Without it the stack is None and the index is ignored.

Everything is lowered and compiled in `compile_all` (warm-up); the engine calls the compiled
executables only, so a steady-state call can never compile anything.
"""
from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model_server import kernels
from model_server.engine import cache_free, guided, sampling
from model_server.engine.shapes import MAX_ROWS, kv_block_variants, rows_for
from model_server.engine.types import MAX_LOGIT_BIAS, MAX_LOGPROBS
from model_server.models import base
from model_server.models import lora as LoRA

log = logging.getLogger(__name__)

F32 = jnp.float32


class Programs:
    """Builds the step functions for one model/config and holds their compiled executables."""

    def __init__(self, spec: base.ModelSpec, *, num_slots: int, max_seq_len: int,
                 buckets: list[int], decode_buckets: list[int], mesh: jax.sharding.Mesh,
                 chunk_buckets: Optional[list[int]] = None,
                 cache_sharding: NamedSharding, num_blocks: int, block_size: int, dtype: str = "float32",
                 max_loras: int = 0, max_lora_rank: int = 0, kv_cache_dtype: Optional[str] = None):
        self.spec = spec
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.n = num_slots
        self.s = max_seq_len
        self.v = spec.vocab_size
        self.buckets = buckets  # scoring / embedding lengths
        self.chunk_buckets = chunk_buckets or buckets  # prefill chunk lengths
        self.decode_buckets = decode_buckets
        self.mesh = mesh
        self.rep = NamedSharding(mesh, P())
        self.cache_sharding = cache_sharding
        self.num_blocks = num_blocks
        self.block_size = block_size
        #: table entries a sequence of max_seq_len positions needs
        self.max_blocks = -(-max_seq_len // block_size)
        kv_dtype = kv_cache_dtype or dtype
        #: table widths of the decode programs (the decode kernel reads any width alike, from
        #: float32, bfloat16 and int8 pools)
        self.kv_variants = kv_block_variants(self.max_blocks, kernels.enabled())
        #: and of the prefill programs: one width where the prefill kernel serves (float32,
        #: AVX-512, its head dims), else the pure-JAX path's gather wants narrow tables too
        self.prefill_variants = kv_block_variants(self.max_blocks, kernels.use_prefill_attention(
            spec.head_dim, block_size, dtype, kv_dtype, kv_dtype))
        self.prefill: dict[tuple[int, int, int], Any] = {}
        self.decode: dict[tuple[int, int], Any] = {}
        self.score: dict[tuple[int, int], Any] = {}
        self.embed: dict[int, Any] = {}
        self.forward: dict[int, Any] = {}
        self.guided: Any = None
        self.copy_blocks: Any = None
        self.set_row: Any = None
        self.first: Any = None
        self.set_adapter: Any = None
        self.mask_words = guided.words_for(self.v)
        self.k = min(MAX_LOGPROBS, self.v)
        #: rows of the prefill logits: the most sequences one prefill call takes
        self.first_rows = max(max(self.prefill_rows(t)) for t in self.chunk_buckets)

    # ------------------------------------------------------------------ variants

    def prefill_rows(self, t: int) -> list[int]:
        r = rows_for(t, self.n)
        return [1] if r == 1 else [1, r]

    def score_rows(self, t: int) -> list[int]:
        r = rows_for(t, MAX_ROWS)
        return [1] if r == 1 else [1, r]

    def width_for(self, positions: int, prefill: bool = False) -> int:
        """The narrowest compiled table width holding positions [0, positions)."""
        need = min(max(1, -(-positions // self.block_size)), self.max_blocks)
        variants = self.prefill_variants if prefill else self.kv_variants
        return variants[bisect.bisect_left(variants, need)]

    def prefill_widths(self, t: int) -> list[int]:
        return [k for k in self.prefill_variants if k * self.block_size >= min(t, self.s) or k == self.max_blocks]

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
            "guided": np.zeros((n,), np.bool_), "adapter": np.full((n,), -1, np.int32),
        }

    def host_tables(self) -> np.ndarray:
        """Block tables of every slot, all padding (ids past the pool: writes dropped)."""
        return np.full((self.n, self.max_blocks), self.num_blocks, np.int32)

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

    def init_lora(self) -> Any:
        """The zeroed adapter stack (None without LoRA)."""
        if not self.max_loras:
            return None
        shapes = LoRA.stack_shapes(self.spec, self.max_loras, self.max_lora_rank)
        make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s, F32), shapes, is_leaf=lambda x: isinstance(x, tuple)),
                       out_shardings=self.rep)
        return make()

    @staticmethod
    def _lora(stack: Any, index: jax.Array) -> Optional[LoRA.Lora]:
        return None if stack is None else LoRA.Lora.of(stack, index)

    def _step_logits(self, fwd_last: Callable, params, lora, cache, tokens, pos, active, tab, index):
        # rows not decoding this step (free, or started by this step's prefill) write nothing
        feed = jnp.where(active, pos, -1)
        return fwd_last(params, tokens[:, None], feed[:, None], cache, tab,
                        jnp.zeros((tokens.shape[0],), jnp.int32), lora=self._lora(lora, index))

    def _decode_fn(self, b: int, width: int) -> Callable:
        fwd_last = base.make_forward_last(self.spec)
        full = b == self.n

        def decode(params, lora, cache, state, sp, rows, tables):
            if full:
                p = sp
                tokens, pos = state["tokens"], state["positions"]
                tab = tables[:, :width]
            else:
                p = jax.tree.map(lambda a: a[rows], sp)
                tokens, pos = state["tokens"][rows], state["positions"][rows]
                tab = tables[rows, :width]
            logits, cache = self._step_logits(fwd_last, params, lora, cache, tokens, pos, p["active"], tab,
                                              p["adapter"])
            state, out = self._advance(state, p, logits, None if full else rows)
            return cache, state, out

        return decode

    def _forward_fn(self, width: int) -> Callable:
        """All slots' forward pass of a decode step (the first half of a guided step)."""
        fwd_last = base.make_forward_last(self.spec)

        def forward(params, lora, cache, state, sp, tables):
            logits, cache = self._step_logits(fwd_last, params, lora, cache, state["tokens"], state["positions"],
                                              sp["active"], tables[:, :width], sp["adapter"])
            return cache, logits

        return forward

    def _guided_fn(self) -> Callable:
        """Sample all slots from `forward`'s logits under the token bitmask; advance the state."""
        def guided_step(state, sp, logits, token_mask):
            return self._advance(state, sp, logits, None, token_mask)

        return guided_step

    def _prefill_fn(self, t: int, b: int) -> Callable:
        spec, r = self.spec, self.first_rows
        fwd_last = base.make_forward_last(spec)

        def prefill(params, lora, cache, tokens, starts, lens, tables, adapters):
            # Row b's chunk sits at positions starts[b] + [0, T); its padding after lens[b]
            # writes garbage in its own blocks (overwritten before anything reads it) or is
            # dropped; a padding row (lens 0) has a table of padding only.
            positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
            last_index = jnp.maximum(lens - 1, 0)
            logits, cache = fwd_last(params, tokens, positions, cache, tables, last_index,
                                     lora=self._lora(lora, adapters))
            if b < r:
                logits = jnp.concatenate([logits, jnp.zeros((r - b, logits.shape[1]), logits.dtype)])
            return cache, logits

        return prefill

    def _first_fn(self) -> Callable:
        """Sample the first token of freshly prefilled sequences from their last-token logits."""
        n = self.n

        def first(state, sp, logits, logit_rows, slot_ids, positions, valid, reset, token_mask):
            p = jax.tree.map(lambda a: a[slot_ids], sp)
            p["active"] = valid
            lg = logits[logit_rows]
            counts = jnp.where(reset[:, None], 0, state["counts"][slot_ids])
            nxt = sampling.sample(lg, p, lambda: counts, lambda: state["prompt_mask"][slot_ids], positions,
                                  token_mask[slot_ids])
            act = p["active"]
            want = jnp.any(act & (p["logprobs"] >= 0))
            want_top = jnp.any(act & (p["logprobs"] > 0))
            lp = sampling.logprob_outputs(lg, nxt, want, want_top, self.k)
            dst = jnp.where(act, slot_ids, n)
            state = dict(state)
            state["tokens"] = state["tokens"].at[dst].set(nxt, mode="drop")
            state["positions"] = state["positions"].at[dst].set(positions + 1, mode="drop")
            counts = counts.at[jnp.arange(counts.shape[0]), nxt].add(1)
            state["counts"] = state["counts"].at[dst].set(counts, mode="drop")
            return state, (nxt,) + tuple(lp)

        return first

    def _copy_blocks_fn(self) -> Callable:
        def copy_blocks(cache, src, dst):
            """Pool block dst[i] gets a copy of block src[i] (dst past the pool: nothing)."""
            return jax.tree.map(lambda pool: pool.at[dst].set(pool[src], mode="drop"), cache)

        return copy_blocks

    def _set_row_fn(self) -> Callable:
        def set_row(state, slot, counts, mask):
            state = dict(state)
            state["counts"] = state["counts"].at[slot].set(counts)
            state["prompt_mask"] = state["prompt_mask"].at[slot].set(mask)
            return state

        return set_row

    def _score_fn(self, t: int, b: int) -> Callable:
        return cache_free.score_fn(self.spec, t, b, self.k, self._lora)

    def _embed_fn(self, t: int) -> Callable:
        return cache_free.embed_fn(self.spec, t, self._lora)

    # ------------------------------------------------------------------ compile

    def _arg(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self.rep)

    def compile_all(self, params: Any, lora: Any, cache: Any, state: Any, sp_dev: Any, tables_dev: Any,
                    threads: Optional[int] = None,
                    progress: Optional[Callable[[int, int, str], None]] = None) -> dict[str, float]:
        """Lower and compile every variant (in parallel threads); returns timings.
        `progress(done, total, name)` is called before the first and after each program."""
        rep, cs = self.rep, self.cache_sharding
        cache_out = base.cache_shardings(cache, cs)
        jobs: list[tuple[str, Any, Callable]] = []
        i32 = np.int32
        n = self.n

        for b in self.decode_buckets:
            for kb in self.kv_variants:
                fn = jax.jit(self._decode_fn(b, kb), donate_argnums=(2, 3), out_shardings=(cache_out, rep, rep))
                jobs.append((f"decode[{b}x{kb}]", ("decode", (b, kb)), functools.partial(
                    fn.lower, params, lora, cache, state, sp_dev, self._arg((b,), i32), tables_dev)))
        words = self.mask_words
        for kb in self.kv_variants:
            fn = jax.jit(self._forward_fn(kb), donate_argnums=(2,), out_shardings=(cache_out, rep))
            jobs.append((f"forward[{kb}]", ("forward", kb), functools.partial(
                fn.lower, params, lora, cache, state, sp_dev, tables_dev)))
        fn = jax.jit(self._guided_fn(), donate_argnums=(0,), out_shardings=(rep, rep))
        jobs.append(("guided", ("guided", None), functools.partial(
            fn.lower, state, sp_dev, self._arg((n, self.v), np.float32), self._arg((n, words), i32))))
        for t in self.chunk_buckets:
            for b in self.prefill_rows(t):
                for kb in self.prefill_widths(t):
                    fn = jax.jit(self._prefill_fn(t, b), donate_argnums=(2,), out_shardings=(cache_out, rep))
                    jobs.append((f"prefill[{t}x{b}x{kb}]", ("prefill", (t, b, kb)), functools.partial(
                        fn.lower, params, lora, cache, self._arg((b, t), i32), self._arg((b,), i32),
                        self._arg((b,), i32), self._arg((b, kb), i32), self._arg((b,), i32))))
        for t in self.buckets:
            for b in self.score_rows(t):
                fn = jax.jit(self._score_fn(t, b), out_shardings=rep)
                jobs.append((f"score[{t}x{b}]", ("score", (t, b)), functools.partial(
                    fn.lower, params, lora, self._arg((b, t), i32), self._arg((), np.bool_), self._arg((b,), i32))))
            fn = jax.jit(self._embed_fn(t), out_shardings=rep)
            jobs.append((f"embed[{t}]", ("embed", t), functools.partial(
                fn.lower, params, lora, self._arg((1, t), i32), self._arg((1,), i32), self._arg((1,), i32))))
        if lora is not None:
            slot = jax.tree.map(lambda s: self._arg(s, np.float32), LoRA.slot_shapes(self.spec, self.max_lora_rank),
                                is_leaf=lambda x: isinstance(x, tuple))
            fn = jax.jit(LoRA.set_slot, donate_argnums=(0,), out_shardings=rep)
            jobs.append(("set_adapter", ("set_adapter", None), functools.partial(
                fn.lower, lora, self._arg((), i32), slot)))
        fn = jax.jit(self._copy_blocks_fn(), donate_argnums=(0,), out_shardings=cache_out)
        jobs.append(("copy_blocks", ("copy_blocks", None), functools.partial(
            fn.lower, cache, self._arg((n,), i32), self._arg((n,), i32))))
        fn = jax.jit(self._set_row_fn(), donate_argnums=(0,), out_shardings=rep)
        jobs.append(("set_row", ("set_row", None), functools.partial(
            fn.lower, state, self._arg((), i32), self._arg((self.v,), i32), self._arg((self.v,), np.bool_))))
        r = self.first_rows
        fn = jax.jit(self._first_fn(), donate_argnums=(0,), out_shardings=(rep, rep))
        jobs.append(("first", ("first", None), functools.partial(
            fn.lower, state, sp_dev, self._arg((r, self.v), np.float32), *[self._arg((n,), i32)] * 3,
            self._arg((n,), np.bool_), self._arg((n,), np.bool_), self._arg((n, words), i32))))

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
                if kind in ("copy_blocks", "set_row", "first", "guided", "set_adapter"):
                    setattr(self, kind, compiled)
                else:
                    getattr(self, kind)[key] = compiled
        return timings
