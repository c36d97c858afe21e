"""Continuous-batching engine: decode slots, a preallocated KV cache and a background loop.

One loop thread owns the device state. Each iteration it (1) applies cancellations, (2) runs
scoring / embedding work and admits waiting requests into free slots (prefill, padded to a
bucket), (3) dispatches one decode step for all busy slots, and (4) only then reads the token
ids of the *previous* step and turns them into text deltas, so detokenization and stop-string
work overlap the device. A request joins as soon as its prefill is done and leaves the moment
it finishes (its slot is reused by the next iteration's admission).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import itertools
import logging
import math
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model_server import host_memory
from model_server.engine import metrics
from model_server.engine.guided import Guide
from model_server.engine.programs import Programs, default_decode_buckets
from model_server.engine.types import (MAX_LOGIT_BIAS, MAX_LOGPROBS, Completion, Delta, EngineError,
                                       InvalidRequest, QueueFull, SamplingParams, TokenLogprob)
from model_server.models import base
from model_server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- compile counter

_compile_lock = threading.Lock()
_compile_count = 0
_listener_installed = False


def _on_event(event: str, duration: float, **_: Any) -> None:
    global _compile_count
    if event == "/jax/core/compile/backend_compile_duration":
        with _compile_lock:
            _compile_count += 1


def compile_count() -> int:
    """XLA compilations in this process since the engine module was first used."""
    global _listener_installed
    with _compile_lock:
        if not _listener_installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listener_installed = True
        return _compile_count


compile_count()

# --------------------------------------------------------------------------- helpers


class EngineTokenizer(Tokenizer):
    """The model's tokenizer: `model_server.tokenizer.Tokenizer`'s methods, and everything of
    the underlying Hugging Face tokenizer (`len()`, `eos_token`, ...) by delegation.

    A text too long for the context window is refused before it is tokenized (a 10 MB prompt
    took 22 s of CPU to tokenize): no token covers more characters than the longest entry of
    the vocabulary, so a text over twice `max_seq_len` times that cannot fit."""

    def __init__(self, hf_tokenizer: Any, max_seq_len: int) -> None:
        super().__init__(hf_tokenizer)
        self.max_seq_len = max_seq_len
        longest = max(map(len, hf_tokenizer.get_vocab()), default=1)
        self.max_text_chars = 2 * max_seq_len * max(longest, 1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_text_chars:
            raise InvalidRequest(f"the prompt has {len(text)} characters, more than this model's context "
                                 f"window of {self.max_seq_len} tokens can hold", "prompt")
        return super().encode(text, add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __len__(self) -> int:
        return len(self.hf)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> Any:
        """The wrapper's (text, TokenizerError on failure); with `tokenize=...` given, HF's."""
        if "tokenize" in kwargs:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               **kwargs)
        return super().apply_chat_template(messages, add_generation_prompt, **kwargs)


def _seed_words(seed: int, index: int) -> tuple[int, int]:
    h = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def _bucket_for(buckets: Sequence[int], length: int) -> Optional[int]:
    i = bisect.bisect_left(buckets, length)
    return buckets[i] if i < len(buckets) else None


_END = object()


class RequestHandle:
    """A submitted request: iterate it for `Delta`s (blocks); `cancel()` frees its slots."""

    def __init__(self, engine: "Engine", request_id: str, prompt_tokens: int, n: int):
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
        self.completion_tokens = 0
        self.finish_reasons: list[Optional[str]] = [None] * n
        self.cancelled = False
        self._q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[Delta]:
        return self.deltas()

    def deltas(self, abandoned: Optional[Callable[[], bool]] = None, poll_s: float = 0.05) -> Iterator[Delta]:
        """The request's deltas as they come. With `abandoned` (e.g. "the caller hung up"),
        it is asked every `poll_s` while waiting; once it says so the request is cancelled
        and the deltas end."""
        next_check = time.monotonic() + poll_s
        while True:
            if abandoned is None:
                item = self._q.get()
            else:
                try:
                    item = self._q.get(timeout=max(0.0, next_check - time.monotonic()))
                except queue.Empty:
                    item = None
                if time.monotonic() >= next_check:
                    if abandoned():
                        self.cancel()
                        return
                    next_check = time.monotonic() + poll_s
                if item is None:
                    continue
            if item is _END:
                self._q.put(_END)  # a second iteration ends at once
                return
            if isinstance(item, BaseException):
                self._q.put(item)
                raise item
            yield item

    def cancel(self) -> None:
        self._engine._cancel(self)

    def result(self, abandoned: Optional[Callable[[], bool]] = None) -> list[Completion]:
        """Iterate to the end and assemble each sample's completion (see `deltas`)."""
        outs = [Completion(i, "", [], [], None) for i in range(self.n)]
        for d in self.deltas(abandoned):
            c = outs[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs
            if d.finish_reason is not None:
                c.finish_reason = d.finish_reason
        return outs

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _put(self, item: Any) -> None:
        self._q.put(item)

    def _end(self, error: Optional[BaseException] = None) -> None:
        if not self._done.is_set():
            self._done.set()
            self._q.put(error if error is not None else _END)


@dataclasses.dataclass(eq=False)
class _Sample:
    req: "_Request"
    index: int
    slot: Optional[int] = None
    generated: int = 0
    detok: Any = None
    held: str = ""
    pending_ids: list = dataclasses.field(default_factory=list)
    pending_lps: list = dataclasses.field(default_factory=list)
    finished: bool = False
    last_time: float = 0.0
    grammar_end: Optional[str] = None   # "done": the grammar is complete, stop after this token;
    #                                     "error": it refused this token, stop before it


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    arrival: float
    kind: str  # "gen" | "score"
    seed: int
    samples: list[_Sample] = dataclasses.field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    remaining: int = 0
    done: bool = False
    stop_ids: frozenset = frozenset()
    grammar: Optional[str] = None   # compiled guided-decoding grammar


@dataclasses.dataclass(eq=False)
class _EmbedJob:
    prompt: list[int]
    future: Future
    arrival: float


class Engine:
    """Continuous batching over `num_slots` decode slots; see the module docstring."""

    def __init__(self, model: Any, *, num_slots: int, max_seq_len: int,
                 prefill_buckets: Optional[Sequence[int]] = None, max_queue: int = 64,
                 dtype: str = "float32", decode_buckets: Optional[Sequence[int]] = None,
                 max_prefill_tokens: Optional[int] = None, compile_threads: Optional[int] = None):
        self.spec: base.ModelSpec = model.spec
        spec = self.spec
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if max_seq_len > spec.max_seq_len_limit:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's limit of "
                             f"{spec.max_seq_len_limit} positions")
        self.num_slots = int(num_slots)
        self.max_seq_len = int(max_seq_len)
        self.max_queue = int(max_queue)
        self.dtype = str(jnp.dtype(dtype))
        if prefill_buckets is None:
            buckets, b = [], 16
            while b < self.max_seq_len:
                buckets.append(b)
                b *= 2
            buckets.append(self.max_seq_len)
        else:
            buckets = sorted({int(b) for b in prefill_buckets if 0 < int(b) <= self.max_seq_len})
            if not buckets:
                raise ValueError("no usable prefill bucket (all exceed max_seq_len)")
        self.prefill_buckets = buckets
        if decode_buckets is None:
            dbuckets = default_decode_buckets(self.num_slots)
        else:
            dbuckets = sorted({int(b) for b in decode_buckets if 0 < int(b) < self.num_slots} | {self.num_slots})
        self.decode_buckets = dbuckets
        self.max_prefill_tokens = int(max_prefill_tokens or max(buckets[-1], 2048))
        self._compile_threads = compile_threads

        tok = model.tokenizer
        hf = tok.hf if isinstance(tok, Tokenizer) else tok
        self.tokenizer = EngineTokenizer(hf, self.max_seq_len)
        eos = list(getattr(model, "eos_token_ids", None) or spec.eos_token_ids)
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [int(self.tokenizer.eos_token_id)]
        self.eos_token_ids = tuple(int(e) for e in eos)
        self.guide = Guide(hf, spec.vocab_size, self.num_slots, self.eos_token_ids)

        # Devices: a mesh over every device; params sharded for tensor parallelism.
        mesh = getattr(model, "mesh", None)
        if mesh is None:
            mesh = base.make_mesh(jax.devices())
        self.mesh = mesh
        axis = mesh.axis_names[0]
        size = mesh.shape[axis]
        from model_server.checkpoint import param_shardings
        shardings = param_shardings(spec, mesh)
        params = model.params
        if any(leaf.dtype != jnp.dtype(self.dtype) for leaf in jax.tree.leaves(params)):
            params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), params)
        self.params = jax.device_put(params, shardings)
        self.cache_sharding = NamedSharding(mesh, base.cache_partition_spec(spec, axis, size))
        self.replicated = NamedSharding(mesh, P())
        self.programs = Programs(spec, num_slots=self.num_slots, max_seq_len=self.max_seq_len,
                                 buckets=buckets, decode_buckets=dbuckets, mesh=mesh,
                                 cache_sharding=self.cache_sharding)

        self._cache = None
        self._state = None
        self._sp = self.programs.host_slot_params()
        self._sp_dev = None
        self._sp_dirty = True
        self._rows_key: Optional[tuple] = None
        self._rows_dev = None
        #: per slot, a bound on the position its next decode step feeds (picks the cache blocks)
        self._slot_pos = np.zeros((self.num_slots,), np.int64)

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting: collections.deque[_Request] = collections.deque()  # need slots
        self._aux: collections.deque[Any] = collections.deque()  # scoring / embedding
        self._waiting_samples = 0
        self._cancels: list[RequestHandle] = []
        self._requests: dict[str, _Request] = {}
        self._slots: list[Optional[_Sample]] = [None] * self.num_slots
        self._free: list[int] = list(range(self.num_slots))  # kept sorted
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._pieces: dict[int, str] = {}
        self._new_first: list = []
        self._ids = itertools.count()

        self._counters = collections.Counter()
        self.h_ttft = metrics.Histogram(metrics.TTFT_BUCKETS)
        self.h_tpot = metrics.Histogram(metrics.TPOT_BUCKETS)
        self.h_queue = metrics.Histogram(metrics.LATENCY_BUCKETS)
        self.h_e2e = metrics.Histogram(metrics.LATENCY_BUCKETS)
        self.warmup_seconds = 0.0
        self.huge_page_bytes = 0
        self.compile_timings: dict[str, float] = {}
        self.compile_progress: Optional[Callable[[int, int, str], None]] = None  # see compile_all
        self._compiles_at_ready = 0

    # ================================================================== lifecycle

    def start(self) -> None:
        """Compile every shape, run each program once, then start the loop; returns when ready."""
        if self._running:
            return
        self._stopping = False
        self._error = None
        t0 = time.monotonic()
        self._cache = base.init_cache(self.spec, self.num_slots, self.max_seq_len, self.dtype,
                                      self.cache_sharding)
        self._state = self.programs.init_state()
        self._upload_sp()
        self._mask_ones = self._put(self.guide.mask.copy())[0]  # all ones: no row guided
        self.compile_timings = self.programs.compile_all(self.params, self._cache, self._state,
                                                         self._sp_dev, self._compile_threads,
                                                         progress=self.compile_progress)
        self._exercise()
        # After the first calls: the steps donate the cache, so these buffers are the ones
        # every later step reads and writes in place.
        self.huge_page_bytes = host_memory.advise_huge_pages((self.params, self._cache))
        self.warmup_seconds = time.monotonic() - t0
        self._compiles_at_ready = compile_count()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()
        log.info("engine ready in %.1fs: %d slots, max_seq_len %d, buckets %s, %d programs, "
                 "%d MB on huge pages", self.warmup_seconds, self.num_slots, self.max_seq_len,
                 self.prefill_buckets, len(self.compile_timings), self.huge_page_bytes >> 20)

    def _exercise(self) -> None:
        """Run every compiled program once with dummy inputs (first-call costs, and so that
        anything outside the programs, e.g. a transfer, happens now and not in steady state)."""
        pr = self.programs
        logits = None
        for (t, b), fn in pr.prefill.items():
            toks = np.zeros((b, t), np.int32)
            self._cache, self._state, logits = fn(self.params, self._cache, self._state, *self._put(
                toks, np.arange(b, dtype=np.int32) % self.num_slots, np.zeros((b,), np.int32)))
        r = pr.first_rows
        self._state, out = pr.first(self._state, self._sp_dev, logits,
                                    *self._put(np.zeros((r,), np.int32), np.zeros((r,), np.bool_)),
                                    self._mask_ones)
        jax.tree.map(np.asarray, out)
        for fn in pr.forward.values():
            self._cache, logits = fn(self.params, self._cache, self._state)
        self._state, out = pr.guided(self._state, self._sp_dev, logits, self._mask_ones)
        jax.tree.map(np.asarray, out)
        self._cache, self._state = pr.copy(self._cache, self._state,
                                           *self._put(*[np.int32(0)] * 4))
        for (b, _), fn in pr.decode.items():
            rows = self._put(np.arange(b, dtype=np.int32))[0]
            self._cache, self._state, out = fn(self.params, self._cache, self._state, self._sp_dev, rows)
            jax.tree.map(np.asarray, out)
        for (t, b), fn in pr.score.items():
            for flag in (False, True):
                jax.tree.map(np.asarray, fn(self.params, *self._put(np.zeros((b, t), np.int32), np.bool_(flag))))
        for t, fn in pr.embed.items():
            np.asarray(fn(self.params, *self._put(np.zeros((1, t), np.int32), np.ones((1,), np.int32))))
        jax.block_until_ready((self._cache, self._state))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._running = False
        self._fail_all(EngineError("the engine was stopped"))

    @property
    def healthy(self) -> bool:
        return self._running and self._error is None

    @property
    def failure(self) -> Optional[str]:
        """Why the engine refuses every request (its loop died, or it was stopped); None if it serves."""
        if self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        return None if self._running else "the engine is not running"

    def compiles_since_ready(self) -> int:
        """XLA compilations in this process since `start()` returned (0 in steady state)."""
        return compile_count() - self._compiles_at_ready

    # ================================================================== submission

    def _check_ready(self) -> None:
        if self._error is not None:
            raise EngineError(f"the engine failed: {self._error}")
        if not self._running or self._stopping:
            raise EngineError("the engine is not running")

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise InvalidRequest("the prompt must be a list of token ids", "prompt") from None
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is out of range for a vocabulary of "
                                 f"{self.spec.vocab_size} tokens", "prompt")
        if len(ids) > self.max_seq_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, more than this model's "
                                 f"context window of {self.max_seq_len} tokens", "prompt")
        if len(ids) > self.prefill_buckets[-1]:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, more than the longest "
                                 f"prompt this server takes ({self.prefill_buckets[-1]})", "prompt")
        return ids

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise InvalidRequest if `submit` would; returns the prompt as a list of ints."""
        ids = self._check_prompt(prompt_ids)
        p = params

        def need(cond: bool, msg: str, param: str) -> None:
            if not cond:
                raise InvalidRequest(msg, param)

        def num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        need(integer(p.max_tokens) and p.max_tokens >= 0, "max_tokens must be a non-negative integer",
             "max_tokens")
        need(p.max_tokens > 0 or p.prompt_logprobs,
             "max_tokens must be at least 1 (0 only when scoring the prompt)", "max_tokens")
        if p.max_tokens > 0 and len(ids) + p.max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"this model's context window is {self.max_seq_len} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks for {p.max_tokens} more ({len(ids) + p.max_tokens} in all)",
                "max_tokens")
        need(integer(p.n) and 1 <= p.n <= self.num_slots,
             f"n must be between 1 and {self.num_slots}", "n")
        need(num(p.temperature) and 0 <= p.temperature <= 100, "temperature must be >= 0", "temperature")
        need(integer(p.top_k) and 0 <= p.top_k < 1 << 31, "top_k must be a non-negative integer (0 = off)",
             "top_k")  # it goes into an int32 array: a bigger one would fail the engine loop
        need(num(p.top_p) and 0 < p.top_p <= 1, "top_p must be in (0, 1]", "top_p")
        need(p.seed is None or integer(p.seed), "seed must be an integer", "seed")
        need(num(p.presence_penalty) and -2 <= p.presence_penalty <= 2,
             "presence_penalty must be between -2 and 2", "presence_penalty")
        need(num(p.frequency_penalty) and -2 <= p.frequency_penalty <= 2,
             "frequency_penalty must be between -2 and 2", "frequency_penalty")
        need(num(p.repetition_penalty) and 0 < p.repetition_penalty <= 100,
             "repetition_penalty must be > 0", "repetition_penalty")
        need(isinstance(p.logit_bias, dict) and len(p.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias takes at most {MAX_LOGIT_BIAS} entries", "logit_bias")
        for k, v in p.logit_bias.items():
            try:
                kid = int(k)
            except (TypeError, ValueError):
                raise InvalidRequest(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
            need(0 <= kid < self.spec.vocab_size, f"logit_bias token id {kid} is out of range for a "
                 f"vocabulary of {self.spec.vocab_size} tokens", "logit_bias")
            need(num(v) and -100 <= v <= 100, "logit_bias values must be between -100 and 100",
                 "logit_bias")
        if p.guided is not None:
            self.guide.compile(p.guided)  # cached: submit finds it again
        need(isinstance(p.stop, (list, tuple)) and all(isinstance(s, str) for s in p.stop),
             "stop must be a list of strings", "stop")
        need(isinstance(p.stop_token_ids, (list, tuple)) and all(
            integer(t) and 0 <= t < self.spec.vocab_size for t in p.stop_token_ids),
            "stop_token_ids must be token ids of this model", "stop_token_ids")
        need(p.logprobs is None or (integer(p.logprobs) and 0 <= p.logprobs <= MAX_LOGPROBS),
             f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        return ids

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None) -> RequestHandle:
        """Queue a request; raises InvalidRequest (bad request) or QueueFull (retryable)."""
        params = params or SamplingParams()
        ids = self.validate(prompt_ids, params)
        self._check_ready()
        kind = "gen" if params.max_tokens > 0 else "score"
        n = params.n if kind == "gen" else 1
        rid = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        handle = RequestHandle(self, rid, len(ids), params.n)
        seed = int(params.seed) if params.seed is not None else secrets.randbits(63)
        req = _Request(rid, ids, params, handle, time.monotonic(), kind, seed)
        req.stop_ids = frozenset(int(t) for t in params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        req.samples = [_Sample(req, i) for i in range(params.n)]
        req.remaining = params.n
        if params.guided is not None and kind == "gen":
            req.grammar = self.guide.compile(params.guided)
        with self._cv:
            if self._error is not None or self._stopping:
                raise EngineError("the engine is not running")
            if self._waiting_samples + n > self.max_queue + len(self._free):
                self._counters["requests_refused_total"] += 1
                raise QueueFull(f"too many requests waiting ({self._waiting_samples}); retry later",
                                retry_after=self._retry_after())
            self._waiting_samples += n
            self._requests[rid] = req
            (self._waiting if kind == "gen" else self._aux).append(req)
            self._counters["requests_total"] += 1
            self._cv.notify_all()
        return handle

    def _retry_after(self) -> float:
        return 1.0

    def embed(self, prompt_ids: Sequence[int], timeout: Optional[float] = None) -> list[float]:
        """Mean-pooled final hidden state of the prompt (blocks until computed)."""
        ids = self._check_prompt(prompt_ids)
        self._check_ready()
        job = _EmbedJob(ids, Future(), time.monotonic())
        with self._cv:
            if self._waiting_samples + 1 > self.max_queue + len(self._free):
                self._counters["requests_refused_total"] += 1
                raise QueueFull("too many requests waiting; retry later", retry_after=self._retry_after())
            self._waiting_samples += 1
            self._aux.append(job)
            self._cv.notify_all()
        return job.future.result(timeout)

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            if handle.finished or handle.cancelled:
                return
            handle.cancelled = True
            self._cancels.append(handle)
            self._cv.notify_all()

    # ================================================================== stats

    def stats(self) -> dict:
        with self._lock:
            running = sum(1 for r in self._requests.values() if r.admitted and not r.done)
            waiting = len(self._waiting) + len(self._aux)
            slots_used = self.num_slots - len(self._free)
            c = dict(self._counters)
        return {
            "running": running, "waiting": waiting, "waiting_samples": self._waiting_samples,
            "slots_used": slots_used, "num_slots": self.num_slots, "max_seq_len": self.max_seq_len,
            "max_queue": self.max_queue, "healthy": self.healthy,
            "prompt_tokens_total": c.get("prompt_tokens_total", 0),
            "generation_tokens_total": c.get("generation_tokens_total", 0),
            "requests_total": c.get("requests_total", 0),
            "requests_refused_total": c.get("requests_refused_total", 0),
            "requests_finished_total": {r: c.get(f"finished_{r}", 0) for r in ("stop", "length", "cancelled")},
            "decode_steps_total": c.get("decode_steps_total", 0),
            "prefill_calls_total": c.get("prefill_calls_total", 0),
            "time_to_first_token_seconds": self.h_ttft.snapshot(),
            "time_per_output_token_seconds": self.h_tpot.snapshot(),
            "request_queue_time_seconds": self.h_queue.snapshot(),
            "e2e_request_latency_seconds": self.h_e2e.snapshot(),
            "compiles_since_ready": self.compiles_since_ready() if self._running else 0,
            "warmup_seconds": round(self.warmup_seconds, 3),
        }

    # ================================================================== loop

    def _has_work(self) -> bool:
        if self._cancels or self._aux or len(self._free) < self.num_slots:
            return True
        return bool(self._waiting) and self._waiting[0].params.n <= len(self._free)

    def _loop(self) -> None:
        pending = None
        try:
            while True:
                with self._cv:
                    while not self._stopping and pending is None and not self._has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                for h in cancels:
                    self._do_cancel(h)
                self._new_first = []
                self._schedule()
                earlier = ([pending] if pending is not None else []) + self._new_first
                out = self._dispatch_decode(earlier) if len(self._free) < self.num_slots else None
                # Read the previous step while this one runs; then the first tokens of the
                # requests admitted just now (ready before this step, so no extra latency).
                if pending is not None:
                    self._process(pending)
                for first in self._new_first:
                    self._process(first)
                pending = out
        except BaseException as e:  # noqa: BLE001 - report to every waiting caller
            log.exception("engine loop failed")
            self._error = e
            self._fail_all(EngineError(f"the engine failed: {e}"))

    def _fail_all(self, err: EngineError) -> None:
        with self._cv:
            reqs = list(self._requests.values())
            aux = list(self._aux)
            self._requests.clear()
            self._waiting.clear()
            self._aux.clear()
            self._waiting_samples = 0
        for r in reqs:
            r.done = True
            r.handle._end(err)
        for a in aux:
            if isinstance(a, _EmbedJob) and not a.future.done():
                a.future.set_exception(err)

    def _put(self, *arrays: Any) -> list:
        return jax.device_put(list(arrays), self.replicated)

    def _upload_sp(self) -> None:
        self._sp_dev = jax.device_put(self._sp, self.replicated)
        self._sp_dirty = False

    # ------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        busy = len(self._free) < self.num_slots
        budget = self.max_prefill_tokens if busy else 1 << 60
        while budget > 0:
            with self._lock:
                head = self._aux[0] if self._aux else None
            if head is None:
                break
            budget -= self._run_aux()
        while budget > 0:
            with self._lock:
                if not self._waiting or self._waiting[0].params.n > len(self._free):
                    break
            budget -= self._admit_group()

    def _run_aux(self) -> int:
        with self._lock:
            head = self._aux.popleft()
            if isinstance(head, _EmbedJob):
                self._waiting_samples -= 1
                group = None
            else:
                t0 = _bucket_for(self.prefill_buckets, len(head.prompt))
                rmax = max(self.programs.score_rows(t0))
                group = [head]
                while self._aux and len(group) < rmax and isinstance(self._aux[0], _Request) and \
                        _bucket_for(self.prefill_buckets, len(self._aux[0].prompt)) <= t0:
                    group.append(self._aux.popleft())
                self._waiting_samples -= len(group)
        if group is None:
            t = _bucket_for(self.prefill_buckets, len(head.prompt))
            try:
                toks = np.zeros((1, t), np.int32)
                toks[0, :len(head.prompt)] = head.prompt
                vec = self.programs.embed[t](self.params, *self._put(
                    toks, np.array([len(head.prompt)], np.int32)))
                head.future.set_result(np.asarray(vec).astype(float).tolist())
                with self._lock:
                    self._counters["prompt_tokens_total"] += len(head.prompt)
            except Exception as e:  # noqa: BLE001
                head.future.set_exception(e)
                raise
            return t
        now = time.monotonic()
        for r in group:
            r.admitted = now
            self.h_queue.observe(now - r.arrival)
        cost = self._score(group)
        for r in group:
            if not r.done:
                self._count_prompt(r)
                for s in r.samples:
                    s.finished = True
                    r.handle.finish_reasons[s.index] = "length"
                    r.handle._put(Delta(s.index, "", [], [], "length"))
                self._finish_request(r, "length")
        return cost

    def _count_prompt(self, r: _Request) -> None:
        with self._lock:
            self._counters["prompt_tokens_total"] += len(r.prompt)

    def _score(self, group: list[_Request]) -> int:
        """Fill `handle.prompt_logprobs` of every request in `group` (batched passes)."""
        group = [r for r in group if not r.done]
        cost = 0
        while group:
            rows = max(self.programs.score_rows(
                _bucket_for(self.prefill_buckets, max(len(r.prompt) for r in group))))
            chunk, group = group[:rows], group[rows:]
            cost += self._score_chunk(chunk)
        return cost

    def _score_chunk(self, group: list[_Request]) -> int:
        t = _bucket_for(self.prefill_buckets, max(len(r.prompt) for r in group))
        b = 1 if len(group) == 1 else max(self.programs.score_rows(t))
        toks = np.zeros((b, t), np.int32)
        for i, r in enumerate(group):
            toks[i, :len(r.prompt)] = r.prompt
        want_top = any((r.params.logprobs or 0) > 0 for r in group)
        chosen, ti, tl = self.programs.score[(t, b)](self.params, *self._put(toks, np.bool_(want_top)))
        chosen, ti, tl = np.asarray(chosen), np.asarray(ti), np.asarray(tl)
        for i, r in enumerate(group):
            k = r.params.logprobs or 0
            lps: list[Optional[TokenLogprob]] = [None]
            for j in range(1, len(r.prompt)):
                top = [(int(ti[i, j - 1, m]), self._piece(int(ti[i, j - 1, m])), float(tl[i, j - 1, m]))
                       for m in range(k)]
                tid = r.prompt[j]
                lps.append(TokenLogprob(tid, self._piece(tid), float(chosen[i, j - 1]), top))
            r.handle.prompt_logprobs = lps
        return t * b

    def _admit_group(self) -> int:
        """Admit the head of the waiting queue (and followers of the same bucket) into slots."""
        with self._lock:
            head = self._waiting[0]
            t0 = _bucket_for(self.prefill_buckets, len(head.prompt))
            rmax = max(self.programs.prefill_rows(t0))
            free = len(self._free)
            group, need = [], 0
            for r in self._waiting:
                if len(group) == rmax or need + r.params.n > free or \
                        _bucket_for(self.prefill_buckets, len(r.prompt)) > t0:
                    break
                group.append(r)
                need += r.params.n
            for _ in group:
                self._waiting.popleft()
            self._waiting_samples -= need
            slots = [self._free.pop(0) for _ in range(need)]
        now = time.monotonic()
        self._score([r for r in group if r.params.prompt_logprobs])
        b = 1 if len(group) == 1 else rmax
        toks = np.zeros((b, t0), np.int32)
        slot_ids = np.zeros((b,), np.int32)
        lens = np.zeros((b,), np.int32)
        it = iter(slots)
        copies = []
        for i, req in enumerate(group):
            req.admitted = now
            self.h_queue.observe(now - req.arrival)
            self._count_prompt(req)
            toks[i, :len(req.prompt)] = req.prompt
            lens[i] = len(req.prompt)
            first = None
            for smp in req.samples:
                smp.slot = next(it)
                if first is None:
                    first = smp.slot
                else:
                    copies.append((first, smp.slot, req.prompt[-1], len(req.prompt) - 1))
                self._activate(smp)
            slot_ids[i] = first
        pr = self.programs
        self._cache, self._state, logits = pr.prefill[(t0, b)](
            self.params, self._cache, self._state, *self._put(toks, slot_ids, lens))
        if self._sp_dirty:
            self._upload_sp()
        rows = pr.first_rows
        valid = np.zeros((rows,), np.bool_)
        valid[:len(group)] = True
        first_slots = np.zeros((rows,), np.int32)
        first_slots[:b] = slot_ids
        new = [int(x) for x in slot_ids[:len(group)]]
        # a copy: on CPU device_put may alias the host buffer, which the next fill rewrites
        mask = self._put(self.guide.fill(new).copy())[0] if self.guide.any_attached(new) else self._mask_ones
        self._state, out = pr.first(self._state, self._sp_dev, logits, *self._put(first_slots, valid), mask)
        self._new_first.append((out, [req.samples[0] for req in group] + [None] * (rows - len(group))))
        for src, dst, tok, pos in copies:
            self._cache, self._state = pr.copy(self._cache, self._state, *self._put(
                np.int32(src), np.int32(dst), np.int32(tok), np.int32(pos)))
        with self._lock:
            self._counters["prefill_calls_total"] += 1
        return t0 * b

    def _activate(self, s: _Sample) -> None:
        r, p, slot, sp = s.req, s.req.params, s.slot, self._sp
        self._slots[slot] = s
        self._slot_pos[slot] = len(r.prompt)  # the first step feeds position len - 1 or len
        s.detok = self.tokenizer.detokenizer(r.prompt)
        s.last_time = r.admitted
        sp["active"][slot] = True
        sp["temperature"][slot] = p.temperature
        sp["top_k"][slot] = p.top_k
        sp["top_p"][slot] = p.top_p
        sp["presence"][slot] = p.presence_penalty
        sp["frequency"][slot] = p.frequency_penalty
        sp["repetition"][slot] = p.repetition_penalty
        sp["logprobs"][slot] = -1 if p.logprobs is None else p.logprobs
        sp["keys"][slot] = _seed_words(r.seed, s.index)
        sp["bias_ids"][slot] = self.spec.vocab_size
        sp["bias_vals"][slot] = 0.0
        sp["has_bias"][slot] = bool(p.logit_bias)
        for j, (tid, val) in enumerate(sorted((int(k), float(v)) for k, v in p.logit_bias.items())):
            sp["bias_ids"][slot, j] = tid
            sp["bias_vals"][slot, j] = val
        sp["guided"][slot] = r.grammar is not None
        if r.grammar is not None:
            self.guide.attach(slot, r.grammar)
        self._sp_dirty = True

    def _release(self, s: _Sample) -> None:
        slot = s.slot
        if slot is None:
            return
        s.slot = None
        self._slots[slot] = None
        self._sp["active"][slot] = False
        if self._sp["guided"][slot]:
            self._sp["guided"][slot] = False
            self.guide.detach(slot)
        self._sp_dirty = True
        with self._lock:
            bisect.insort(self._free, slot)

    # ------------------------------------------------------------------ decode

    def _dispatch_decode(self, earlier: Sequence[Any] = ()):
        """Dispatch one decode step of the busy slots. With a grammar-guided slot it is the
        forward pass, then (while the device runs it) the guided rows' matchers take the tokens
        of `earlier` steps and fill their bitmask, then the masked sampling step."""
        active = [i for i, s in enumerate(self._slots) if s is not None]
        if self.guide.any_attached(active):
            return self._dispatch_guided(active, earlier)
        b = self.decode_buckets[bisect.bisect_left(self.decode_buckets, len(active))]
        if b == self.num_slots:
            rows = tuple(range(b))
        else:
            pad = [i for i, s in enumerate(self._slots) if s is None][:b - len(active)]
            rows = tuple(active + pad)
        if rows != self._rows_key:
            self._rows_dev = self._put(np.asarray(rows, np.int32))[0]
            self._rows_key = rows
        if self._sp_dirty:
            self._upload_sp()
        # The fewest cache blocks that hold every active row's position (the steps already
        # dispatched are counted: this one may run before their tokens are read).
        reach = base.kv_blocks_for(self.max_seq_len, int(self._slot_pos[active].max()) + 1)
        kb = self.programs.kv_variants[bisect.bisect_left(self.programs.kv_variants, reach)]
        self._slot_pos[active] += 1
        self._cache, self._state, out = self.programs.decode[(b, kb)](
            self.params, self._cache, self._state, self._sp_dev, self._rows_dev)
        snapshot = [self._slots[r] for r in rows]
        with self._lock:
            self._counters["decode_steps_total"] += 1
        return out, snapshot

    def _dispatch_guided(self, active: list[int], earlier: Sequence[Any]):
        if self._sp_dirty:
            self._upload_sp()
        reach = base.kv_blocks_for(self.max_seq_len, int(self._slot_pos[active].max()) + 1)
        kb = self.programs.kv_variants[bisect.bisect_left(self.programs.kv_variants, reach)]
        self._slot_pos[active] += 1
        self._cache, logits = self.programs.forward[kb](self.params, self._cache, self._state)
        for out, snapshot in earlier:
            toks = None
            for i, s in enumerate(snapshot):
                if s is None or s.finished or s.slot is None or s.grammar_end or \
                        self.guide.matchers[s.slot] is None:
                    continue
                if toks is None:
                    toks = np.asarray(out[0])
                end = self.guide.accept(s.slot, int(toks[i]))
                if end == "error":
                    log.warning("request %s: the grammar refused token %d: %s", s.req.id, int(toks[i]),
                                self.guide.matchers[s.slot].error)
                s.grammar_end = end
        mask = self._put(self.guide.fill(active).copy())[0]  # a copy, as in _admit_group
        self._state, out = self.programs.guided(self._state, self._sp_dev, logits, mask)
        with self._lock:
            self._counters["decode_steps_total"] += 1
            self._counters["guided_steps_total"] += 1
        return out, list(self._slots)

    def _process(self, pending) -> None:
        out, snapshot = pending
        toks = np.asarray(out[0])
        live = [(i, s) for i, s in enumerate(snapshot) if s is not None and not s.finished]
        if not live:
            return
        want_lp = any(s.req.params.logprobs is not None for _, s in live)
        if want_lp:
            chosen, top_ids, top_lps = (np.asarray(a) for a in out[1:])
        now = time.monotonic()
        ntok = 0
        for i, s in live:
            tok = int(toks[i])
            tlp = None
            k = s.req.params.logprobs
            if k is not None:
                tlp = TokenLogprob(tok, self._piece(tok), float(chosen[i]),
                                   [(int(top_ids[i, m]), self._piece(int(top_ids[i, m])),
                                     float(top_lps[i, m])) for m in range(k)])
            self._on_token(s, tok, tlp, now)
            ntok += 1
        with self._lock:
            self._counters["generation_tokens_total"] += ntok

    def _piece(self, tid: int) -> str:
        p = self._pieces.get(tid)
        if p is None:
            p = self.tokenizer.decode([tid], skip_special_tokens=False)
            self._pieces[tid] = p
        return p

    # ------------------------------------------------------------------ text

    def _on_token(self, s: _Sample, tok: int, tlp: Optional[TokenLogprob], now: float) -> None:
        r, p = s.req, s.req.params
        s.generated += 1
        r.handle.completion_tokens += 1
        if s.generated == 1:
            if not r.first_token:
                r.first_token = now
                self.h_ttft.observe(now - r.arrival)
        else:
            self.h_tpot.observe(now - s.last_time)
        s.last_time = now
        s.pending_ids.append(tok)
        if tlp is not None:
            s.pending_lps.append(tlp)
        finish = None
        if tok in r.stop_ids:
            finish = "stop"
            new = s.detok.flush()
        elif s.grammar_end == "done":  # the output is complete: nothing but end-of-sequence may follow
            finish = "stop"
            new = s.detok.add(tok) + s.detok.flush()
        elif s.grammar_end == "error":  # a token outside the grammar is never emitted
            finish = "stop"
            new = s.detok.flush()
        else:
            new = s.detok.add(tok)
            if s.generated >= p.max_tokens:
                finish = "length"
                new += s.detok.flush()
        text = s.held + new
        s.held = ""
        stops = [x for x in p.stop if x]
        if stops and text:
            cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None:
                hold = 0
                for x in stops:
                    for k in range(min(len(x) - 1, len(text)), hold, -1):
                        if text.endswith(x[:k]):
                            hold = k
                            break
                if hold:
                    text, s.held = text[:-hold], text[-hold:]
        if text or finish is not None:
            r.handle._put(Delta(s.index, text, s.pending_ids, s.pending_lps, finish))
            s.pending_ids, s.pending_lps = [], []
        if finish is not None:
            self._finish_sample(s, finish)

    def _finish_sample(self, s: _Sample, reason: str) -> None:
        s.finished = True
        s.req.handle.finish_reasons[s.index] = reason
        self._release(s)
        r = s.req
        r.remaining -= 1
        if r.remaining == 0:
            self._finish_request(r, reason)

    def _finish_request(self, r: _Request, reason: str) -> None:
        if r.done:
            return
        r.done = True
        self.h_e2e.observe(time.monotonic() - r.arrival)
        with self._lock:
            self._requests.pop(r.id, None)
            for s in r.samples:
                self._counters[f"finished_{r.handle.finish_reasons[s.index] or reason}"] += 1
        r.handle._end()

    def _do_cancel(self, h: RequestHandle) -> None:
        with self._lock:
            r = self._requests.get(h.request_id)
            if r is None or r.done:
                return
            if r in self._waiting:
                self._waiting.remove(r)
                self._waiting_samples -= r.params.n
            elif r in self._aux:
                self._aux.remove(r)
                self._waiting_samples -= 1
        for s in r.samples:
            if not s.finished:
                s.finished = True
                r.handle.finish_reasons[s.index] = "cancelled"
                self._release(s)
        r.remaining = 0
        self._finish_request(r, "cancelled")
