"""On-device sampling kernels against sort-based numpy references (no model)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_server.engine import sampling

B, V = 8, 384


def ref_keep(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """vLLM's order: top-k, then the smallest prefix of the renormalised top-k set with mass >= p."""
    order = np.argsort(-scaled, kind="stable")
    k = top_k if 0 < top_k < len(scaled) else len(scaled)
    kept = order[:k]
    p = np.exp(scaled[kept] - scaled[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    kept = kept[before < top_p] if top_p < 1 else kept
    mask = np.zeros(len(scaled), bool)
    mask[kept] = True
    return mask


@pytest.fixture(scope="module")
def thresholds():
    return jax.jit(sampling.truncation_thresholds)


@pytest.mark.parametrize("scale", [0.3, 3.0])  # flat (nucleus beyond the candidates) and peaked
def test_truncation_thresholds_are_exact(thresholds, scale):
    rng = np.random.default_rng(int(scale * 10))
    for _ in range(3):
        logits = (rng.standard_normal((B, V)) * scale).astype(np.float32)
        top_k = np.array([0, 1, 5, 64, 65, 200, 0, 300], np.int32)  # > 64 takes the bisection path
        top_p = np.array([0.9, 1.0, 0.5, 0.95, 1.0, 0.7, 0.3, 0.99], np.float32)
        tau = np.asarray(thresholds(logits, top_k, top_p))
        for i in range(B):
            keep = logits[i] >= tau[i]
            np.testing.assert_array_equal(keep, ref_keep(logits[i].astype(np.float64), int(top_k[i]), float(top_p[i])),
                                          err_msg=f"row {i}: top_k={top_k[i]} top_p={top_p[i]}")


def test_no_truncation_keeps_everything(thresholds):
    logits = np.random.default_rng(0).standard_normal((B, V)).astype(np.float32)
    tau = np.asarray(thresholds(logits, np.zeros(B, np.int32), np.ones(B, np.float32)))
    assert np.all(np.isneginf(tau))


def test_uniform_noise_is_keyed_and_counter_based():
    u = jax.jit(sampling.uniform, static_argnums=2)
    keys = np.array([[1, 2], [1, 2], [3, 4], [1, 2]], np.uint32)
    ctr = np.array([5, 5, 5, 6], np.int32)
    x = np.asarray(u(keys, ctr, 4096))
    assert np.all((x > 0) & (x < 1))
    np.testing.assert_array_equal(x[0], x[1])  # same key and counter
    assert not np.allclose(x[0], x[2]) and not np.allclose(x[0], x[3])
    assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / 12) < 0.01
    # rows do not depend on what else is in the batch
    np.testing.assert_array_equal(np.asarray(u(keys[:1], ctr[:1], 4096))[0], x[0])


def test_fast_argmax_matches_argmax():
    x = np.random.default_rng(1).standard_normal((B, V)).astype(np.float32)
    x[0, 7] = x[0, 9] = 100.0  # tie: first index
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling.fast_argmax)(x)), np.argmax(x, -1))


def test_penalties():
    logits = jnp.array([[1.0, -1.0, 2.0, 0.5]])
    counts = jnp.array([[2, 1, 0, 0]], jnp.int32)
    prompt = jnp.array([[False, False, True, False]])
    out = np.asarray(sampling.apply_penalties(logits, counts, prompt, jnp.array([0.5]), jnp.array([0.25]),
                                              jnp.array([2.0])))
    # repetition: /2 if positive, *2 if negative, for seen or prompt tokens; then -0.25*count - 0.5*seen
    np.testing.assert_allclose(out, [[0.5 - 0.5 - 0.5, -2.0 - 0.25 - 0.5, 1.0, 0.5]])
