// Causal self-attention of a prefill (T prompt tokens attending to one another), an XLA FFI
// custom call for the CPU.
//
// q [B, T, H, D], k and v [B, T, KV, D] float32 (D a multiple of the vector width),
// positions [B, T] int32 (not decreasing along a row, as in every prompt); key j is visible to
// query i when positions[j] <= positions[i] and, with a window w > 0 (sliding-window
// attention), positions[j] > positions[i] - w. Output [B, T, H, D] float32: softmax(q . k *
// scale) . v with float32 scores and sums, normalised after the value product, as
// model_server/models/layers.py computes it.
//
// Why: XLA:CPU runs the batched per-head products of the pure-JAX formulation one head at a
// time on one thread, at about a quarter of the FMA peak. Here the keys of each (row, kv head)
// are transposed once, then every (row, head, block of kQB queries) item computes its scores
// in register tiles (queries x 64 keys), a softmax, and the value product in register tiles
// (queries x D), skipping the keys after its block; the items are spread over XLA's intra-op
// threads.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using saxplane::kLanes;
using saxplane::load;
using saxplane::store;
using saxplane::Vec;

constexpr int64_t kQB = 32;  // queries per item
constexpr int kQR = 6;       // queries per score tile
constexpr int kKV = 4;       // key vectors per score tile (64 keys with AVX-512)
constexpr size_t kKeptKeyFloats = size_t{4} << 20;  // 16 MB of transposed keys kept per thread

struct Problem {
  const float* q;  // [B, T, H, D]
  const float* k;  // [B, T, KV, D]
  const float* v;  // [B, T, KV, D]
  const int32_t* positions;  // [B, T]
  float* out;      // [B, T, H, D]
  float* kt;       // [B, KV, D, tp]: keys transposed, zero-padded to tp positions
  int64_t b, t, tp, h, kv, d;
  int64_t window;  // 0: none
  float scale;
};

void transpose_keys(const Problem& p, int64_t item) {
  const int64_t bi = item / p.kv, g = item % p.kv;
  float* dst = p.kt + item * p.d * p.tp;
  const float* src = p.k + (bi * p.t * p.kv + g) * p.d;  // key j at src + j * kv * d
  for (int64_t j0 = 0; j0 < p.t; j0 += kLanes) {  // head dims are multiples of kLanes
    for (int64_t x = 0; x < p.d; x += kLanes) {
      saxplane::transpose_block(src + j0 * p.kv * p.d + x, p.kv * p.d, p.t - j0, dst + x * p.tp + j0, p.tp);
    }
  }
  const int64_t written = (p.t + kLanes - 1) / kLanes * kLanes;  // padding past t already zeroed
  for (int64_t x = 0; x < p.d; ++x) std::fill(dst + x * p.tp + written, dst + (x + 1) * p.tp, 0.f);
}

// s[r, j0 + 0 .. JV * kLanes) = q[r] . keys * scale for R query rows (q rows `qstride` apart).
template <int R, int JV>
inline void score_tile(const float* q, int64_t qstride, const float* kt, int64_t tp, int64_t d,
                       int64_t j0, float scale, float* s, int64_t sstride) {
  Vec acc[R][JV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < JV; ++v) acc[r][v] = Vec{};
  for (int64_t x = 0; x < d; ++x) {
    Vec kv[JV];
    for (int v = 0; v < JV; ++v) kv[v] = load(kt + x * tp + j0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float qx = q[r * qstride + x];
      for (int v = 0; v < JV; ++v) acc[r][v] += kv[v] * qx;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < JV; ++v) store(s + r * sstride + j0 + v * kLanes, acc[r][v] * scale);
}

// out[r] = sum_j e[r, j] v[j] / sums[r] for R query rows, DV vectors of head dim.
template <int R, int DV>
inline void value_tile(const float* e, int64_t estride, const float* v, int64_t vstride, int64_t n,
                       const float* sums, float* out, int64_t ostride) {
  Vec acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < DV; ++x) acc[r][x] = Vec{};
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[DV];
    for (int x = 0; x < DV; ++x) vv[x] = load(v + j * vstride + x * kLanes);
    for (int r = 0; r < R; ++r) {
      const float w = e[r * estride + j];
      for (int x = 0; x < DV; ++x) acc[r][x] += vv[x] * w;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float inv = 1.f / sums[r];
    for (int x = 0; x < DV; ++x) store(out + r * ostride + x * kLanes, acc[r][x] * inv);
  }
}

template <int R, int DV>
inline void value_rows(const Problem& p, const float* e, int64_t estride, const float* v, int64_t n,
                       const float* sums, float* out, int64_t rows) {
  const int64_t vstride = p.kv * p.d, ostride = p.h * p.d;
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    value_tile<R, DV>(e + r * estride, estride, v, vstride, n, sums + r, out + r * ostride, ostride);
  }
  for (; r < rows; ++r) value_tile<1, DV>(e + r * estride, estride, v, vstride, n, sums + r, out + r * ostride, ostride);
}

