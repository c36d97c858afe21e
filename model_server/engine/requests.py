"""Request records: what a caller holds (`RequestHandle`) and what the scheduler moves
(`Request`, its `Sequence`s, the `Group`s waiting for a prefill)."""
from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

from model_server.engine.types import Completion, Delta, SamplingParams, TokenLogprob


_END = object()


class RequestHandle:
    """A submitted request: iterate it for `Delta`s (blocks); `cancel()` frees its slots."""

    def __init__(self, engine: Any, request_id: str, prompt_tokens: int, n: int):
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


class Status(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    PREFILL = "prefill"      # holds its slot and blocks; chunks of its tokens being computed
    RUNNING = "running"      # decoding
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of a request: its tokens (prompt, then what it generated), its slot (decode
    row) and KV blocks, and its text output state."""

    req: "Request"
    index: int
    tokens: list[int]
    status: Status = Status.WAITING
    slot: Optional[int] = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    #: tokens the KV of which is in the pool or on its way there (dispatched)
    num_computed: int = 0
    #: tokens when the sequence last started decoding (its first decode step feeds this position)
    activated_len: int = 0
    #: decode steps dispatched since then
    dispatched: int = 0
    #: device steps dispatched with this sequence whose outputs are not read yet
    inflight: int = 0
    generated: int = 0
    preemptions: int = 0
    detok: Any = None
    held: str = ""
    pending_ids: list = dataclasses.field(default_factory=list)
    pending_lps: list = dataclasses.field(default_factory=list)
    finished: bool = False
    last_time: float = 0.0
    #: guided decoding: the grammar state (model_server.engine.guided.Matcher), and how the
    #: grammar ended: "done" (complete: stop after this token), "error" (refused: stop before)
    matcher: Any = None
    grammar_end: Optional[str] = None
    #: the slot of the adapter stack this sequence holds (None: the base alone)
    lora_slot: Optional[int] = None

    @property
    def next_position(self) -> int:
        """The position the next decode step writes."""
        return self.activated_len + self.dispatched


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    arrival: float
    kind: str  # "gen" | "score"
    seed: int
    samples: list[Sequence] = dataclasses.field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    remaining: int = 0
    done: bool = False
    stop_ids: frozenset = frozenset()
    grammar: Optional[str] = None   # compiled guided-decoding grammar
    adapter: Optional[str] = None   # LoRA adapter name (None: the base model)


@dataclasses.dataclass(eq=False)
class Group:
    """Sequences that one prefill serves: every sample of a new request (they share the
    prompt's blocks), or one preempted sequence to recompute. The first is the leader: the
    prefill runs in its slot and blocks."""

    seqs: list[Sequence]
    tokens: list[int]
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    #: leading tokens found in the prefix cache
    cached: int = 0

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    @property
    def req(self) -> Request:
        return self.seqs[0].req


@dataclasses.dataclass(eq=False)
class EmbedJob:
    prompt: list[int]
    future: Future
    arrival: float
    adapter: Optional[str] = None
