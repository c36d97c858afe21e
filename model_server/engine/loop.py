"""The engine's loop thread (a mixin of `Engine`, whose state it drives).

Each iteration the loop (1) applies cancellations and takes new requests, (2) runs scoring /
embedding work, (3) asks the scheduler for a step (decodes, prefill chunks, preemptions),
(4) has the runner dispatch the prefill chunks, start the sequences whose prompts are done
and dispatch one decode step, and (5) only then reads the token ids of the *previous* step and
turns them into text deltas, so detokenization and stop-string work overlap the device.
A step with grammar-guided rows does that reading inside step (4), during its forward pass:
the guided rows' matchers take the previous tokens first, then their next masks fill on the
guide's mask thread while this thread makes the text deltas (`Runner.decode_guided`).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from model_server.engine import scoring
from model_server.engine.requests import EmbedJob, Group, Request, RequestHandle, Sequence as Seq
from model_server.engine.types import EngineError, QueueFull

log = logging.getLogger(__name__)


class EngineLoop:
    """The loop thread's work; mixed into `Engine`."""

    def _has_work(self) -> bool:
        return bool(self._cancels or self._aux or self._inbox or self.scheduler.has_work())

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
                    inbox = list(self._inbox)
                    self._inbox.clear()
                for h in cancels:
                    self._do_cancel(h)
                self._take(inbox)
                self._expire_waiting()
                self._run_aux_work()
                out, firsts, pending = self._step(pending)
                # Read the previous step while this one runs; then the first tokens of the
                # sequences started just now (ready before this step, so no extra latency).
                if pending is not None:
                    self._process(pending)
                for first in firsts:
                    self._process(first)
                pending = out
        except BaseException as e:  # noqa: BLE001 - report to every waiting caller
            log.exception("engine loop failed")
            self._error = e
            self._fail_all(EngineError(f"the engine failed: {e}"))

    def _take(self, inbox: list[Request]) -> None:
        """New requests join the scheduler's queue (those asking for prompt logprobs scored
        first; one whose adapter finds no free slot waits in the inbox)."""
        scored = [r for r in inbox if r.params.prompt_logprobs and not r.done]
        deferred = self._score(scored) if scored else []
        for r in inbox:
            if not r.done and r not in deferred:
                self.scheduler.add(Group(list(r.samples), r.prompt, r.arrival))
        if deferred:
            with self._cv:
                self._inbox.extendleft(reversed(deferred))

    def _expire_waiting(self) -> None:
        """Requests not admitted within max_queue_wait_s get the retryable refusal."""
        expired = self.scheduler.expire(time.monotonic() - self.max_queue_wait_s)
        for g in expired:
            r = g.req
            with self._lock:
                self._waiting_samples -= len(g.seqs)
                self._counters["requests_refused_total"] += 1
                self._requests.pop(r.id, None)
            r.done = True
            r.handle._end(QueueFull(f"waited {self.max_queue_wait_s:.0f}s without a slot; retry later",
                                    retry_after=self._retry_after()))

    def _step(self, pending):
        """Dispatch one engine step; returns its decode output, its first-token outputs, and
        `pending` (the previous step's output) unless a guided step has read it already."""
        sched, runner = self.scheduler, self.runner
        plan = sched.schedule()
        if self.adapters is not None:
            runner.load_adapters(self.adapters.take_loads())
        admitted = [c.group for c in plan.chunks if c.start == c.group.cached and c.group.req.admitted == 0.0]
        now = time.monotonic()
        fresh = 0
        for g in admitted:
            r = g.req
            r.admitted = now
            self.h_queue.observe(now - r.arrival)
            fresh += len(r.samples)
            with self._lock:
                self._counters["prompt_tokens_total"] += len(r.prompt)
        if fresh:
            with self._lock:
                self._waiting_samples -= fresh
        for slot in sched.take_released():
            runner.release(slot)
        firsts = []
        if plan.chunks:
            self.h_step_tokens.observe(plan.tokens)
            done_prompts = runner.prefill(plan.chunks)
            if plan.copies:
                runner.copy_blocks(plan.copies)
            for logits, done in done_prompts:
                for _, c in done:
                    for s in c.group.seqs:
                        self.output.start(s)
                firsts.append(runner.start_sequences(logits, done))
            with self._lock:
                self._counters["prefill_calls_total"] += 1
        elif plan.decode:
            self.h_step_tokens.observe(plan.tokens)
        out = None
        if plan.decode:
            if runner.has_guided(plan.decode):
                prev, pending = pending, None
                out = runner.decode_guided(plan.decode, lambda: self._advance_matchers(prev),
                                           lambda: self._process(prev, advanced=True))
                with self._lock:
                    self._counters["guided_steps_total"] += 1
            else:
                out = runner.decode(plan.decode)
            with self._lock:
                self._counters["decode_steps_total"] += 1
        return out, firsts, pending

    def _run_aux_work(self) -> None:
        scoring.run_aux_work(self)

    def _score(self, group: list[Request]) -> list[Request]:
        """Prompt logprobs of `group`; returns those deferred (their adapter found no slot)."""
        return scoring.score(self, group)[1]

    def _advance_matchers(self, pending) -> None:
        """The guided rows of `pending` (a step's output) feed their tokens to their matchers
        (before their next masks are filled; `_process(pending, advanced=True)` then skips it)."""
        if pending is None:
            return
        out, snapshot = pending
        rows = [(i, s) for i, s in enumerate(snapshot)
                if s is not None and not s.finished and s.matcher is not None and s.grammar_end is None]
        if rows:
            toks = np.asarray(out[0])
            for i, s in rows:
                self._accept(s, int(toks[i]))

    def _accept(self, s: Seq, tok: int) -> None:
        s.grammar_end = self.guide.accept(s.matcher, tok)
        if s.grammar_end == "error":
            log.warning("request %s: the grammar refused token %d: %s", s.req.id, tok, s.matcher.error)

    def _process(self, pending, advanced: bool = False) -> None:
        if pending is None:
            return
        out, snapshot = pending
        live = []
        for i, s in enumerate(snapshot):
            if s is None:
                continue
            s.inflight -= 1
            if not s.finished:
                live.append((i, s))
        if not live:
            return
        toks = np.asarray(out[0])
        want_lp = any(s.req.params.logprobs is not None for _, s in live)
        if want_lp:
            chosen, top_ids, top_lps = (np.asarray(a) for a in out[1:])
        now = time.monotonic()
        for i, s in live:
            tok = int(toks[i])
            if not advanced and s.matcher is not None and s.grammar_end is None:
                self._accept(s, tok)
            tlp = None
            k = s.req.params.logprobs
            if k is not None:
                tlp = self.output.logprob(tok, chosen[i], top_ids[i], top_lps[i], k)
            finish = self.output.on_token(s, tok, tlp, now)
            if finish is not None:
                self._finish_sample(s, finish)
        with self._lock:
            self._counters["generation_tokens_total"] += len(live)

    def _finish_sample(self, s: Seq, reason: str) -> None:
        s.finished = True
        s.req.handle.finish_reasons[s.index] = reason
        self.scheduler.finish(s)
        r = s.req
        r.remaining -= 1
        if r.remaining == 0:
            self._finish_request(r, reason)

    def _finish_request(self, r: Request, reason: str) -> None:
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
            if r in self._inbox:
                self._inbox.remove(r)
                self._waiting_samples -= r.params.n
            elif r in self._aux:
                self._aux.remove(r)
                self._waiting_samples -= 1
            elif r.admitted == 0.0 and r.kind == "gen":
                self._waiting_samples -= r.params.n  # still in the scheduler's queue
        for s in r.samples:
            if not s.finished:
                s.finished = True
                r.handle.finish_reasons[s.index] = "cancelled"
                self.scheduler.finish(s)
        r.remaining = 0
        self._finish_request(r, "cancelled")

    def _fail_all(self, err: EngineError) -> None:
        with self._cv:
            reqs = list(self._requests.values())
            aux = list(self._aux)
            self._requests.clear()
            self._inbox.clear()
            self._aux.clear()
            self._waiting_samples = 0
        for r in reqs:
            r.done = True
            r.handle._end(err)
        for a in aux:
            if isinstance(a, EmbedJob) and not a.future.done():
                a.future.set_exception(err)

