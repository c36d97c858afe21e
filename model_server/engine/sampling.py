"""On-device sampling: logit processing, top-k/top-p, seeded noise and logprobs.

Everything here is pure and traced inside the engine's jitted step functions; per-row
settings are arrays, so no request ever causes a compilation. Work that only some requests
need (penalties, logit bias, truncation, noise, logprobs) sits behind `lax.cond` on "any row
needs it", so a batch of greedy requests pays for an argmax only.

Order (as vLLM): grammar token mask (guided decoding; rows without a grammar have all bits
set, and a batch without any skips it) -> logit bias -> repetition / frequency / presence penalties -> temperature ->
top-k -> top-p -> sample. Reported logprobs are those of the raw model logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from model_server import kernels
from model_server.engine.types import MAX_LOGPROBS

F32 = jnp.float32
#: Candidates taken with lax.top_k for the fast (exact) top-k / top-p path.
TOPK_CANDIDATES = 64
#: Temperatures below this are greedy.
MIN_TEMPERATURE = 1e-5


def fast_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties): on the CPU the native kernel, else two
    plain reductions, which XLA:CPU vectorises far better than its variadic argmax reduction."""
    if x.ndim == 2 and x.dtype == jnp.float32 and kernels.enabled():
        return kernels.argmax(x)
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- random

def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit integer hash finaliser (lowbias32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def uniform(keys: jax.Array, counters: jax.Array, n: int) -> jax.Array:
    """Counter-based uniforms in (0, 1): [B, n] from per-row keys [B, 2] uint32 and counters [B].

    A stateless hash of (key, counter, column): the same key and counter give the same numbers
    whatever else is in the batch. Much cheaper on CPU than threefry for vocabulary-sized draws.
    """
    c = counters.astype(jnp.uint32)
    s1 = _mix(keys[:, 0] ^ _mix(keys[:, 1] + c * jnp.uint32(0x9E3779B9)))
    s2 = _mix(s1 + jnp.uint32(0x632BE5AB) + keys[:, 1])
    col = lax.broadcasted_iota(jnp.uint32, (keys.shape[0], n), 1)
    h = _mix(col * jnp.uint32(0x9E3779B1) + s1[:, None])
    h = _mix(h ^ s2[:, None])
    # The top draw, (2^24 - 0.5) / 2^24, rounds to 1.0 in float32: clamp it below 1, or its
    # Gumbel noise is +inf and that token wins whatever its logit (or its mask) says.
    u = ((h >> 8).astype(F32) + 0.5) * F32(1.0 / (1 << 24))
    return jnp.minimum(u, F32(1.0 - 2.0 ** -24))


def gumbel(keys: jax.Array, counters: jax.Array, n: int) -> jax.Array:
    return -jnp.log(-jnp.log(uniform(keys, counters, n)))


# --------------------------------------------------------------------------- processing

def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Packed bitmask [B, ceil(V/32)] int32 (bit t % 32 of word t // 32: token t allowed);
    disallowed tokens get -inf."""
    v = logits.shape[-1]
    tok = jnp.arange(v, dtype=jnp.int32)
    bits = (mask[:, tok >> 5] >> (tok & 31)[None, :]) & 1
    return jnp.where(bits != 0, logits, -jnp.inf)


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias_vals: jax.Array) -> jax.Array:
    """Sparse bias: ids [B, M] (padding = vocab size, dropped), values [B, M]."""
    rows = lax.broadcasted_iota(jnp.int32, bias_ids.shape, 0)
    return logits.at[rows, bias_ids].add(bias_vals, mode="drop")


def apply_penalties(logits: jax.Array, counts: jax.Array, prompt_mask: jax.Array,
                    presence: jax.Array, frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """Repetition penalty (HF/vLLM: over prompt and output tokens), then OpenAI's frequency
    and presence penalties (output tokens only). counts [B, V] int32, prompt_mask [B, V] bool."""
    seen = counts > 0
    rep = repetition[:, None]
    hit = (seen | prompt_mask) & (rep != 1.0)
    logits = jnp.where(hit, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts.astype(F32) - presence[:, None] * seen.astype(F32)


# --------------------------------------------------------------------------- truncation

def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order."""
    i = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _unsortable(k: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k), F32)


def _ceil_mid(lo: jax.Array, hi: jax.Array) -> jax.Array:
    return (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)


def _bisect_thresholds(scaled: jax.Array, k_eff: jax.Array, top_p: jax.Array, lse: jax.Array) -> jax.Array:
    """Exact top-k then top-p thresholds by bisection over the float order.

    One loop of 64 steps: the first 32 find the top-k threshold (largest t with
    count(x >= t) >= k), the last 32 the nucleus threshold within it (largest t whose mass
    over the top-k set reaches top_p). Each bisection over int32 keys is exact in 32 steps.
    """
    key = _sortable(scaled)
    lo0, hi0 = jnp.min(key, axis=-1), jnp.max(key, axis=-1)
    prob = jnp.exp(scaled - lse[:, None])

    def step(i, c):
        lo, hi, tk = c
        first = i < 32
        restart = i == 32  # phase 2 starts from the top-k threshold
        lo = jnp.where(restart, lo, lo)
        tk = jnp.where(restart, lo, tk)
        hi = jnp.where(restart, hi0, hi)
        mid = _ceil_mid(lo, hi)
        ge = key >= mid[:, None]
        inside = key >= tk[:, None]
        count_ok = jnp.sum(ge, axis=-1) >= k_eff
        mass = jnp.sum(jnp.where(ge & inside, prob, 0.0), axis=-1)
        total = jnp.sum(jnp.where(inside, prob, 0.0), axis=-1)
        ok = jnp.where(first, count_ok, mass >= top_p * total)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1), tk

    lo, _, tk = lax.fori_loop(0, 64, step, (lo0, hi0, lo0))
    return _unsortable(jnp.where(top_p >= 1.0, tk, lo))


