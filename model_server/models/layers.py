"""Shared building blocks: norms, RoPE, activations and cached attention."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model_server import kernels
from model_server.models.quant import QTensor, is_quantized

F32 = jnp.float32


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as in HF Llama: normalise in float32, cast back, then scale."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: normalise and scale by (1 + weight) in float32, then cast back."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + weight.astype(F32))).astype(x.dtype)


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
    """Rotate-half RoPE. x: [B, T, H, D]; positions: [B, T]. With fewer frequencies than
    D / 2 (partial rotary), only the leading 2 * len(inv_freq) dims rotate."""
    rot = 2 * len(inv_freq)
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rot], positions, inv_freq), x[..., rot:]], axis=-1)
    freqs = positions.astype(F32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos = jnp.cos(emb).astype(x.dtype)
    sin = jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


#: Query rows per block of causal self-attention: key blocks past a query block are skipped.
CAUSAL_BLOCK = 64


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """Token `index[b]` of each row: [B, T, ...] -> [B, 1, ...]."""
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def last_layer_rows(layer: int, num_layers: int, last_index: Optional[jax.Array], x: jax.Array,
                    h: jax.Array, positions: jax.Array):
    """(x, h, query positions) for a layer's queries, attention output and MLP.

    In the last layer, when only token `last_index[b]` of each row is wanted (a prefill, whose
    other positions need only their keys and values in the cache), that token alone:
    x, h [B, 1, D] and its positions [B, 1]. The layer's keys and values are computed from
    the whole `h` before this. Elsewhere: unchanged, and None (the queries' positions are the
    tokens').
    """
    if last_index is None or layer != num_layers - 1 or x.shape[1] == 1:
        return x, h, None
    return take_rows(x, last_index), take_rows(h, last_index), take_rows(positions, last_index)


def visible(key_pos: jax.Array, query_pos: jax.Array, window: Optional[int]) -> jax.Array:
    """Whether a key at `key_pos` is visible to a query at `query_pos` (broadcast): causal,
    and within the last `window` positions when there is a window."""
    mask = key_pos <= query_pos
    return mask if not window else mask & (key_pos > query_pos - window)


def write_kv(pools: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, positions: jax.Array,
             block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, T, KV, D] into the paged pools ([blocks, KV, block_size, D] each):
    token (b, t) goes to block `block_tables[b, positions[b, t] // block_size]` at offset
    `positions[b, t] % block_size`. Positions past the table, and table entries out of the
    pool's range (padding), are dropped."""
    kp, vp = pools
    nb, bs = kp.shape[0], kp.shape[2]
    width = block_tables.shape[1]
    index = positions // bs
    inside = (positions >= 0) & (index < width)
    ids = jnp.take_along_axis(block_tables, jnp.clip(index, 0, width - 1), axis=1)
    ids = jnp.where(inside & (ids >= 0), ids, nb)
    offsets = positions % bs
    return _write_pool(kp, k, ids, offsets), _write_pool(vp, v, ids, offsets)


def _write_pool(pool: jax.Array | QTensor, x: jax.Array, ids: jax.Array, offsets: jax.Array):
    """x [B, T, KV, D] into `pool` at (ids, :, offsets); an int8 pool gets each (position,
    head) row quantized symmetrically with its own scale max|row| / 127."""
    if not is_quantized(pool):
        return pool.at[ids, :, offsets].set(x.astype(pool.dtype), mode="drop")
    xf = x.astype(F32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8)
    return QTensor(pool.q.at[ids, :, offsets].set(q, mode="drop"),
                   pool.scale.at[ids, :, offsets].set(scale, mode="drop"))


def gather_blocks(pool: jax.Array | QTensor, block_tables: jax.Array, dtype: Optional[jnp.dtype] = None
                  ) -> jax.Array:
    """The positions a table covers, in order: [B, KV, K * block_size, D] (an int8 pool's
    dequantized into `dtype`)."""
    b, width = block_tables.shape
    _, kv, bs, d = pool.shape
    if is_quantized(pool):
        q = gather_blocks(pool.q, block_tables)
        s = jnp.moveaxis(jnp.take(pool.scale, block_tables, axis=0, mode="clip"), 2, 1).reshape(b, kv, width * bs)
        return (q.astype(F32) * s[..., None]).astype(dtype or F32)
    rows = jnp.take(pool, block_tables, axis=0, mode="clip")  # [B, K, KV, bs, D]
    return jnp.moveaxis(rows, 2, 1).reshape(b, kv, width * bs, d)


def paged_attention(q: jax.Array, q_positions: jax.Array, pools: tuple[jax.Array, jax.Array],
                    block_tables: jax.Array, scale: float, window: Optional[int] = None,
                    softcap: float = 0.0) -> jax.Array:
    """Queries q [B, Tq, H, D] at `q_positions` [B, Tq] against their sequences in the paged
    pools (through `block_tables` [B, K]): key j is at position j. -> [B, Tq, H*D].

    On the CPU the native kernels read the pools through the tables (a decode step: one query
    per row; a prefill chunk: the register-tiled kernel); elsewhere (GPU/TPU, several
    devices) the table's blocks are gathered and attended in JAX.
    """
    b, tq, h, d = q.shape
    kp, vp = pools
    if kernels.enabled():
        if tq == 1:
            out = kernels.decode_attention(q[:, 0], block_tables, q_positions[:, 0], kp, vp, scale, window or 0,
                                           softcap)
            return out.reshape(b, 1, h * d).astype(q.dtype)
        if kernels.use_prefill_attention(d, kp.shape[2], q.dtype, kp.dtype, vp.dtype):
            out = kernels.prefill_attention(q, q_positions, kp, vp, block_tables, scale, window or 0, softcap)
            return out.reshape(b, tq, h * d).astype(q.dtype)
    keys, vals = gather_blocks(kp, block_tables, q.dtype), gather_blocks(vp, block_tables, q.dtype)
    span = keys.shape[2]
    mask = visible(jnp.arange(span, dtype=q_positions.dtype)[None, None, :], q_positions[:, :, None], window)
    return _attend(q, [keys], [vals], mask, scale, softcap)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
              layer_cache: Optional[tuple[jax.Array, jax.Array]], block_tables: Optional[jax.Array],
              scale: float, q_positions: Optional[jax.Array] = None, window: Optional[int] = None,
              softcap: float = 0.0):
    """Grouped-query attention, with the paged KV cache or without any.

    q: [B, Tq, H, D]; k, v: [B, T, KV, D]; positions: [B, T] (the keys'). `q_positions`
    [B, Tq]: the queries' positions when they are fewer than the keys (e.g. the last token
    only, when nothing else of the layer's output is used); None: `positions`. layer_cache:
    the (keys, values) pools [blocks, KV, block_size, D] with `block_tables` [B, K]: the new
    k/v are written at their positions (`write_kv`) and the queries attend to their sequences
    in the pool, cached prefix included (`paged_attention`); None: the tokens attend to one
    another only (scoring, embeddings). `window`: a query at position p sees only keys at
    positions (p - window, p] (sliding-window attention); None: all up to p. `softcap`: scores
    become softcap * tanh(scores / softcap) before the mask (Gemma 2); 0: unchanged.
    Returns (out [B, Tq, H*D], new layer cache or None).
    """
    qpos = positions if q_positions is None else q_positions
    if layer_cache is not None:
        new_cache = write_kv(layer_cache, k, v, positions, block_tables)
        return paged_attention(q, qpos, new_cache, block_tables, scale, window, softcap), new_cache
    if q_positions is not None:
        mask = visible(positions[:, None, :], q_positions[:, :, None], window)  # [B, Tq, T]
        return _attend(q, [jnp.swapaxes(k, 1, 2)], [jnp.swapaxes(v, 1, 2)], mask, scale, softcap), None
    return causal_self_attention(q, k, v, positions, scale, window, softcap), None


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                          scale: float, window: Optional[int] = None, softcap: float = 0.0) -> jax.Array:
    """Attention of T tokens to one another, causal by position (and within `window`), in
    blocks of query rows.

    Positions must not decrease along a row (true of every prompt), so a query block never
    attends to keys after its last row and those key blocks are skipped: about half the work
    of the full T x T product for long prompts.
    """
    b, t, h, d = q.shape
    keys, vals = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, D]
    if kernels.use_prefill_attention(d, t, q.dtype, k.dtype, v.dtype):
        # each row's keys as one block of a pool of B blocks (prompts' positions are 0..T-1)
        tables = jnp.arange(b, dtype=jnp.int32)[:, None]
        out = kernels.prefill_attention(q, positions, keys, vals, tables, scale, window or 0, softcap)
        return out.reshape(b, t, h * d)
    outs = []
    for start in range(0, t, CAUSAL_BLOCK):
        stop = min(t, start + CAUSAL_BLOCK)
        mask = visible(positions[:, None, :stop], positions[:, start:stop, None], window)  # [B, Tq, Tk]
        outs.append(_attend(q[:, start:stop], [keys[:, :, :stop]], [vals[:, :, :stop]], mask, scale, softcap))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _attend(q: jax.Array, keys: Sequence[jax.Array], vals: Sequence[jax.Array], mask: jax.Array,
            scale: float, softcap: float = 0.0) -> jax.Array:
    """q [B, T, H, D] against consecutive key/value blocks [B, KV, S_j, D] under mask
    [B, T, sum S_j] -> [B, T, H*D].

    Scores and their sums are float32; the output is normalised after the value product
    (a [T, D] division instead of a [T, S] one).
    """
    b, t, h, d = q.shape
    kv = keys[0].shape[1]
    qg = q.reshape(b, t, kv, h // kv, d).astype(keys[0].dtype)
    parts = [jnp.einsum("btkgd,bksd->bkgts", qg, kb, preferred_element_type=F32) for kb in keys]
    scores = (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(F32).min)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out, start = None, 0
    for vb in vals:
        part = e[..., start:start + vb.shape[2]] if len(vals) > 1 else e
        start += vb.shape[2]
        o = jnp.einsum("bkgts,bksd->btkgd", part.astype(vb.dtype), vb).astype(F32)
        out = o if out is None else out + o
    out = out / jnp.moveaxis(jnp.sum(e, axis=-1), -1, 1)[..., None]  # [B, T, KV, G, 1]
    return out.reshape(b, t, h * d).astype(q.dtype)


def linear(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None,
           out_dtype: Optional[jnp.dtype] = None) -> jax.Array:
    """x [..., in] times w [out, in] (torch Linear's layout), accumulated in float32 when
    `out_dtype` is float32. The few rows of a CPU decode step go to the native kernel."""
    return linears(x, [w], [b], out_dtype)[0]


def linears(x: jax.Array, ws: Sequence[jax.Array], bs: Sequence[Optional[jax.Array]],
            out_dtype: Optional[jnp.dtype] = None) -> list[jax.Array]:
    """`linear` of the same x by several weights. On the native kernel's path they are one
    call (the inputs read once, the weights streamed back to back, one spread of the work over
    the threads): XLA fuses such sibling products itself, but not custom calls."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    quantized = [is_quantized(w) for w in ws]
    if all(quantized) and kernels.use_matmul_q8(rows, x.dtype):
        ys = [y.reshape(*lead, w.shape[0]) for y, w in zip(kernels.matmul_q8(x.reshape(rows, k), *ws), ws)]
        ys = [y if out_dtype == F32 else y.astype(x.dtype) for y in ys]
    elif not any(quantized) and kernels.use_matmul(rows, x.dtype, *(w.dtype for w in ws)):
        ys = [y.reshape(*lead, w.shape[0]) for y, w in zip(kernels.matmul(x.reshape(rows, k), *ws), ws)]
    else:
        ys = [_dot_q8(x, w, out_dtype) if q else jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)
              for w, q in zip(ws, quantized)]
    return [y if b is None else y + b for y, b in zip(ys, bs)]


def _dot_q8(x: jax.Array, w: QTensor, out_dtype: Optional[jnp.dtype]) -> jax.Array:
    """x . w^T for an int8 weight: (x . q^T) * scale, q converted to x's dtype (exact) inside
    the product and float32 accumulation (XLA fuses the conversion into the dot)."""
    y = jnp.einsum("...i,oi->...o", x, w.q.astype(x.dtype), preferred_element_type=F32) * w.scale
    return y.astype(out_dtype or x.dtype)


def embed_rows(table: jax.Array | QTensor, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `tokens` of an embedding table (plain or int8) in `dtype`."""
    if is_quantized(table):
        return table.rows(tokens, dtype)
    return jnp.take(table, tokens, axis=0, mode="clip")


def qkv(h: jax.Array, h_q: jax.Array, ws: Sequence[jax.Array], bs: Sequence[Optional[jax.Array]]):
    """A layer's (queries, keys, values): the keys and values from h, the queries from h_q,
    which is h itself except in a prefill's last layer (see `last_layer_rows`)."""
    if h_q is h:
        return linears(h, ws, bs)
    k, v = linears(h, ws[1:], bs[1:])
    return linear(h_q, ws[0], bs[0]), k, v
