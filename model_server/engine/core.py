"""The engine: continuous batching over a paged KV cache, driven by one loop thread
(`loop.EngineLoop`). This module is the callers' side: construction, start and stop,
validation, submission, cancellation and stats.
"""
from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence


from model_server.engine import metrics, shapes, validation
from model_server.engine.block_manager import BlockManager
from model_server.engine.compile_counter import compile_count
from model_server.engine.adapter_host import AdapterHost
from model_server.engine.guided import Guide
from model_server.engine.lora_slots import AdapterSlots
from model_server.engine.loop import EngineLoop
from model_server.engine.output import OutputProcessor
from model_server.engine.requests import EmbedJob, Request, RequestHandle, Sequence as Seq
from model_server.engine.runner import Runner
from model_server.engine.scheduler import Scheduler
from model_server.engine.stats import engine_stats
from model_server.engine.tokenizer import EngineTokenizer
from model_server.engine.types import EngineError, QueueFull, SamplingParams
from model_server.knobs import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_TOKEN_BUDGET
from model_server.models import base
from model_server.models.lora import MODEL_TYPES as lora_model_types
from model_server.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Engine(AdapterHost, EngineLoop):
    """Continuous batching over `num_slots` decode rows and a pool of KV blocks; see the module
    docstring and `model_server.engine`."""

    def __init__(self, model: Any, *, num_slots: int, max_seq_len: int,
                 prefill_buckets: Optional[Sequence[int]] = None, max_queue: int = 64,
                 dtype: str = "float32", decode_buckets: Optional[Sequence[int]] = None,
                 max_prefill_tokens: Optional[int] = None, compile_threads: Optional[int] = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, max_num_batched_tokens: Optional[int] = None,
                 enable_prefix_caching: bool = True, max_queue_wait_s: Optional[float] = None,
                 max_loras: int = 0, max_lora_rank: int = 16, kv_cache_dtype: Optional[str] = None):
        self.spec: base.ModelSpec = model.spec
        spec = self.spec
        shape = shapes.resolve(spec, num_slots=num_slots, max_seq_len=max_seq_len, dtype=dtype,
                               prefill_buckets=prefill_buckets, decode_buckets=decode_buckets,
                               block_size=block_size, num_blocks=num_blocks, kv_cache_bytes=kv_cache_bytes,
                               kv_cache_dtype=kv_cache_dtype)
        self.num_slots, self.max_seq_len, self.dtype = shape.num_slots, shape.max_seq_len, shape.dtype
        self.kv_cache_dtype = shape.kv_cache_dtype
        self.max_queue = int(max_queue)
        buckets = self.prefill_buckets = shape.buckets  # scoring passes pad to these
        self.chunk_buckets = shape.chunk_buckets  # prompt chunks pad to these (prefill programs)
        dbuckets = self.decode_buckets = shape.decode_buckets
        self.max_prefill_tokens = int(max_prefill_tokens or max(buckets[-1], 2048))
        self.block_size, self.num_blocks, self.kv_cache_bytes = shape.block_size, shape.num_blocks, shape.kv_cache_bytes
        self.token_budget = int(max_num_batched_tokens or DEFAULT_TOKEN_BUDGET)
        self.max_queue_wait_s = float(max_queue_wait_s or DEFAULT_MAX_QUEUE_WAIT_S)
        self.max_loras, self.max_lora_rank = int(max_loras), int(max_lora_rank)
        if self.max_loras and (spec.family != "llama" or spec.model_type not in lora_model_types):
            raise ValueError(f"LoRA adapters (max_loras) are served over {', '.join(lora_model_types)} models, "
                             f"not {spec.model_type}")
        if self.max_loras and self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        self.adapters = AdapterSlots(self.max_loras) if self.max_loras else None

        tok = model.tokenizer
        hf = tok.hf if isinstance(tok, Tokenizer) else tok
        self.tokenizer = EngineTokenizer(hf, self.max_seq_len)
        eos = list(getattr(model, "eos_token_ids", None) or spec.eos_token_ids)
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [int(self.tokenizer.eos_token_id)]
        self.eos_token_ids = tuple(int(e) for e in eos)
        self.guide = Guide(hf, spec.vocab_size, self.num_slots, self.eos_token_ids)

        self.runner = Runner(model, spec, num_slots=self.num_slots, max_seq_len=self.max_seq_len,
                             buckets=buckets, chunk_buckets=self.chunk_buckets, decode_buckets=dbuckets, dtype=self.dtype,
                             kv_cache_dtype=self.kv_cache_dtype,
                             num_blocks=self.num_blocks, block_size=self.block_size, guide=self.guide,
                             compile_threads=compile_threads, max_loras=self.max_loras,
                             max_lora_rank=self.max_lora_rank)
        self.programs = self.runner.programs
        self.blocks = BlockManager(self.num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, num_slots=self.num_slots, token_budget=self.token_budget,
                                   max_chunk=self.chunk_buckets[-1], max_seq_len=self.max_seq_len,
                                   idle_budget=buckets[-1], adapters=self.adapters)
        self.output = OutputProcessor(self.tokenizer)

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._inbox: collections.deque[Request] = collections.deque()
        self._aux: collections.deque[Any] = collections.deque()  # scoring / embedding
        self._waiting_samples = 0
        self._admitted_seen = 0
        self._cancels: list[RequestHandle] = []
        self._requests: dict[str, Request] = {}
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._ids = itertools.count()
        self._counters: collections.Counter = collections.Counter()
        self.h_queue = metrics.Histogram(metrics.LATENCY_BUCKETS)
        self.h_e2e = metrics.Histogram(metrics.LATENCY_BUCKETS)
        self.h_step_tokens = metrics.Histogram(metrics.STEP_TOKEN_BUCKETS)
        self.warmup_seconds = 0.0
        #: called while `start` compiles: (done, total, program name); see Programs.compile_all
        self.compile_progress: Optional[Callable[[int, int, str], None]] = None
        self._compiles_at_ready = 0

    # aliases kept for callers of the engine before its split
    h_ttft = property(lambda self: self.output.h_ttft)
    h_tpot = property(lambda self: self.output.h_tpot)
    compile_timings = property(lambda self: self.runner.compile_timings)
    huge_page_bytes = property(lambda self: self.runner.huge_page_bytes)
    params = property(lambda self: self.runner.params)
    mesh = property(lambda self: self.runner.mesh)

    # ================================================================== lifecycle

    def start(self) -> None:
        """Compile every shape, run each program once, then start the loop; returns when ready."""
        if self._running:
            return
        self._stopping = False
        self._error = None
        t0 = time.monotonic()
        self.runner.start(self.compile_progress)
        self.warmup_seconds = time.monotonic() - t0
        self._compiles_at_ready = compile_count()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()
        log.info("engine ready in %.1fs: %d slots, max_seq_len %d, %d KV blocks of %d (%.1f MB), buckets %s, "
                 "%d programs, %d MB on huge pages", self.warmup_seconds, self.num_slots, self.max_seq_len,
                 self.num_blocks, self.block_size, self.kv_cache_bytes / 1e6, self.prefill_buckets,
                 len(self.compile_timings), self.huge_page_bytes >> 20)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._running = False
        self.guide.close()
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

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise InvalidRequest if `submit` would; returns the prompt as a list of ints."""
        ids = validation.validate(self.spec, self.max_seq_len, self.prefill_buckets[-1], self.num_slots,
                                  prompt_ids, params)
        if params.guided is not None:
            self.guide.compile(params.guided)  # cached: submit finds it again
        return ids

    def _free_slots(self) -> int:
        return len(self.scheduler.free_slots)

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
               adapter: Optional[str] = None) -> RequestHandle:
        """Queue a request (for LoRA adapter `adapter`, None: the base); raises InvalidRequest
        (bad request), QueueFull (retryable) or EngineError (adapter not served)."""
        params = params or SamplingParams()
        ids = self.validate(prompt_ids, params)
        self._check_ready()
        self._check_adapter(adapter)
        kind = "gen" if params.max_tokens > 0 else "score"
        n = params.n if kind == "gen" else 1
        rid = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        handle = RequestHandle(self, rid, len(ids), params.n)
        seed = int(params.seed) if params.seed is not None else secrets.randbits(63)
        req = Request(rid, ids, params, handle, time.monotonic(), kind, seed, adapter=adapter)
        req.stop_ids = frozenset(int(t) for t in params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        req.samples = [Seq(req, i, list(ids)) for i in range(params.n)]
        req.remaining = params.n
        if params.guided is not None and kind == "gen":
            req.grammar = self.guide.compile(params.guided)
            for s in req.samples:
                s.matcher = self.guide.matcher(req.grammar)
        with self._cv:
            if self._error is not None or self._stopping:
                raise EngineError("the engine is not running")
            if self._waiting_samples + n > self.max_queue + self._free_slots():
                self._counters["requests_refused_total"] += 1
                raise QueueFull(f"too many requests waiting ({self._waiting_samples}); retry later",
                                retry_after=self._retry_after())
            self._waiting_samples += n
            self._requests[rid] = req
            (self._inbox if kind == "gen" else self._aux).append(req)
            self._counters["requests_total"] += 1
            if adapter is not None:
                self._counters[f"adapter_requests:{adapter}"] += 1
            self._cv.notify_all()
        return handle

    def _retry_after(self) -> float:
        return 1.0

    def _check_adapter(self, adapter: Optional[str]) -> None:
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            raise EngineError(f"adapter {adapter} is not loaded on this model")

    def embed(self, prompt_ids: Sequence[int], timeout: Optional[float] = None,
              adapter: Optional[str] = None) -> list[float]:
        """Mean-pooled final hidden state of the prompt (blocks until computed)."""
        ids = validation.check_prompt(self.spec, self.max_seq_len, self.prefill_buckets[-1], prompt_ids)
        self._check_ready()
        self._check_adapter(adapter)
        job = EmbedJob(ids, Future(), time.monotonic(), adapter)
        with self._cv:
            if self._waiting_samples + 1 > self.max_queue + self._free_slots():
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
        return engine_stats(self)
