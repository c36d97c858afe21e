"""int8 serving's native paths: the one-row int8 product with int16 activations (AVX512-VNNI),
the decode kernel on int8 KV pools, int8 products of more rows than the kernel takes, and
LoRA adapters over an int8 base against transformers + PEFT in float32.

Tolerances: the int16 activations round x by at most max|x| / 65534, so the one-row product
moves by ~1e-4 of its outputs' scale where the int8 weights themselves move it by ~1e-2; the
bounds below are a few times the measured error (AMD EPYC, 2026-12-07) and far below a wrong
scale's or layout's.
"""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_server import kernels, registry
from model_server.models import layers, quant
from model_server.models.quant import QTensor

needs_kernels = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++"))
                                   or not kernels._has_avx512(), reason="no compiler or AVX-512: XLA serves")


def _q8(rng, n: int, k: int) -> QTensor:
    w = quant.quantize_array(rng.standard_normal((n, k)).astype(np.float32))
    return QTensor(jnp.asarray(w.q), jnp.asarray(w.scale))


def _q8_product(monkeypatch, a16: str, x, *ws) -> list[np.ndarray]:
    with monkeypatch.context() as mp:
        mp.setenv(kernels.ENV_Q8_A16, a16)
        return [np.asarray(y) for y in jax.jit(lambda x, *ws: kernels.matmul_q8(x, *ws))(x, *ws)]


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (37, 768), (5, 100), (64, 3072), (3, 31), (300, 160)])
def test_one_row_int16_activations_close_to_float_path(monkeypatch, n, k):
    """K on and off the 32- and 128-element steps; several weights in one call."""
    rng = np.random.default_rng(n * k)
    ws = [_q8(rng, n, k), _q8(rng, 2 * n + 1, k)]
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, 0] = 8.0  # an outlier sets the activations' scale
    floats = _q8_product(monkeypatch, "0", x, *ws)
    ints = _q8_product(monkeypatch, "1", x, *ws)
    for w, yf, yi in zip(ws, floats, ints):
        want = x.astype(np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
        np.testing.assert_allclose(yf, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))
        # rounding x to int16: |err| <= sum_k |w_k| * max|x| / 65534
        bound = np.abs(np.asarray(w.dequantize(jnp.float32))).sum(-1) * np.abs(x).max() / 65534
        assert (np.abs(yi - want) <= bound + 1e-4).all(), np.abs(yi - want).max()


@needs_kernels
def test_int16_activations_follow_the_switch_and_the_cpu(monkeypatch):
    monkeypatch.setenv(kernels.ENV_Q8_A16, "0")
    assert not kernels.q8_a16()
    monkeypatch.setenv(kernels.ENV_Q8_A16, "1")
    assert kernels.q8_a16() == (" avx512_vnni" in kernels._cpuinfo())


@needs_kernels
def test_zero_row_and_extreme_row(monkeypatch):
    rng = np.random.default_rng(3)
    w = _q8(rng, 20, 96)
    zero = np.zeros((1, 96), np.float32)
    assert (_q8_product(monkeypatch, "1", zero, w)[0] == 0).all()
    big = (rng.standard_normal((1, 96)) * 1e30).astype(np.float32)
    got, ref = _q8_product(monkeypatch, "1", big, w)[0], _q8_product(monkeypatch, "0", big, w)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def _pools(rng, nb, kvh, bs, d):
    def q8(x):
        amax = np.abs(x).max(-1)
        s = np.where(amax > 0, amax / 127, 1).astype(np.float32)
        return QTensor(jnp.asarray(np.clip(np.rint(x / s[..., None]), -127, 127).astype(np.int8)), jnp.asarray(s))
    return q8(rng.standard_normal((nb, kvh, bs, d)).astype(np.float32)), q8(
        rng.standard_normal((nb, kvh, bs, d)).astype(np.float32))


@needs_kernels
@pytest.mark.parametrize("dim,kv_heads,group,window", [(64, 2, 3, None), (16, 3, 1, 5), (128, 1, 4, 20),
                                                       (40, 2, 2, None)])
def test_decode_kernel_reads_int8_pools(monkeypatch, dim, kv_heads, group, window):
    """The int8 pools' rows dequantized in the kernel give the pure-JAX gather's attention."""
    rng = np.random.default_rng(dim)
    nb, bs, heads = 12, 16, kv_heads * group
    k, v = _pools(rng, nb, kv_heads, bs, dim)
    q = rng.standard_normal((5, 1, heads, dim)).astype(np.float32)
    tables = (rng.permutation(nb * 3)[:15].reshape(5, 3) % nb).astype(np.int32)
    tables[4, 2] = nb  # padding entry
    pos = np.array([[0], [9], [16], [47], [31]], np.int32)
    scale = 1 / np.sqrt(dim)
    got = np.asarray(jax.jit(lambda *a: layers.paged_attention(*a, scale, window))(q, pos, (k, v), tables))
    with monkeypatch.context() as mp:
        mp.setenv(kernels.ENV_SWITCH, "0")
        ref = np.asarray(jax.jit(lambda *a: layers.paged_attention(*a, scale, window))(q, pos, (k, v), tables))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


