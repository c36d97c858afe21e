"""Qwen3-MoE and Mixtral: routing and the two expert paths, config fields, memory, expert
parallelism (2 forced host devices give transformers' tokens and logprobs).

The whole-cell parity (admin, model server, frontend) is tests/frontend/test_moe_cell.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_server import registry  # noqa: E402
from model_server.checkpoint import CheckpointError, open_checkpoint  # noqa: E402
from model_server.models import base  # noqa: E402
from model_server.models import experts as X  # noqa: E402
from tests import moe_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict:
    torch.set_num_threads(2)
    return {name: moe_checkpoints.build(name, tmp_path_factory.mktemp(name))
            for name in ("qwen3_moe", "mixtral")}


def _torch_moe(h, router, gate, up, down, k, normalize):
    """transformers' routing and expert sum, written out in numpy (float64)."""
    logits = h @ router.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1)[:, :k]
    w = np.take_along_axis(p, idx, -1)
    if normalize:
        w /= w.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for n in range(h.shape[0]):
        for j, e in enumerate(idx[n]):
            g, u = gate[e] @ h[n], up[e] @ h[n]
            out[n] += w[n, j] * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("rows,normalize", [(1, True), (5, False), (40, True)])
def test_grouped_and_dense_paths_compute_the_routed_sum(rows, normalize):
    e, d, f, k = 8, 16, 12, 3
    rng = np.random.default_rng(rows)
    h, router = rng.standard_normal((rows, d)), rng.standard_normal((e, d))
    gate, up = rng.standard_normal((e, f, d)) / 4, rng.standard_normal((e, f, d)) / 4
    down = rng.standard_normal((e, d, f)) / 4
    want = _torch_moe(h, router, gate, up, down, k, normalize)
    args = [jnp.asarray(a, jnp.float32) for a in (h, router, gate, up, down)]
    for impl in ("grouped", "dense"):
        got = jax.jit(lambda *a, impl=impl: X.moe_mlp(*a, k, normalize, jax.nn.silu, impl))(*args)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5, err_msg=impl)
    # one device's share of the experts (expert parallelism): the shares sum to the whole
    weights, chosen = X.route(args[0], args[1], k, normalize)
    for compute in (X.experts_grouped, X.experts_dense):
        halves = [compute(args[0], chosen, weights, args[2][s], args[3][s], args[4][s], jax.nn.silu, first)
                  for first, s in ((0, slice(0, 4)), (4, slice(4, 8)))]
        np.testing.assert_allclose(np.asarray(halves[0] + halves[1]), want, atol=2e-5, rtol=1e-5)
    # tiles smaller than an expert's rows: an expert's pairs span several tiles
    got = X.experts_grouped(args[0], chosen, weights, *args[2:], jax.nn.silu, tile=2)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_spec_and_memory_count_every_expert(moe_models):
    model, path = moe_models["qwen3_moe"]
    spec = open_checkpoint(path).spec
    assert (spec.family, spec.architecture, spec.num_experts, spec.num_experts_per_tok) == \
        ("moe", "Qwen3MoeForCausalLM", 8, 2)
    assert spec.moe_layers == (1,) and not spec.norm_topk_prob and spec.qk_norm
    assert base.param_count(spec) == sum(p.numel() for p in model.parameters())
    mix = open_checkpoint(moe_models["mixtral"][1]).spec
    assert mix.moe_layers == (0, 1) and mix.norm_topk_prob and mix.sliding_window is None
    assert base.param_count(mix) == sum(p.numel() for p in moe_models["mixtral"][0].parameters())
    overrides = {"num_slots": 2, "max_seq_len": 32, "dtype": "float32"}
    loaded = registry.load_model("lm.qwen3_moe", str(path), overrides)
    held = sum(a.nbytes for a in jax.tree.leaves(loaded.params))
    assert loaded.param_bytes() == held
    experts = sum(a.nbytes for layer in loaded.params["layers"] for n, a in layer.items() if n.startswith("e_"))
    assert experts == len(spec.moe_layers) * spec.num_experts * 3 * spec.moe_intermediate_size * spec.hidden_size * 4
    assert registry.estimate_memory_bytes("lm.qwen3_moe", str(path), overrides) == held + loaded.kv_cache_bytes()
    with pytest.raises(CheckpointError, match="use lm.hf"):
        registry.load_model("lm.mixtral", str(path), overrides)


