"""The CPU kernels (XLA FFI custom calls) against the pure-JAX code they stand in for."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_server import kernels
from model_server.models import base, layers

#: Only a machine without any C++ compiler skips the kernel tests; where one exists a failed
#: build fails `test_the_kernel_builds_where_a_compiler_exists` instead of hiding.
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="no C++ compiler: the pure-JAX path serves")


@needs_compiler
def test_the_kernel_builds_where_a_compiler_exists():
    assert kernels.enabled(), "the decode-attention kernel did not build or load (see the log)"


def paged(rng, num_blocks, kv_heads, bs, dim, dtype, scale=1.0):
    k = jnp.asarray(scale * rng.standard_normal((num_blocks, kv_heads, bs, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((num_blocks, kv_heads, bs, dim)), dtype)
    return k, v


def pure_jax(monkeypatch, q, qpos, k, v, tables, scale, window=None, softcap=0.0):
    """layers.paged_attention with the kernels off (the GPU/TPU path), in float32."""
    with monkeypatch.context() as mp:
        mp.setenv(kernels.ENV_SWITCH, "0")
        out = jax.jit(lambda *a: layers.paged_attention(*a, scale, window, softcap))(
            q, qpos, (k.astype(jnp.float32), v.astype(jnp.float32)), tables)
        return np.asarray(out)


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dim,kv_heads,group", [(64, 2, 3), (16, 3, 1), (128, 1, 4)])
@pytest.mark.parametrize("window", [None, 1, 5, 20])  # none; itself only; inside a block; across blocks
def test_decode_kernel_reads_through_block_tables(monkeypatch, dtype, dim, kv_heads, group, window):
    rng = np.random.default_rng(dim + group)
    bs, nb = 16, 12
    k, v = paged(rng, nb, kv_heads, bs, dim, dtype)
    heads = kv_heads * group
    q = rng.standard_normal((6, heads, dim)).astype(np.float32)
    tables = rng.permutation(nb * 3)[:18].reshape(6, 3).astype(np.int32) % nb
    tables[5, 2] = nb  # padding entry: never visible
    # first position only, inside the first block, a block boundary, the last position, past the end
    positions = np.array([0, 9, 16, 47, 70, 31], np.int32)
    if window:
        positions = np.minimum(positions, 47)  # past the end means nothing with a window
    scale = 1 / np.sqrt(dim)
    got = jax.jit(lambda *a: kernels.decode_attention(*a, scale, window or 0))(q, tables, positions, k, v)
    want = pure_jax(monkeypatch, q[:, None], np.minimum(positions, 47)[:, None], k, v, tables, scale, window)
    np.testing.assert_allclose(np.asarray(got).reshape(6, heads * dim), want.reshape(6, heads * dim),
                               atol=2e-6, rtol=1e-5)


needs_avx512 = pytest.mark.skipif(not kernels._has_avx512(), reason="no AVX-512: XLA's dot serves")


@needs_compiler
@needs_avx512
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 9, 16, 17, 32, 33, 64])
def test_matmul_matches_xla_dot(m):
    """Every tile shape and tail: one row (the matrix-vector form, its rows split unevenly over
    the work items), rows around the 4-row and 16/32-row tiles, outputs around the 6- and
    12-output tiles, K below, at and off the vector width."""
    rng = np.random.default_rng(m)
    fn = jax.jit(kernels.matmul)
    for n, k in [(1, 1), (5, 15), (6, 16), (13, 48), (50, 100), (97, 768), (1001, 77)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_allclose(np.asarray(fn(x, w)[0]), want, rtol=1e-5, atol=1e-4 * np.sqrt(k),
                                   err_msg=f"m={m} n={n} k={k}")


@needs_compiler
@needs_avx512
@pytest.mark.parametrize("m", [1, 3, 32])
def test_matmul_of_several_weights_in_one_call(m):
    """Weights of different widths against the same rows (queries, keys and values of a GQA
    layer): every result as its own product gives it."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 96)).astype(np.float32)
    ws = [rng.standard_normal((n, 96)).astype(np.float32) for n in (128, 32, 32, 13)]
    got = jax.jit(kernels.matmul)(x, *ws)
    assert len(got) == len(ws)
    for y, w in zip(got, ws):
        np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.astype(np.float64).T,
                                   rtol=1e-5, atol=1e-3)