@needs_kernels
def test_decode_kernel_refuses_mismatched_scales():
    rng = np.random.default_rng(0)
    k, v = _pools(rng, 4, 2, 16, 32)
    bad = QTensor(k.q, k.scale[:, :, :8])
    q = jnp.zeros((1, 2, 32), jnp.float32)
    with pytest.raises(Exception, match="scales must be"):
        jax.jit(lambda *a: kernels.decode_attention(*a, 1.0))(q, jnp.zeros((1, 1), jnp.int32),
                                                              jnp.zeros((1,), jnp.int32), bad, v).block_until_ready()


@pytest.mark.parametrize("rows", [64, 65, 130, 512])
def test_int8_products_above_the_kernels_rows(rows):
    """Past MATMUL_Q8_MAX_ROWS the product is XLA's dot of the converted weights (prefill
    chunks of more than 64 tokens): it matches the dequantized float product."""
    rng = np.random.default_rng(rows)
    ws = [_q8(rng, 96, 64), _q8(rng, 40, 64)]
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    got = jax.jit(lambda x, *ws: layers.linears(x, ws, [None, None], jnp.float32))(x, *ws)
    for y, w in zip(got, ws):
        want = x.astype(np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


# ---- LoRA over an int8 base ---------------------------------------------------------------

LORA_OVERRIDES = {"num_slots": 4, "max_seq_len": 96, "prefill_buckets": [16, 96], "dtype": "float32"}


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("torch")
    from tests import lora_models as LM
    base_dir, ads = LM.build(tmp_path_factory.mktemp("lora_q8"))
    torch_models = {name: LM.torch_model(base_dir, ads.get(name)) for name in (None, "ada", "bob")}
    return base_dir, ads, torch_models


@pytest.mark.timeout(900)  # builds and compiles its own engine (a loaded machine is slow at it)
def test_lora_over_int8_base_close_to_peft(lora_setup):
    """Adapters over an int8 base (`quantization: int8`): prompt logprobs (a 70-token prompt:
    one prefill of more than 64 rows) and greedy decode logprobs stay within int8 tolerance of
    PEFT over the float32 base, and the adapters' own effect (PEFT adapter vs base) is
    reproduced, not lost to rounding."""
    from model_server.adapters import load_adapter
    from model_server.engine import Engine, SamplingParams
    from tests import lora_models as LM

    base_dir, ads, torch_models = lora_setup
    model = registry.load_model("lm.llama", str(base_dir), {**LORA_OVERRIDES, "quantization": "int8"})
    assert quant.is_quantized(model.params["layers"][0]["wq"])
    eng = Engine(model, num_slots=4, max_seq_len=96, prefill_buckets=[16, 96], dtype="float32",
                 decode_buckets=[2], max_loras=2, max_lora_rank=8)
    eng.start()
    try:
        for name, path in ads.items():
            eng.add_adapter(name, load_adapter(str(path), model.spec, 8))
        rng = np.random.default_rng(5)
        prompt = rng.integers(1, LM.VOCAB, 70).tolist()
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=True)
        handles = {a: eng.submit(prompt, params, adapter=a) for a in (None, "ada", "bob")}
        results = {a: (h.result()[0], h) for a, h in handles.items()}
        assert eng.compiles_since_ready() == 0
    finally:
        eng.stop()
    _, ref_base = LM.reference(torch_models[None], prompt, 6)
    for a in ("ada", "bob"):
        out, h = results[a]
        tokens, ref = LM.reference(torch_models[a], prompt, 6)
        idx = np.arange(len(prompt) - 1)
        got = np.array([x.logprob for x in h.prompt_logprobs[1:]])
        err = np.abs(got - ref[idx, prompt[1:]])
        effect = np.abs(ref[idx, prompt[1:]] - ref_base[idx, prompt[1:]])
        assert err.mean() <= 0.05 and err.mean() <= 0.25 * effect.mean(), (a, err.mean(), effect.mean())
        # the decode steps (one-row int8 products, adapter rows): logprobs of its own tokens
        # against PEFT's for the same tokens (teacher-forced, so a flip does not cascade)
        seq = prompt + out.token_ids
        import torch
        with torch.no_grad():
            lps = torch.log_softmax(torch_models[a](input_ids=torch.tensor([seq])).logits[0].double(), -1).numpy()
        want = lps[len(prompt) - 1 + np.arange(len(out.token_ids)), out.token_ids]
        dec = np.abs(np.array([x.logprob for x in out.logprobs]) - want)
        assert dec.mean() <= 0.05, (a, dec)
