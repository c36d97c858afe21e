"""Scoring and embedding work (cache-free passes), run by the engine loop between steps."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from model_server.engine.requests import EmbedJob, Request
from model_server.engine.runner import bucket_for
from model_server.engine.types import Delta

if TYPE_CHECKING:
    from model_server.engine.core import Engine


def run_aux_work(engine: "Engine") -> None:
    """Scoring and embedding requests, batched by bucket, within a budget of padded tokens
    while sequences decode (unbounded when none does)."""
    busy = bool(engine.scheduler.running)
    budget = engine.max_prefill_tokens if busy else 1 << 60
    while budget > 0:
        with engine._lock:
            if not engine._aux:
                return
            head = engine._aux.popleft()
            if isinstance(head, EmbedJob):
                engine._waiting_samples -= 1
                group = None
            else:
                t0 = bucket_for(engine.prefill_buckets, len(head.prompt))
                rmax = max(engine.programs.score_rows(t0))
                group = [head]
                while engine._aux and len(group) < rmax and isinstance(engine._aux[0], Request) and \
                        bucket_for(engine.prefill_buckets, len(engine._aux[0].prompt)) <= t0:
                    group.append(engine._aux.popleft())
                engine._waiting_samples -= len(group)
        if group is None:
            slots = engine._acquire([head])
            if slots is None:  # its adapter waits for a slot
                with engine._lock:
                    engine._aux.appendleft(head)
                    engine._waiting_samples += 1
                return
            try:
                vec, cost = engine.runner.embed(head, slots[0])
                head.future.set_result(vec)
                with engine._lock:
                    engine._counters["prompt_tokens_total"] += len(head.prompt)
            except Exception as e:  # noqa: BLE001
                head.future.set_exception(e)
                raise
            finally:
                engine._release(slots)
            budget -= cost
            continue
        cost, deferred = score(engine, group)
        if deferred:  # their adapters wait for a slot
            with engine._lock:
                engine._aux.extendleft(reversed(deferred))
                engine._waiting_samples += len(deferred)
        group = [r for r in group if r not in deferred]
        now = time.monotonic()
        for r in group:
            r.admitted = now
            engine.h_queue.observe(now - r.arrival)
        budget -= cost
        if deferred and not group:
            return
        for r in group:
            if not r.done:
                with engine._lock:
                    engine._counters["prompt_tokens_total"] += len(r.prompt)
                for s in r.samples:
                    s.finished = True
                    r.handle.finish_reasons[s.index] = "length"
                    r.handle._put(Delta(s.index, "", [], [], "length"))
                engine._finish_request(r, "length")


def score(engine: "Engine", group: list[Request]) -> tuple[int, list[Request]]:
    """Fill `handle.prompt_logprobs` of every request in `group` (batched passes); returns
    (padded tokens, the requests deferred because their adapter found no free slot)."""
    group = [r for r in group if not r.done]
    cost, deferred = 0, []
    while group:
        rows = max(engine.programs.score_rows(bucket_for(engine.prefill_buckets, max(len(r.prompt) for r in group))))
        chunk, group = group[:rows], group[rows:]
        slots = engine._acquire(chunk)
        if slots is None and len(chunk) > 1:  # one at a time then
            group = chunk[1:] + group
            chunk = chunk[:1]
            slots = engine._acquire(chunk)
        if slots is None:
            deferred += chunk
            continue
        want_top = any((r.params.logprobs or 0) > 0 for r in chunk)
        try:
            (chosen, ti, tl), c = engine.runner.score(chunk, want_top, slots)
        finally:
            engine._release(slots)
        for i, r in enumerate(chunk):
            r.handle.prompt_logprobs = engine.output.prompt_logprobs(r, chosen[i], ti[i], tl[i])
        cost += c
    return cost, deferred
