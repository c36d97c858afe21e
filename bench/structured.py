"""Guided decoding under load: 32 concurrent requests, half with a JSON schema, against the same
32 unconstrained (decode throughput), in one process on one engine.

    python -m bench.structured [--new-tokens 64] [--rounds 3]

Model: a random-weight Llama-style model (6 layers, d=512, fp32) over a 32,000-token byte-level
BPE trained on Python's standard library (bench.guided_masks.build_tokenizer). The schema holds
an array of strings, so a guided request runs its whole `--new-tokens` like the others. Each
round runs the unconstrained batch, then the mixed one; figures are decode tokens per second
of the batch (all tokens / makespan, prefill included on both sides) and, for the mixed
batch, the unconstrained half's mean per-request tokens per second against the same
requests in the unconstrained batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import types

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["note", "task", "idea"]},
        "done": {"type": "boolean"},
        "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 64},
    },
    "required": ["kind", "done", "notes"],
    "additionalProperties": False,
}


def build_engine(slots: int, window: int, prompt: int):
    import jax

    from bench.guided_masks import build_tokenizer
    from model_server.engine import Engine
    from model_server.models import base

    hf = build_tokenizer(32000)
    spec = base.ModelSpec(
        family="llama", model_type="llama", architecture="LlamaForCausalLM", vocab_size=len(hf),
        hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
        max_position_embeddings=window, norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        eos_token_ids=(hf.eos_token_id,), bos_token_id=None, pad_token_id=hf.eos_token_id)
    model = types.SimpleNamespace(spec=spec, params=jax.device_put(base.random_params(spec, 0)),
                                  tokenizer=hf, mesh=None)
    eng = Engine(model, num_slots=slots, max_seq_len=window, prefill_buckets=[prompt], max_queue=slots)
    eng.start()
    return eng, hf


def run_batch(eng, prompt_ids, n_req: int, guided_every: int, new_tokens: int, seed0: int):
    """n_req concurrent requests; every `guided_every`-th one (0: none) with the schema."""
    from model_server.engine import SamplingParams
    from model_server.engine.guided import GuidedSpec

    spec = GuidedSpec("json_schema", SCHEMA)
    params = [SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed0 + i, ignore_eos=True,
                             guided=spec if guided_every and i % guided_every == 0 else None)
              for i in range(n_req)]
    done: list = [None] * n_req
    t0 = time.perf_counter()

    def one(i):
        h = eng.submit(prompt_ids, params[i])
        c = h.result()[0]
        done[i] = (len(c.token_ids), time.perf_counter() - t0, c.text, params[i].guided is not None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_req)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makespan = time.perf_counter() - t0
    return sum(d[0] for d in done) / makespan, done


def main(argv=None) -> None:
    import json
    import subprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    a = ap.parse_args(argv)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    print(f"{cpu}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=sys.stderr)
    prompt_len = 32
    eng, hf = build_engine(a.requests, 128, prompt_len)
    prompt = hf.encode("def main(argv=None):\n    parser = argparse.ArgumentParser()\n")[:prompt_len]
    run_batch(eng, prompt, a.requests, 2, 8, 0)  # warm: first grammar compile, threads
    ratios, free_ratios, gave_up = [], [], 0
    for r in range(a.rounds):
        base_tps, base = run_batch(eng, prompt, a.requests, 0, a.new_tokens, 100 * r)
        mix_tps, mix = run_batch(eng, prompt, a.requests, 2, a.new_tokens, 100 * r)
        for d in mix:
            if d[3] and d[0] < a.new_tokens:  # a guided request that ended early: complete, or given up
                try:
                    json.loads(d[2])
                except ValueError:
                    gave_up += 1
        free_base = statistics.mean(base[i][0] / base[i][1] for i in range(a.requests) if i % 2)
        free_mix = statistics.mean(mix[i][0] / mix[i][1] for i in range(a.requests) if i % 2)
        ratios.append(mix_tps / base_tps)
        free_ratios.append(free_mix / free_base)
        print(f"round {r}: unconstrained {base_tps:7.1f} tok/s | half with schemas {mix_tps:7.1f} tok/s "
              f"({mix_tps / base_tps:.0%}) | unconstrained half per request {free_mix / free_base:.0%} of "
              f"the same requests alone", file=sys.stderr)
    st = eng.stats()
    print(f"median: mixed / unconstrained {statistics.median(ratios):.0%}; unconstrained half "
          f"{statistics.median(free_ratios):.0%}; compiles while serving {st['compiles_since_ready']}; "
          f"guided samples the matcher gave up on: {gave_up}")
    eng.stop()


if __name__ == "__main__":
    main()
