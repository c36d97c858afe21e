"""The runner: owns the device state (params, the LoRA adapter stack, the paged KV pool,
per-slot decode state, sampling settings and block tables) and calls the compiled programs."""
from __future__ import annotations

import bisect
import hashlib
from typing import Any, Callable, Optional, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model_server import host_memory
from model_server.engine.guided import Guide
from model_server.engine.programs import Programs
from model_server.engine.requests import EmbedJob, Request, Sequence
from model_server.engine.scheduler import Chunk
from model_server.models import base, lora as LoRA, quant


def seed_words(seed: int, index: int) -> tuple[int, int]:
    h = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def bucket_for(buckets: Seq[int], length: int) -> Optional[int]:
    i = bisect.bisect_left(buckets, length)
    return buckets[i] if i < len(buckets) else None


def _penalized(seq: Sequence) -> bool:
    p = seq.req.params
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


class Runner:
    def __init__(self, model: Any, spec: base.ModelSpec, *, num_slots: int, max_seq_len: int,
                 buckets: list[int], chunk_buckets: list[int], decode_buckets: list[int], dtype: str,
                 num_blocks: int,
                 block_size: int, guide: Guide, compile_threads: Optional[int] = None,
                 max_loras: int = 0, max_lora_rank: int = 0, kv_cache_dtype: Optional[str] = None):
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.buckets = buckets
        self.chunk_buckets = chunk_buckets
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.guide = guide
        self._compile_threads = compile_threads
        mesh = getattr(model, "mesh", None)
        if mesh is None:
            mesh = base.make_mesh(jax.devices())
        self.mesh = mesh
        axis = mesh.axis_names[0]
        from model_server.checkpoint import param_shardings
        params = quant.cast_tree(model.params, dtype)  # int8 weights (and their scales) kept
        self.params = jax.device_put(params, param_shardings(spec, mesh, quant.quantization_of(params)))
        self.cache_sharding = NamedSharding(mesh, base.cache_partition_spec(spec, axis, mesh.shape[axis]))
        self.replicated = NamedSharding(mesh, P())
        self.programs = Programs(spec, num_slots=num_slots, max_seq_len=max_seq_len, buckets=buckets,
                                 chunk_buckets=chunk_buckets,
                                 decode_buckets=decode_buckets, mesh=mesh, cache_sharding=self.cache_sharding,
                                 num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                                 max_loras=max_loras, max_lora_rank=max_lora_rank,
                                 kv_cache_dtype=self.kv_cache_dtype)
        self.lora = None  # the adapter stack (None without LoRA)
        self.cache = None
        self.state = None
        self.sp = self.programs.host_slot_params()
        self._sp_dev = None
        self._sp_dirty = True
        self.tables = self.programs.host_tables()
        self._tables_dev = None
        self._tables_dirty = True
        self._synced = [0] * num_slots  # table entries of each slot on the device copy
        self._rows_key: Optional[tuple] = None
        self._rows_dev = None
        self._mask_ones = None  # device copy of an all-ones token bitmask: no row guided
        self.compile_timings: dict[str, float] = {}
        self.huge_page_bytes = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, progress: Optional[Callable[[int, int, str], None]] = None) -> None:
        """Allocate the pool, compile every program (`progress`: see Programs.compile_all) and
        run each once."""
        self.cache = base.init_cache(self.spec, self.num_blocks, self.block_size, self.kv_cache_dtype,
                                     self.cache_sharding)
        self.state = self.programs.init_state()
        self.lora = self.programs.init_lora()
        self._upload()
        self._mask_ones = self.put(self.guide.mask.copy())[0]
        self.compile_timings = self.programs.compile_all(self.params, self.lora, self.cache, self.state, self._sp_dev,
                                                         self._tables_dev, self._compile_threads, progress)
        self._exercise()
        # After the first calls: the steps donate the cache, so these buffers are the ones
        # every later step reads and writes in place.
        self.huge_page_bytes = host_memory.advise_huge_pages((self.params, self.cache))

    def _exercise(self) -> None:
        """Run every compiled program once with inputs that change nothing that matters (the
        tables are padding: every write is dropped)."""
        pr, n, nb = self.programs, self.num_slots, self.num_blocks
        logits = None
        for (t, b, k), fn in pr.prefill.items():
            self.cache, logits = fn(self.params, self.lora, self.cache, *self.put(
                np.zeros((b, t), np.int32), np.zeros((b,), np.int32), np.zeros((b,), np.int32),
                np.full((b, k), nb, np.int32), np.full((b,), -1, np.int32)))
        z = np.zeros((n,), np.int32)
        self.state, out = pr.first(self.state, self._sp_dev, logits, *self.put(
            z, z, z, np.zeros((n,), np.bool_), np.ones((n,), np.bool_)), self._mask_ones)
        jax.tree.map(np.asarray, out)
        for fn in pr.forward.values():
            self.cache, logits = fn(self.params, self.lora, self.cache, self.state, self._sp_dev, self._tables_dev)
        self.state, out = pr.guided(self.state, self._sp_dev, logits, self._mask_ones)
        jax.tree.map(np.asarray, out)
        self.cache = pr.copy_blocks(self.cache, *self.put(z, np.full((n,), nb, np.int32)))
        self.state = pr.set_row(self.state, *self.put(np.int32(0), np.zeros((self.spec.vocab_size,), np.int32),
                                                      np.zeros((self.spec.vocab_size,), np.bool_)))
        for (b, _), fn in pr.decode.items():
            rows = self.put(np.arange(b, dtype=np.int32))[0]
            self.cache, self.state, out = fn(self.params, self.lora, self.cache, self.state, self._sp_dev, rows,
                                             self._tables_dev)
            jax.tree.map(np.asarray, out)
        for (t, b), fn in pr.score.items():
            for flag in (False, True):
                jax.tree.map(np.asarray, fn(self.params, self.lora, *self.put(
                    np.zeros((b, t), np.int32), np.bool_(flag), np.full((b,), -1, np.int32))))
        for t, fn in pr.embed.items():
            np.asarray(fn(self.params, self.lora, *self.put(np.zeros((1, t), np.int32), np.ones((1,), np.int32),
                                                            np.full((1,), -1, np.int32))))
        if pr.set_adapter is not None:  # slot 0 gets zeros: what it holds already
            self.lora = pr.set_adapter(self.lora, self.put(np.int32(0))[0], jax.tree.map(
                lambda s: jnp.zeros(s, jnp.float32), LoRA.slot_shapes(self.spec, self.programs.max_lora_rank),
                is_leaf=lambda x: isinstance(x, tuple)))
        jax.block_until_ready((self.cache, self.state))

    def put(self, *arrays: Any) -> list:
        return self.device_put(list(arrays))

    def device_put(self, tree: Any) -> Any:
        """Host values onto the mesh, replicated (every host input of a step goes through here:
        a multi-host slice swaps in a put without cross-host checks, see model_server.slice)."""
        return jax.device_put(tree, self.replicated)

    def _upload(self) -> None:
        # Copies: on CPU `device_put` may alias the host buffer, and the host rewrites these
        # arrays in place while steps dispatched earlier may still be queued.
        if self._sp_dirty or self._sp_dev is None:
            self._sp_dev = self.device_put(jax.tree.map(np.copy, self.sp))
            self._sp_dirty = False
        if self._tables_dirty or self._tables_dev is None:
            self._tables_dev = self.device_put(self.tables.copy())
            self._tables_dirty = False

    # ------------------------------------------------------------------ slots

    def activate(self, s: Sequence) -> None:
        """A sequence's sampling settings into its slot (before its first token is sampled)."""
        r, p, slot, sp = s.req, s.req.params, s.slot, self.sp
        sp["temperature"][slot] = p.temperature
        sp["top_k"][slot] = p.top_k
        sp["top_p"][slot] = p.top_p
        sp["presence"][slot] = p.presence_penalty
        sp["frequency"][slot] = p.frequency_penalty
        sp["repetition"][slot] = p.repetition_penalty
        sp["logprobs"][slot] = -1 if p.logprobs is None else p.logprobs
        sp["keys"][slot] = seed_words(r.seed, s.index)
        sp["bias_ids"][slot] = self.spec.vocab_size
        sp["bias_vals"][slot] = 0.0
        sp["has_bias"][slot] = bool(p.logit_bias)
        for j, (tid, val) in enumerate(sorted((int(k), float(v)) for k, v in p.logit_bias.items())):
            sp["bias_ids"][slot, j] = tid
            sp["bias_vals"][slot, j] = val
        sp["guided"][slot] = s.matcher is not None
        sp["adapter"][slot] = -1 if s.lora_slot is None else s.lora_slot
        self._sp_dirty = True

    def release(self, slot: int) -> None:
        self.sp["active"][slot] = False
        if self.sp["guided"][slot]:
            self.sp["guided"][slot] = False
            self.guide.clear(slot)
        self._sp_dirty = True
        self.tables[slot] = self.num_blocks
        self._synced[slot] = 0
        self._tables_dirty = True

    def load_adapters(self, loads: list[tuple[int, Any]]) -> None:
        """Write adapters' padded host weights into their slots of the stack (compiled at start)."""
        for slot, weights in loads:
            self.lora = self.programs.set_adapter(self.lora, self.put(np.int32(slot))[0],
                                                  self.device_put(weights))

    def sync_table(self, s: Sequence) -> None:
        slot = s.slot
        if self._synced[slot] != len(s.blocks):
            self.tables[slot] = self.num_blocks
            self.tables[slot, :len(s.blocks)] = s.blocks
            self._synced[slot] = len(s.blocks)
            self._tables_dirty = True

    # ------------------------------------------------------------------ steps

    def prefill(self, chunks: list[Chunk]) -> list:
        """Run the step's prefill chunks (batched by bucket), then start every sequence whose
        prompt is done: its blocks' copies, its counts, its first token. Returns the pending
        first-token outputs as (out, sequence per row)."""
        pr, nb = self.programs, self.num_blocks
        firsts = []
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].length)
        i = 0
        batches = []
        while i < len(order):
            t = bucket_for(self.chunk_buckets, chunks[order[i]].length)
            rmax = max(pr.prefill_rows(t))
            batch = [chunks[order[i]]]
            i += 1
            while i < len(order) and len(batch) < rmax and \
                    bucket_for(self.chunk_buckets, chunks[order[i]].length) == t:
                batch.append(chunks[order[i]])
                i += 1
            batches.append((t, batch))
        for t, batch in batches:
            b = 1 if len(batch) == 1 else max(pr.prefill_rows(t))
            reach = max(max(c.start + c.length for c in batch), min(t, self.max_seq_len))
            k = pr.width_for(reach, prefill=True)
            toks = np.zeros((b, t), np.int32)
            starts = np.zeros((b,), np.int32)
            lens = np.zeros((b,), np.int32)
            tabs = np.full((b, k), nb, np.int32)
            adapters = np.full((b,), -1, np.int32)
            for row, c in enumerate(batch):
                if c.group.leader.lora_slot is not None:
                    adapters[row] = c.group.leader.lora_slot
                toks[row, :c.length] = c.group.tokens[c.start:c.start + c.length]
                starts[row], lens[row] = c.start, c.length
                blocks = c.group.leader.blocks[:k]
                tabs[row, :len(blocks)] = blocks
            self.cache, logits = pr.prefill[(t, b, k)](self.params, self.lora, self.cache,
                                                       *self.put(toks, starts, lens, tabs, adapters))
            done = [(row, c) for row, c in enumerate(batch) if c.last]
            if done:
                firsts.append((logits, done))
        return firsts

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        n, nb = self.num_slots, self.num_blocks
        for i in range(0, len(copies), n):
            part = copies[i:i + n]
            src = np.zeros((n,), np.int32)
            dst = np.full((n,), nb, np.int32)
            for j, (a, b) in enumerate(part):
                src[j], dst[j] = a, b
            self.cache = self.programs.copy_blocks(self.cache, *self.put(src, dst))

    def start_sequences(self, logits: Any, done: list[tuple[int, Chunk]]):
        """Sample the first token of every sequence of the finished prompts `done` (row of
        `logits`, chunk); returns (out, sequence per row) to read later."""
        n, v = self.num_slots, self.spec.vocab_size
        rows, slots, pos = np.zeros((n,), np.int32), np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        valid, reset = np.zeros((n,), np.bool_), np.ones((n,), np.bool_)
        snapshot: list[Optional[Sequence]] = [None] * n
        j = 0
        for row, c in done:
            for s in c.group.seqs:
                self.activate(s)
                self.sync_table(s)
                if _penalized(s):
                    counts = np.bincount(np.asarray(s.tokens[len(s.req.prompt):], np.int64), minlength=v)[:v]
                    mask = np.zeros((v,), np.bool_)
                    mask[np.asarray(s.req.prompt, np.int64)] = True
                    self.state = self.programs.set_row(self.state, *self.put(
                        np.int32(s.slot), counts.astype(np.int32), mask))
                    reset[j] = False
                rows[j], slots[j], pos[j], valid[j] = row, s.slot, len(c.group.tokens) - 1, True
                snapshot[j] = s
                s.inflight += 1
                j += 1
        self._upload()
        guided = [(s.matcher, s.slot) for s in snapshot if s is not None and s.matcher is not None]
        mask = self.put(self.guide.fill(guided))[0] if guided else self._mask_ones
        self.state, out = self.programs.first(self.state, self._sp_dev, logits,
                                              *self.put(rows, slots, pos, valid, reset), mask)
        return out, snapshot

    def _prepare_decode(self, seqs: list[Sequence], rows_needed: int) -> tuple[int, tuple]:
        """The row bucket and rows of a decode step of `seqs`, their tables and settings on the
        device, and the table width their positions need."""
        pr = self.programs
        active = sorted(s.slot for s in seqs)
        buckets = pr.decode_buckets
        b = buckets[bisect.bisect_left(buckets, max(len(active), rows_needed))]
        busy = set(active)
        if b == self.num_slots:
            rows = tuple(range(b))
        else:
            pad = [i for i in range(self.num_slots) if i not in busy][:b - len(active)]
            rows = tuple(active + pad)
        act = self.sp["active"]
        step = np.zeros_like(act)
        step[active] = True
        if not np.array_equal(step, act):  # exactly the rows of this step decode
            act[:] = step
            self._sp_dirty = True
        if rows != self._rows_key:
            self._rows_dev = self.put(np.asarray(rows, np.int32))[0]
            self._rows_key = rows
        for s in seqs:
            self.sync_table(s)
        self._upload()
        k = pr.width_for(max(s.next_position for s in seqs) + 1)
        for s in seqs:
            s.dispatched += 1
            s.inflight += 1
        return k, rows

    def decode(self, seqs: list[Sequence]):
        """Dispatch one decode step for `seqs`; returns (out, sequence per row) to read later."""
        k, rows = self._prepare_decode(seqs, 0)
        by_slot = {s.slot: s for s in seqs}
        self.cache, self.state, out = self.programs.decode[(len(rows), k)](
            self.params, self.lora, self.cache, self.state, self._sp_dev, self._rows_dev, self._tables_dev)
        return out, [by_slot.get(r) for r in rows]

    def decode_guided(self, seqs: list[Sequence], advance: Callable[[], None], process: Callable[[], None]):
        """A decode step with grammar-guided rows. Dispatch the forward pass of every slot;
        while it runs: `advance()` feeds the previous step's tokens to the guided rows'
        matchers, their bitmask rows fill on the mask thread while `process()` turns that
        step's tokens into outputs, and the masked sampling step goes out once the mask is
        done. Every guided row is sampled under the mask of the matcher state that took all
        its earlier tokens (a row that `process()` finishes gets a mask it will not use).
        Returns (out, sequence per row) as `decode`."""
        k, _ = self._prepare_decode(seqs, self.num_slots)
        by_slot = {s.slot: s for s in seqs}
        self.cache, logits = self.programs.forward[k](self.params, self.lora, self.cache, self.state, self._sp_dev,
                                                      self._tables_dev)
        advance()
        guided = [(s.matcher, s.slot) for s in seqs if s.matcher is not None and not s.finished]
        filling = self.guide.fill_async(guided) if guided else None
        try:
            process()
        finally:
            mask = filling.result() if filling is not None else None
        mask = self.put(mask)[0] if mask is not None else self._mask_ones
        self.state, out = self.programs.guided(self.state, self._sp_dev, logits, mask)
        return out, [by_slot.get(r) for r in range(self.num_slots)]

    def has_guided(self, seqs: list[Sequence]) -> bool:
        return any(s.matcher is not None for s in seqs)

    def score(self, group: list[Request], want_top: bool, slots: Optional[list[Optional[int]]] = None):
        """Cache-free scoring pass for up to the most rows of one bucket: (chosen, top ids,
        top logprobs) as numpy, one row per request; `slots`: each request's adapter slot."""
        pr = self.programs
        t = bucket_for(self.buckets, max(len(r.prompt) for r in group))
        b = 1 if len(group) == 1 else max(pr.score_rows(t))
        toks = np.zeros((b, t), np.int32)
        adapters = np.full((b,), -1, np.int32)
        for i, r in enumerate(group):
            toks[i, :len(r.prompt)] = r.prompt
            if slots is not None and slots[i] is not None:
                adapters[i] = slots[i]
        out = pr.score[(t, b)](self.params, self.lora, *self.put(toks, np.bool_(want_top), adapters))
        return tuple(np.asarray(a) for a in out), t * b

    def embed(self, job: EmbedJob, slot: Optional[int] = None) -> tuple[list[float], int]:
        t = bucket_for(self.buckets, len(job.prompt))
        toks = np.zeros((1, t), np.int32)
        toks[0, :len(job.prompt)] = job.prompt
        vec = self.programs.embed[t](self.params, self.lora, *self.put(
            toks, np.array([len(job.prompt)], np.int32), np.array([-1 if slot is None else slot], np.int32)))
        return np.asarray(vec).astype(float).tolist(), t
