"""Shared building blocks: norms, RoPE, activations and cached attention."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as in HF Llama: normalise in float32, cast back, then scale."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(F32) + bias.astype(F32)).astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] (float32), incl. linear and Llama-3 scaling."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, H, D]; positions: [B, T]."""
    freqs = positions.astype(F32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos = jnp.cos(emb).astype(x.dtype)
    sin = jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
              layer_cache: Optional[tuple[jax.Array, jax.Array]], slot_ids: Optional[jax.Array],
              scale: float):
    """Grouped-query attention with an optional slot KV cache.

    q: [B, T, H, D]; k, v: [B, T, KV, D]; positions: [B, T].
    layer_cache: (k, v) each [N, KV, S, D] or None. Returns (out [B, T, H*D], new layer cache).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if layer_cache is None:
        keys = jnp.swapaxes(k, 1, 2)  # [B, KV, T, D]
        vals = jnp.swapaxes(v, 1, 2)
        mask = positions[:, None, :] <= positions[:, :, None]  # [B, Tq, Tk]
        new_cache = None
    else:
        ck, cv = layer_cache
        s = ck.shape[2]
        rows = jnp.arange(b, dtype=jnp.int32) if slot_ids is None else slot_ids
        idx = (rows[:, None], slice(None), positions)
        ck = ck.at[idx].set(k.astype(ck.dtype), mode="drop")  # value [B, T, KV, D]
        cv = cv.at[idx].set(v.astype(cv.dtype), mode="drop")
        if slot_ids is None:
            keys, vals = ck, cv
        else:
            keys, vals = ck[slot_ids], cv[slot_ids]  # [B, KV, S, D]
        mask = jnp.arange(s, dtype=positions.dtype)[None, None, :] <= positions[:, :, None]
        new_cache = (ck, cv)
    qg = q.reshape(b, t, kv, h // kv, d).astype(keys.dtype)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=F32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, vals)
    return out.reshape(b, t, h * d).astype(q.dtype), new_cache


def linear(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x, w)
    return y if b is None else y + b
