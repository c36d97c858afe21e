"""Prometheus metrics, with vLLM's names where the meaning is the same.

Engine figures are read at scrape time from each model's `engine.stats()`;
request counts by route and status are counted as requests finish.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from model_server.manager import ModelManager

# engine.stats() key -> (metric name, kind, help)
_ENGINE_METRICS = {
    "running": ("vllm:num_requests_running", "gauge", "Requests in decode slots."),
    "waiting": ("vllm:num_requests_waiting", "gauge", "Requests waiting for a slot."),
    "slots_used": ("sax:slots_in_use", "gauge", "Decode slots in use."),
    "num_slots": ("sax:slots_total", "gauge", "Decode slots."),
    "prompt_tokens_total": ("vllm:prompt_tokens", "counter", "Prompt tokens processed."),
    "generation_tokens_total": ("vllm:generation_tokens", "counter", "Tokens generated."),
    "requests_refused_total": ("sax:requests_refused", "counter", "Requests refused (queue full)."),
    "decode_steps_total": ("sax:engine_decode_steps", "counter", "Decode steps (a token for each busy slot)."),
    "prefill_calls_total": ("sax:engine_prefill_calls", "counter", "Prefill calls (several prompts each)."),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "gauge", "Fraction of the KV block pool in use (1 = full)."),
    "kv_cache_blocks": ("sax:kv_cache_blocks", "gauge", "Blocks of the KV pool."),
    "prefix_cache_queries_total": ("vllm:prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits_total": ("vllm:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    "num_preemptions_total": ("vllm:num_preemptions", "counter", "Sequences preempted (recomputed later)."),
}
_ENGINE_HISTOGRAMS = {
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds", "Time to first token."),
    "time_per_output_token_seconds": ("vllm:time_per_output_token_seconds", "Time per output token."),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds", "Time waiting for a slot."),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds", "Request latency in the engine."),
    "iteration_tokens": ("vllm:iteration_tokens_total", "Tokens per engine step (decodes and prompt chunks)."),
}


class EngineCollector:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        status = GaugeMetricFamily("sax:model_loaded", "1 when the model is LOADED.", labels=["model_name", "status"])
        for served in self.manager.all():
            status.add_metric([served.model_id, served.status], 1.0)
            if served.engine is None:
                continue
            stats = served.engine.stats()
            for key, (name, kind, doc) in _ENGINE_METRICS.items():
                if key not in stats:
                    continue
                fam = families.get(name)
                if fam is None:
                    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    fam = families[name] = cls(name.removesuffix("_total") if kind == "counter" else name,
                                               doc, labels=["model_name"])
                fam.add_metric([served.model_id], float(stats[key]))
            finished = stats.get("requests_finished_total")
            if isinstance(finished, dict):
                fam = families.get("vllm:request_success") or CounterMetricFamily(
                    "vllm:request_success", "Finished requests by finish reason.",
                    labels=["model_name", "finished_reason"])
                families["vllm:request_success"] = fam
                for reason, count in finished.items():
                    fam.add_metric([served.model_id, reason], float(count))
            for key, (name, doc) in _ENGINE_HISTOGRAMS.items():
                hist = stats.get(key)
                if not isinstance(hist, dict) or "buckets" not in hist:
                    continue
                fam = families.get(name) or HistogramMetricFamily(name, doc, labels=["model_name"])
                families[name] = fam
                fam.add_metric([served.model_id], buckets=[(str(b), float(c)) for b, c in hist["buckets"]],
                               sum_value=float(hist.get("sum", 0.0)))
        yield status
        yield from families.values()


def make_registry(manager: ModelManager) -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    registry.register(EngineCollector(manager))
    requests = Counter("sax:http_requests", "HTTP requests by route and status.",
                       ["route", "status"], registry=registry)
    latency = Histogram("sax:http_request_duration_seconds", "HTTP request latency (to headers).",
                        ["route"], registry=registry)
    return registry, requests, latency