template <int DV>
void attend_block(const Problem& p, int64_t item, std::vector<float>& scratch) {
  const int64_t blocks = (p.t + kQB - 1) / kQB;
  // the longest blocks (most keys) first, so that the last items taken are short
  const int64_t bi = item / (p.h * blocks), hi = (item / blocks) % p.h, qb = blocks - 1 - item % blocks;
  const int64_t g = hi / (p.h / p.kv);
  const int64_t q0 = qb * kQB, rows = std::min(kQB, p.t - q0);
  const int64_t n = q0 + rows;  // keys after the block's last query are never visible
  constexpr int64_t kw = kKV * kLanes;
  const int64_t nw = (n + kLanes - 1) / kLanes * kLanes;  // score columns computed (zero-padded keys)
  const int64_t d = DV * kLanes, qstride = p.h * d;
  scratch.resize(kQB * p.tp + kQB);
  float* s = scratch.data();
  float* sums = s + kQB * p.tp;
  const float* q = p.q + ((bi * p.t + q0) * p.h + hi) * d;
  const float* kt = p.kt + (bi * p.kv + g) * d * p.tp;
  const int32_t* pos = p.positions + bi * p.t;

  // Scores, key tile by key tile (it stays in L1 while every query row uses it).
  auto scores = [&](int64_t j0, auto jv) {
    constexpr int JV = decltype(jv)::value;
    int64_t r = 0;
    for (; r + kQR <= rows; r += kQR) {
      score_tile<kQR, JV>(q + r * qstride, qstride, kt, p.tp, d, j0, p.scale, s + r * p.tp, p.tp);
    }
    for (; r < rows; ++r) score_tile<1, JV>(q + r * qstride, qstride, kt, p.tp, d, j0, p.scale, s + r * p.tp, p.tp);
  };
  int64_t j0 = 0;
  for (; j0 + kw <= nw; j0 += kw) scores(j0, std::integral_constant<int, kKV>{});
  for (; j0 < nw; j0 += kLanes) scores(j0, std::integral_constant<int, 1>{});
  // Softmax numerators in place. Positions do not decrease, so the keys a query sees are a
  // prefix [0, seen) of the block's, or with a window a range [first, seen); the rest get
  // exactly 0.
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * p.tp;
    const int32_t pi = pos[q0 + r];
    const int64_t seen = std::upper_bound(pos, pos + n, pi) - pos;
    int64_t first = 0;
    if (p.window > 0) {
      const int64_t lowest = static_cast<int64_t>(pi) - p.window + 1;
      first = std::min<int64_t>(std::lower_bound(pos, pos + n, lowest) - pos, seen);
      std::fill(row, row + first, 0.f);
    }
    const float sum = saxplane::softmax_numerators(row + first, seen - first);
    std::fill(row + seen, row + n, 0.f);
    sums[r] = sum;
  }
  const float* v = p.v + (bi * p.t * p.kv + g) * d;
  float* out = p.out + ((bi * p.t + q0) * p.h + hi) * d;
  value_rows<(DV >= 8 ? 2 : (DV > 4 ? 4 : 6)), DV>(p, s, p.tp, v, n, sums, out, rows);
}

// Head dims (in vectors) with an instantiation below.
constexpr bool supported_head_vectors(int64_t dv) {
  return dv == 1 || dv == 2 || dv == 4 || dv == 5 || dv == 6 || dv == 8 || dv == 10 || dv == 12 || dv == 16;
}

void attend(const Problem& p, int64_t item) {
  thread_local std::vector<float> scratch;  // per-thread, reused across items and calls
  switch (p.d / kLanes) {
    case 2: return attend_block<2>(p, item, scratch);
    case 4: return attend_block<4>(p, item, scratch);
    case 5: return attend_block<5>(p, item, scratch);
    case 6: return attend_block<6>(p, item, scratch);
    case 8: return attend_block<8>(p, item, scratch);
    case 10: return attend_block<10>(p, item, scratch);
    case 12: return attend_block<12>(p, item, scratch);
    case 16: return attend_block<16>(p, item, scratch);
    default: return attend_block<1>(p, item, scratch);  // d == kLanes (checked by the caller)
  }
}

ffi::Error PrefillAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> positions,
                                ffi::ResultBuffer<ffi::F32> out, float scale, int32_t window) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2) {
    return ffi::Error::InvalidArgument("expected q [B, T, H, D], k and v [B, T, KV, D], positions [B, T]");
  }
  Problem p;
  p.b = qd[0], p.t = qd[1], p.h = qd[2], p.d = qd[3], p.kv = kd[2];
  for (int i : {0, 1, 3}) {
    if (kd[i] != qd[i] || vd[i] != qd[i]) return ffi::Error::InvalidArgument("q, k and v disagree");
  }
  if (vd[2] != p.kv || pd[0] != p.b || pd[1] != p.t) return ffi::Error::InvalidArgument("shapes disagree");
  if (p.kv == 0 || p.h % p.kv) return ffi::Error::InvalidArgument("heads must be a multiple of kv heads");
  if (p.d % kLanes || !supported_head_vectors(p.d / kLanes)) {
    return ffi::Error::InvalidArgument("unsupported head dim");
  }
  if (p.b == 0 || p.t == 0) return ffi::Error::Success();
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.positions = positions.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.window = window;
  p.tp = (p.t + kKV * kLanes - 1) / (kKV * kLanes) * (kKV * kLanes);
  // The caller's own buffer, kept across calls up to kKeptKeyFloats: a fresh one of a few MB
  // costs its page faults on every call (measured: ~0.15 ms of a 2 ms GPT-2 layer at 512
  // tokens); a long prompt's larger one is freed when the call ends. transpose_keys writes
  // all of it, padding included.
  thread_local std::vector<float> kept;
  std::vector<float> once;
  const size_t need = static_cast<size_t>(p.b * p.kv * p.d * p.tp);
  std::vector<float>& kt = need <= kKeptKeyFloats ? kept : once;
  kt.resize(need);
  p.kt = kt.data();
  saxplane::parallel_for(pool, p.b * p.kv, [&p](int64_t i) { transpose_keys(p, i); });
  const int64_t blocks = (p.t + kQB - 1) / kQB;
  saxplane::parallel_for(pool, p.b * p.h * blocks, [&p](int64_t i) { attend(p, i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxPrefillAttention, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window"));
