"""The batched LoRA delta (`model_server.models.lora`) against each row's own x . A^T . B^T,
for every bucket of used-slot counts, with the CPU kernels and on the pure-JAX path: rows of
the base get nothing, unused slots' (finite) weights never matter, and one compiled program serves
every pattern of adapters."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_server import kernels
from model_server.models import lora as LoRA

N, R, IN, OUT = 4, 3, 40, 24


def _stack(rng) -> dict:
    return {"a": rng.standard_normal((N, R, IN)).astype(np.float32),
            "b": rng.standard_normal((OUT, N, R)).astype(np.float32)}


def _want(x, y, ab, index):
    out = y.astype(np.float64).copy()
    for row, slot in enumerate(index):
        if slot >= 0:
            out[row] += x[row].astype(np.float64) @ ab["a"][slot].T @ ab["b"][:, slot].T
    return out


@pytest.mark.parametrize("kernels_on", ["1", "0"])
@pytest.mark.parametrize("rows,t", [(6, 1), (2, 1), (3, 5)])
def test_delta_matches_each_rows_own_product(monkeypatch, kernels_on, rows, t):
    monkeypatch.setenv(kernels.ENV_SWITCH, kernels_on)
    rng = np.random.default_rng(rows * 10 + t)
    ab = _stack(rng)
    x = rng.standard_normal((rows, t, IN)).astype(np.float32)
    y = rng.standard_normal((rows, t, OUT)).astype(np.float32)

    @jax.jit
    def fn(x, y, ab, index):
        return LoRA.add(y, x, LoRA.Lora.of([{"wq": ab}], index).layer(0), "wq")

    patterns = [[-1] * rows, [2] * rows, [-1, 3] + [3] * (rows - 2), [1, 0] + [-1] * (rows - 2),
                [0, 2, 3, -1, 2, 0][:rows], [3, 2, 1, 0, 1, 2][:rows]]
    for index in patterns:
        index = np.array(index, np.int32)
        got = np.asarray(fn(x, y, ab, index))
        np.testing.assert_allclose(got, _want(x, y, ab, index), rtol=1e-5, atol=1e-4, err_msg=str(index))
        # the weights of slots no row uses do not matter
        junk = {k: v.copy() for k, v in ab.items()}
        for s in set(range(N)) - set(index.tolist()):
            junk["a"][s] = 1e3 * rng.standard_normal((R, IN))
            junk["b"][:, s] = 1e3 * rng.standard_normal((OUT, R))
        np.testing.assert_allclose(np.asarray(fn(x, y, junk, index)), got, rtol=1e-6, atol=1e-6)
    assert fn._cache_size() == 1


def test_plan_buckets():
    assert LoRA.bucket_sizes(4, 32) == (1, 2, 4)
    assert LoRA.bucket_sizes(4, 2) == (1, 2)
    assert LoRA.bucket_sizes(6, 8) == (1, 2, 4, 6)
    assert LoRA.bucket_sizes(1, 8) == (1,)
    p = LoRA.plan(jnp.array([3, -1, 1, 3], jnp.int32), 4)
    assert p.order.tolist()[:2] == [1, 3]
    assert p.compact.tolist() == [1, -1, 0, 1]
    assert int(p.branch) == 2
    assert int(LoRA.plan(jnp.array([-1, -1], jnp.int32), 4).branch) == 0
    assert int(LoRA.plan(jnp.array([0, 1, 2, -1], jnp.int32), 4).branch) == 3


def test_set_slot_writes_one_slot():
    rng = np.random.default_rng(1)
    stack = jax.tree.map(jnp.asarray, [{"wq": _stack(rng)}])
    w = [{"wq": {"a": np.ones((R, IN), np.float32), "b": np.full((OUT, R), 2.0, np.float32)}}]
    out = LoRA.set_slot(stack, jnp.int32(2), w)
    np.testing.assert_array_equal(out[0]["wq"]["a"][2], 1.0)
    np.testing.assert_array_equal(out[0]["wq"]["b"][:, 2], 2.0)
    np.testing.assert_array_equal(out[0]["wq"]["a"][1], stack[0]["wq"]["a"][1])
    np.testing.assert_array_equal(out[0]["wq"]["b"][:, 3], stack[0]["wq"]["b"][:, 3])
