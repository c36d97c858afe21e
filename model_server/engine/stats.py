"""The engine's counters and gauges as one dict (the model server's /metrics and /stats)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_server.engine.core import Engine


def engine_stats(e: "Engine") -> dict[str, Any]:
    with e._lock:
        running = sum(1 for r in e._requests.values() if r.admitted and not r.done)
        waiting = len(e._inbox) + len(e._aux) + len(e.scheduler.waiting)
        c = dict(e._counters)
    bm, ad = e.blocks, e.adapters
    return {
        "running": running, "waiting": waiting, "waiting_samples": e._waiting_samples,
        "slots_used": e.num_slots - len(e.scheduler.free_slots), "num_slots": e.num_slots,
        "max_seq_len": e.max_seq_len, "max_queue": e.max_queue, "healthy": e.healthy,
        "prompt_tokens_total": c.get("prompt_tokens_total", 0),
        "generation_tokens_total": c.get("generation_tokens_total", 0),
        "requests_total": c.get("requests_total", 0),
        "requests_refused_total": c.get("requests_refused_total", 0),
        "requests_finished_total": {r: c.get(f"finished_{r}", 0) for r in ("stop", "length", "cancelled")},
        "decode_steps_total": c.get("decode_steps_total", 0),
        "prefill_calls_total": c.get("prefill_calls_total", 0),
        "kv_cache_usage_perc": bm.usage(), "kv_cache_blocks": bm.num_blocks,
        "kv_cache_block_size": bm.block_size, "kv_cache_bytes": e.kv_cache_bytes,
        "prefix_cache_queries_total": bm.queries, "prefix_cache_hits_total": bm.hits,
        "num_preemptions_total": e.scheduler.preemptions,
        "iteration_tokens": e.h_step_tokens.snapshot(),
        "time_to_first_token_seconds": e.h_ttft.snapshot(),
        "time_per_output_token_seconds": e.h_tpot.snapshot(),
        "request_queue_time_seconds": e.h_queue.snapshot(),
        "e2e_request_latency_seconds": e.h_e2e.snapshot(),
        "compiles_since_ready": e.compiles_since_ready() if e._running else 0,
        "lora_adapters": len(ad.weights) if ad else 0,
        "lora_resident": len(ad.resident()) if ad else 0,
        "lora_swaps_total": ad.swaps if ad else 0,
        "warmup_seconds": round(e.warmup_seconds, 3),
    }