@pytest.mark.parametrize("field,value", [("decoder_sparse_step", 0), ("shared_expert_intermediate_size", 64),
                                         ("num_experts_per_tok", 9), ("mlp_only_layers", "all")])
def test_unsupported_variant_names_the_field(moe_models, tmp_path, field, value):
    src = moe_models["qwen3_moe"][1]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field):
        registry.load_model("lm.hf", str(bad), {"num_slots": 2, "max_seq_len": 32})


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    from model_server import registry
    from model_server.engine import Engine, SamplingParams, compile_count
    from model_server.models import base

    assert len(jax.devices()) == 2, jax.devices()
    out = {}
    for name, path, prompt, n in json.loads(sys.argv[1]):
        model = registry.load_model("lm.hf", path, {"num_slots": 2, "max_seq_len": 64, "dtype": "float32"},
                                    mesh=base.make_mesh())
        eng = Engine(model, num_slots=2, max_seq_len=64, prefill_buckets=[32, 64], max_queue=4, dtype="float32")
        eng.start()
        layer = next(l for l in eng.params["layers"] if "e_gate" in l)
        c0 = compile_count()
        h = eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1,
                                              prompt_logprobs=True))
        (c,) = h.result()
        out[name] = {"experts": layer["e_gate"].shape[0],
                     "shard": list(layer["e_gate"].addressable_shards[0].data.shape),
                     "tokens": c.token_ids, "logprobs": [lp.logprob for lp in c.logprobs],
                     "prompt_logprobs": [x.logprob for x in h.prompt_logprobs[1:]],
                     "compiles": compile_count() - c0}
        eng.stop()
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # 2-device parity against transformers: 6 min on a loaded 2-core machine
@pytest.mark.timeout(900)  # two models load and compile in a 2-device subprocess
def test_expert_parallel_two_devices_match_transformers(moe_models):
    """Experts split over 2 forced host devices: transformers' greedy tokens, logprobs and
    prompt logprobs, no compilation while serving."""
    cases, refs = [], {}
    for i, (name, (model, path)) in enumerate(moe_models.items()):
        prompt = np.random.default_rng(10 + i).integers(1, model.config.vocab_size, 19).tolist()
        ids = torch.tensor([prompt])
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                 eos_token_id=None, pad_token_id=0)
            lp = torch.log_softmax(model(seq).logits[0, :-1].double(), -1).numpy()
        refs[name] = (prompt, seq[0, len(prompt):].tolist(), lp)
        cases.append((name, str(path), prompt, 12))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    for _attempt in range(2):  # see test_engine_sharded: XLA's emulated rendezvous under load
        proc = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(cases)], env=env, capture_output=True,
                              text=True, timeout=400, cwd=REPO)
        if proc.returncode == 0 or "rendezvous" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, (prompt, want, lp) in refs.items():
        got = out[name]
        assert got["shard"][0] == got["experts"] // 2, name  # each device holds half the experts
        assert len(set(want)) >= 4, f"{name}: degenerate reference output makes a weak test"
        assert got["tokens"] == want, name
        np.testing.assert_allclose(got["logprobs"], [lp[len(prompt) - 1 + i, t] for i, t in enumerate(want)],
                                   atol=1e-4)
        np.testing.assert_allclose(got["prompt_logprobs"], [lp[j - 1, prompt[j]] for j in range(1, len(prompt))],
                                   atol=1e-4)
        assert got["compiles"] == 0, name


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_bfloat16_weights_close_to_float32(moe_models, name):
    model, path = moe_models[name]
    loaded = registry.load_model("lm.hf", str(path), {"num_slots": 2, "max_seq_len": 32, "dtype": "bfloat16"})
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(loaded.params))
    prompt = np.random.default_rng(3).integers(1, model.config.vocab_size, 16).astype(np.int32)
    logits, _ = jax.jit(base.make_forward(loaded.spec))(loaded.params, prompt[None],
                                                        np.arange(16, dtype=np.int32)[None], None, None)
    with torch.no_grad():
        ref = model(torch.tensor(prompt[None]).long()).logits[0].numpy()
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits[0]) - ref).max() < 0.15 * np.abs(ref).max()