@needs_compiler
@needs_avx512
@pytest.mark.parametrize("batch,t,heads,kv_heads,dim", [
    (1, 1, 4, 4, 32),     # a one-token prompt
    (2, 37, 6, 2, 16),    # a partial query block, GQA groups of 3
    (3, 100, 8, 1, 128),  # one kv head for all, several blocks and a partial key tile
    (2, 65, 4, 2, 80),    # a head dim of 5 vectors
    (1, 256, 12, 12, 64),  # GPT-2's heads, whole key tiles
])
def test_prefill_attention_matches_pure_jax(monkeypatch, batch, t, heads, kv_heads, dim):
    """A chunk of t queries after a cached prefix of another length in each row, through
    shuffled block tables, with and without a window."""
    rng = np.random.default_rng(t)
    bs = 16
    width = -(-(t + 40) // bs)
    nb = batch * width + 3
    k, v = paged(rng, nb, kv_heads, bs, dim, "float32")
    q = rng.standard_normal((batch, t, heads, dim)).astype(np.float32)
    tables = rng.permutation(nb)[:batch * width].reshape(batch, width).astype(np.int32)
    starts = np.array([0, 37, 16][:batch] + [5] * max(0, batch - 3), np.int32)
    positions = starts[:, None] + np.arange(t, dtype=np.int32)[None]
    scale = dim ** -0.5
    for window in (None, 5, 40):  # none; short; longer than a query block
        got = jax.jit(lambda *a: kernels.prefill_attention(*a, scale, window or 0))(q, positions, k, v, tables)
        want = pure_jax(monkeypatch, q, positions, k, v, tables, scale, window)
        np.testing.assert_allclose(np.asarray(got).reshape(batch, t, heads * dim), want, atol=2e-6, rtol=1e-5)


@needs_compiler
@needs_avx512
def test_vector_loads_and_stores_stay_in_registers(tmp_path):
    """simd.h's load/store must compile to plain vector moves whatever GCC tunes for. With a
    64-byte memcpy, `-march=native` on a CPU GCC takes for Rocket Lake (an Intel Xeon, family 6
    model 167, 2026-12-05) split each load into two 256-bit halves through the stack: a
    store-forwarding stall per load, the decode a third of its speed."""
    cxx = shutil.which("g++") or shutil.which("c++")
    src = tmp_path / "probe.cc"
    src.write_text('#include "simd.h"\n'
                   "saxplane::Vec twice(const float* p) { return saxplane::load(p) * saxplane::load(p + 16); }\n"
                   "void put(float* p, saxplane::Vec v) { saxplane::store(p, v + v); }\n")
    for tune in ([], ["-mtune=rocketlake"]):
        asm = subprocess.run([cxx, *kernels._COMPILE_FLAGS, *tune, "-S", "-o", "-", "-I", str(kernels._HERE), str(src)],
                             check=True, capture_output=True, text=True).stdout
        assert "vmulps" in asm and "(%rsp)" not in asm and "(%rbp)" not in asm, asm


@needs_compiler
def test_vector_exp_is_within_a_few_ulp_of_libm(tmp_path):
    """simd.h's exp for the softmaxes (x <= 0): relative error under 3e-7 (~2.5 ulp) from 0
    down to -87, where float32's normal range ends, and finite, tiny values below."""
    cxx = shutil.which("g++") or shutil.which("c++")
    src, exe = tmp_path / "exp.cc", tmp_path / "exp"
    xs = np.concatenate([-np.geomspace(1e-6, 87.0, 3000), np.linspace(-87.0, 0.0, 2000), [0.0, -100.0, -1e30]])
    src.write_text('#include <cstdio>\n#include "simd.h"\nint main() { float x;\n'
                   "  while (std::scanf(\"%f\", &x) == 1) std::printf(\"%.9g\\n\", "
                   "saxplane::exp_nonpositive(saxplane::Vec{} + x)[1]);\n}\n")
    subprocess.run([cxx, *kernels._COMPILE_FLAGS, "-I", str(kernels._HERE), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], input="\n".join(f"{x:.9g}" for x in xs.astype(np.float32)),
                         check=True, capture_output=True, text=True).stdout.split()
    got, want = np.array(out, np.float64), np.exp(xs.astype(np.float32).astype(np.float64))
    normal = xs >= -87.0
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 3e-7
    assert np.all((got[~normal] >= 0) & (got[~normal] < 2e-38))


@needs_compiler
@pytest.mark.parametrize("isa", [[], ["-mno-avx512f"]], ids=["native", "8-lanes"])
def test_block_transpose_in_registers(tmp_path, isa):
    """simd.h's transpose_block at either vector width: a full block and one of 3 rows (the
    rest written as zeros), from and into strided rows."""
    cxx = shutil.which("g++") or shutil.which("c++")
    src, exe = tmp_path / "tr.cc", tmp_path / "tr"
    src.write_text('#include <cstdio>\n#include "simd.h"\nusing namespace saxplane;\n'
                   "int main() { float a[40 * 24], t[24 * 40];\n"
                   "  for (int i = 0; i < 40 * 24; ++i) a[i] = i;\n"
                   "  const int rs[] = {kLanes, 3};\n"
                   "  for (int rows : rs) {\n"
                   "    for (float& x : t) x = -1;\n"
                   "    transpose_block(a + 2 * 24 + 5, 24, rows, t + 1 * 40 + 7, 40);\n"
                   '    std::printf("%d\\n", kLanes);\n'
                   '    for (float x : t) std::printf("%g\\n", x);\n  }\n}\n')
    subprocess.run([cxx, *kernels._COMPILE_FLAGS, *isa, "-I", str(kernels._HERE), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = np.array(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split(), float)
    a = np.arange(40 * 24, dtype=float).reshape(40, 24)
    lanes = int(out[0])
    assert lanes == (8 if isa else (16 if kernels._has_avx512() else 8))
    for got, rows in zip(out.reshape(2, -1), (lanes, 3)):
        block = a[2:2 + lanes, 5:5 + lanes].copy()
        block[rows:] = 0
        want = np.full((24, 40), -1.0)
        want[1:1 + lanes, 7:7 + lanes] = block.T
        np.testing.assert_array_equal(got[1:].reshape(24, 40), want, err_msg=f"rows={rows}")


@needs_compiler
@needs_avx512
def test_attention_kernels_match_pure_jax_on_sharp_scores(monkeypatch):
    """Scores tens apart (a softmax that is nearly one-hot, exps spanning the float range)."""
    rng = np.random.default_rng(11)
    b, t, h, d, bs = 2, 70, 4, 32, 16
    width = -(-t // bs)
    k, v = paged(rng, b * width, h, bs, d, "float32", scale=4.0)
    q = 4 * rng.standard_normal((b, t, h, d)).astype(np.float32)
    tables = np.arange(b * width, dtype=np.int32)[::-1].reshape(b, width).copy()
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    got = jax.jit(lambda *a: kernels.prefill_attention(*a, 1.0))(q, positions, k, v, tables)
    last = np.array([t - 1, t // 2], np.int32)
    step = jax.jit(lambda *a: kernels.decode_attention(*a, 1.0))(q[:, -1], tables, last, k, v)
    want = pure_jax(monkeypatch, q, positions, k, v, tables, 1.0)
    want_step = pure_jax(monkeypatch, q[:, -1:], last[:, None], k, v, tables, 1.0)
    np.testing.assert_allclose(np.asarray(got).reshape(b, t, h * d), want, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(step).reshape(b, h * d), want_step.reshape(b, h * d), atol=2e-5, rtol=1e-4)


@needs_compiler
@needs_avx512
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 6, 40])
def test_attention_kernels_soft_cap_scores_as_pure_jax(monkeypatch, dtype, window):
    """Gemma 2's soft-capping (scores cap * tanh(scores / cap)) in both kernels: scores tens
    apart, so a cap of 5 changes the softmax a lot; GQA groups of 2, windows none / short / long."""
    rng = np.random.default_rng(17)
    b, t, h, kv, d, bs, cap = 2, 50, 4, 2, 32, 16, 5.0
    width = -(-t // bs)
    k, v = paged(rng, b * width, kv, bs, d, dtype, scale=3.0)
    q = 3 * rng.standard_normal((b, t, h, d)).astype(np.float32)
    tables = np.arange(b * width, dtype=np.int32)[::-1].reshape(b, width).copy()
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    last = np.array([t - 1, t // 2], np.int32)
    scale = d ** -0.5
    step = jax.jit(lambda *a: kernels.decode_attention(*a, scale, window or 0, cap))(q[:, -1], tables, last, k, v)
    want_step = pure_jax(monkeypatch, q[:, -1:], last[:, None], k, v, tables, scale, window, cap)
    np.testing.assert_allclose(np.asarray(step).reshape(b, h * d), want_step.reshape(b, h * d), atol=2e-5, rtol=1e-4)
    uncapped = pure_jax(monkeypatch, q[:, -1:], last[:, None], k, v, tables, scale, window)
    assert np.abs(uncapped - want_step).max() > 0.1  # the cap matters here
    if dtype == "float32":  # the prefill kernel takes float32 pools
        got = jax.jit(lambda *a: kernels.prefill_attention(*a, scale, window or 0, cap))(q, positions, k, v, tables)
        want = pure_jax(monkeypatch, q, positions, k, v, tables, scale, window, cap)
        np.testing.assert_allclose(np.asarray(got).reshape(b, t, h * d), want, atol=2e-5, rtol=1e-4)


@needs_compiler
def test_argmax_matches_numpy_with_ties():
    rng = np.random.default_rng(7)
    fn = jax.jit(kernels.argmax)
    for b, v in [(1, 1), (3, 15), (2, 16), (5, 50257), (32, 1000)]:
        x = rng.standard_normal((b, v)).astype(np.float32)
        x[0, v // 2] = x[0, v - 1] = 9.0  # a tie: the first index wins
        np.testing.assert_array_equal(np.asarray(fn(x)), np.argmax(x, axis=-1), err_msg=f"b={b} v={v}")
    x = np.full((2, 40), -np.inf, np.float32)
    x[1, 33] = 0.0
    np.testing.assert_array_equal(np.asarray(fn(x)), [0, 33])


@needs_compiler
def test_decode_steps_call_the_kernel_and_match_without_it(monkeypatch):
    """A decode step's program holds the custom calls and gives the logits and cache of the
    pure-JAX program (SAX_CPU_KERNELS=0) on a prefilled cache of several blocks; the prefill
    calls the prefill-attention kernel, and its layers (more rows than the matmul kernel
    takes) keep XLA's dot."""
    spec = base.ModelSpec(family="llama", model_type="llama", vocab_size=64, hidden_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                          max_position_embeddings=64)
    params = base.random_params(spec, seed=3)
    seqs = np.random.default_rng(0).integers(0, 64, size=(3, 40)).astype(np.int32)
    slots = np.array([[6, 7, 8], [0, 1, 2], [5, 4, 3]], np.int32)  # block tables
    prefill_args = (params, seqs[:, :39], np.tile(np.arange(39, dtype=np.int32), (3, 1)),
                    base.init_cache(spec, 9, 16, jnp.float32), slots, np.full((3,), 38, np.int32))
    prefill = jax.jit(base.make_forward_last(spec)).lower(*prefill_args)
    calls = [line for line in prefill.as_text().splitlines() if "@saxplane_matmul" in line]
    assert all("(tensor<3x64xf32>" in line for line in calls)  # the last tokens' logits only
    assert ("saxplane_prefill_attention" in prefill.as_text()) == kernels._has_avx512()
    _, cache = prefill.compile()(*prefill_args)
    args = (params, seqs[:, 39:], np.full((3, 1), 39, np.int32), cache, slots, np.zeros((3,), np.int32))
    step = base.make_forward_last(spec)
    with_kernel = jax.jit(lambda *a: step(*a)).lower(*args)  # a new function each: traced anew
    assert "saxplane_decode_attention" in with_kernel.as_text()
    assert ("saxplane_matmul" in with_kernel.as_text()) == kernels._has_avx512()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    without = jax.jit(lambda *a: step(*a)).lower(*args)
    assert "saxplane_decode_attention" not in without.as_text()
    assert "saxplane_matmul" not in without.as_text()
    (a, cache_a), (b, cache_b) = with_kernel.compile()(*args), without.compile()(*args)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for x, y in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)  # later layers: ~1e-7 apart


def test_without_a_compiler_the_pure_jax_path_serves(tmp_path):
    """A failed build is logged and turns the kernels off; nothing else changes."""
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from model_server import kernels\n"
            "print('ENABLED', kernels.enabled())\n")
    env = dict(os.environ, CXX="/bin/false", SAX_KERNEL_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ENABLED False" in proc.stdout
    assert "CPU kernels unavailable, using pure JAX" in proc.stderr