def truncation_thresholds(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row threshold on `scaled` (temperature-scaled logits) implementing top-k then top-p
    (nucleus over the renormalised top-k set); -inf where a row keeps everything.

    Fast path: the TOPK_CANDIDATES best candidates settle every row whose top-k is within them,
    or whose nucleus is; the rest (rare: top_k beyond the candidates, or a flat distribution
    whose nucleus is wider) fall back to an exact bisection, run only when some row needs it.
    """
    b, v = scaled.shape
    kc = min(TOPK_CANDIDATES, v)
    cv, _ = lax.top_k(scaled, kc)
    lse = jax.nn.logsumexp(scaled, axis=-1)
    k_eff = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    in_k = jnp.arange(kc)[None, :] < k_eff[:, None]
    p = jnp.where(in_k, jnp.exp(cv - lse[:, None]), 0.0)
    k_inside = k_eff <= kc
    z = jnp.where(k_inside, jnp.sum(p, axis=-1), 1.0)
    tri = (jnp.arange(kc)[:, None] <= jnp.arange(kc)[None, :]).astype(F32)
    cum = (p @ tri) / z[:, None]  # cumulative sums (a tiny matmul: cheaper than a scan on CPU)
    prev = cum - p / z[:, None]
    p_lim = jnp.where(top_p >= 1.0, jnp.inf, top_p)
    keep = in_k & (prev < p_lim[:, None])
    last = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
    tau = jnp.take_along_axis(cv, last[:, None], axis=-1)[:, 0]
    keep_all = (k_eff == v) & (top_p >= 1.0)
    exact = k_inside | ((k_eff == v) & (cum[:, -1] >= top_p))
    tau = jnp.where(keep_all, -jnp.inf, tau)
    fallback = ~keep_all & ~exact
    return lax.cond(jnp.any(fallback),
                    lambda: jnp.where(fallback, _bisect_thresholds(scaled, k_eff, top_p, lse), tau),
                    lambda: tau)


# --------------------------------------------------------------------------- step

def sample(logits: jax.Array, p: dict, counts_fn, prompt_mask_fn, counters: jax.Array,
           token_mask: jax.Array | None = None) -> jax.Array:
    """Next token per row. `p` holds per-row arrays: active, temperature, top_k, top_p,
    presence, frequency, repetition, has_bias, bias_ids, bias_vals, keys (and `guided` where
    `token_mask`, the rows' packed grammar bitmask, is given). `counts_fn()` /
    `prompt_mask_fn()` give the rows' [B, V] output counts / prompt mask (only called inside
    the penalty branch, so batches without penalties never gather them)."""
    act = p["active"]
    if token_mask is not None:
        logits = lax.cond(jnp.any(act & p["guided"]), lambda x: apply_token_mask(x, token_mask),
                          lambda x: x, logits)
    l = lax.cond(jnp.any(act & p["has_bias"]),
                 lambda x: apply_logit_bias(x, p["bias_ids"], p["bias_vals"]), lambda x: x, logits)
    pen = act & ((p["presence"] != 0) | (p["frequency"] != 0) | (p["repetition"] != 1))
    l = lax.cond(jnp.any(pen),
                 lambda x: apply_penalties(x, counts_fn(), prompt_mask_fn(), p["presence"],
                                           p["frequency"], p["repetition"]),
                 lambda x: x, l)
    temp = p["temperature"]
    sampled = act & (temp >= MIN_TEMPERATURE)

    def sample_branch(x):
        t = jnp.where(sampled, temp, 1.0)
        scaled = x / t[:, None]
        trunc = sampled & (((p["top_k"] > 0) & (p["top_k"] < x.shape[-1])) | (p["top_p"] < 1.0))
        tau = lax.cond(jnp.any(trunc),
                       lambda: jnp.where(trunc, truncation_thresholds(scaled, p["top_k"], p["top_p"]),
                                         -jnp.inf),
                       lambda: jnp.full(x.shape[:1], -jnp.inf, F32))
        noisy = jnp.where(scaled >= tau[:, None], scaled + gumbel(p["keys"], counters, x.shape[-1]),
                          -jnp.inf)
        return jnp.where(sampled[:, None], noisy, x)

    score = lax.cond(jnp.any(sampled), sample_branch, lambda x: x, l)
    return fast_argmax(score)


def logprob_outputs(logits: jax.Array, chosen: jax.Array, want: jax.Array, want_top: jax.Array,
                    k: int = MAX_LOGPROBS):
    """Raw-logit logprobs: (chosen [B], top ids [B, k], top logprobs [B, k]); zeros unless
    `want` / `want_top` (scalars) say some row asked for them."""
    b, v = logits.shape
    k = min(k, v)

    def lp():
        lse = jax.nn.logsumexp(logits, axis=-1)
        ch = jnp.take_along_axis(logits, chosen[:, None], axis=-1)[:, 0] - lse

        def top():
            tv, ti = lax.top_k(logits, k)
            return ti.astype(jnp.int32), tv - lse[:, None]

        ti, tl = lax.cond(want_top, top,
                          lambda: (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), F32)))
        return ch, ti, tl

    return lax.cond(want, lp, lambda: (jnp.zeros((b,), F32), jnp.zeros((b, k), jnp.int32),
                                       jnp.zeros((b, k), F32)))
