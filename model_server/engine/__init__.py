"""Continuous-batching inference engine.

    from model_server.engine import Engine, SamplingParams
    engine = Engine(loaded_model, num_slots=8, max_seq_len=2048, prefill_buckets=None, max_queue=64)
    engine.start()                                   # compiles every shape, then serves
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0.7, stop=["\\n"]))
    for delta in handle: ...                         # Delta(index, text, token_ids, logprobs, finish_reason)
    engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=5))  # scoring
    engine.embed(ids)                                # mean-pooled final hidden state

Beyond the specified API:

* ``Engine(..., decode_buckets=None, max_prefill_tokens=None, compile_threads=None,
  block_size=16, num_blocks=None, kv_cache_bytes=None, max_num_batched_tokens=256,
  enable_prefix_caching=True)``: row counts of the gathered decode variants (default: powers
  of two up to num_slots / 2), padded scoring/embedding tokens per loop iteration while
  sequences decode (default max(largest bucket, 2048)), threads compiling at start; the paged
  KV pool (positions per block; blocks, or the bytes they may take; default room for
  num_slots sequences of max_seq_len), tokens per step while sequences decode (chunked
  prefill), the prefix cache. ``SamplingParams.prefix_caching=False`` opts a request out.
* ``Engine.stats()`` adds vLLM's ``kv_cache_usage_perc``, ``prefix_cache_queries_total`` /
  ``prefix_cache_hits_total`` (tokens), ``num_preemptions_total`` and ``iteration_tokens``.
* ``Engine.validate(ids, params)`` raises InvalidRequest like `submit`, without queueing.
* ``Engine.healthy``, ``Engine.eos_token_ids``, ``Engine.spec``, ``Engine.prefill_buckets``,
  ``Engine.warmup_seconds``, ``Engine.compile_timings``, ``Engine.compiles_since_ready()``;
  ``compile_count()`` (XLA compilations in this process).
* ``Engine.tokenizer`` is an `EngineTokenizer`: `model_server.tokenizer.Tokenizer` (encode,
  decode, apply_chat_template, detokenizer, ...) that also exposes every attribute of the
  Hugging Face tokenizer (`len()`, `eos_token`, `convert_ids_to_tokens`, ...).
* ``RequestHandle.result()`` -> list of `Completion` (text, token_ids, logprobs,
  finish_reason per sample); ``RequestHandle.finish_reasons``, ``.finished``, ``.n``.
  A cancelled request's iteration simply ends (no final Delta); its finish reason is
  "cancelled".
"""
from model_server.engine.types import (MAX_LOGIT_BIAS, MAX_LOGPROBS, Completion, Delta, EngineError,
                                       InvalidRequest, QueueFull, SamplingParams, TokenLogprob)

__all__ = [
    "Engine", "EngineTokenizer", "RequestHandle", "SamplingParams", "TokenLogprob", "Delta",
    "Completion", "EngineError", "InvalidRequest", "QueueFull", "MAX_LOGPROBS", "MAX_LOGIT_BIAS",
    "compile_count",
]

# The parts that need JAX load on first use: the scheduler, block manager and request records
# import (and test) without it.
_LAZY = {"Engine": "core", "RequestHandle": "requests", "EngineTokenizer": "tokenizer",
         "compile_count": "compile_counter"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"model_server.engine.{_LAZY[name]}"), name)
    raise AttributeError(name)
