// Attention of a prefill chunk (Tq prompt tokens of each row) to its sequence in the paged KV
// cache, an XLA FFI custom call for the CPU.
//
// q [B, Tq, H, D] float32 (D a multiple of the vector width), q_positions [B, Tq] int32 (not
// decreasing along a row, as in every prompt chunk), the pools k and v [num_blocks, KV,
// block_size, D] float32 (block_size a multiple of the vector width), block_tables [B, K]
// int32: position j of row b lies in block block_tables[b, j / block_size] (an id out of range
// reads block 0; such positions are never visible to a real query). The chunk's own keys and
// values are in the pool already. Key j is visible to query i when j <= q_positions[i] and,
// with a window w > 0 (sliding-window attention), j > q_positions[i] - w. Output [B, Tq, H, D]
// float32: softmax(q . k * scale) . v with float32 scores and sums (with a softcap c > 0,
// Gemma 2's soft-capping: scores c * tanh(scores / c) before the softmax), normalised after the value
// product, as model_server/models/layers.py computes it.
//
// Why: XLA:CPU runs the batched per-head products of the pure-JAX formulation one head at a
// time on one thread, at about a quarter of the FMA peak. Here the keys each (row, kv head)
// sees are gathered from the pool and transposed once (the values gathered beside them), then
// every (row, head, block of kQB queries) item computes its scores in register tiles (queries
// x 64 keys), a softmax, and the value product in register tiles (queries x D), skipping the
// keys after its block; the items are spread over XLA's intra-op threads.
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
constexpr size_t kKeptKeyFloats = size_t{8} << 20;  // 32 MB of gathered keys and values kept per thread

struct Problem {
  const float* q;  // [B, Tq, H, D]
  const float* k;  // [num_blocks, KV, bs, D]
  const float* v;  // [num_blocks, KV, bs, D]
  const int32_t* positions;  // [B, Tq]
  const int32_t* tables;     // [B, K]
  float* out;      // [B, Tq, H, D]
  float* kt;       // [B, KV, D, tp]: the visible keys transposed, zero-padded to tp positions
  float* vg;       // [B, KV, tp, D]: the visible values, gathered
  int64_t b, t, tp, h, kv, d, bs, nblocks, table_len;
  int64_t window;  // 0: none
  float scale;
  float softcap;  // > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)
};

// Keys a row's queries see: positions [0, last query position], within the table.
inline int64_t keys_of_row(const Problem& p, int64_t bi) {
  const int64_t last = p.positions[bi * p.t + p.t - 1];
  return std::clamp<int64_t>(last + 1, 0, p.table_len * p.bs);
}

void gather_keys(const Problem& p, int64_t item) {
  const int64_t bi = item / p.kv, g = item % p.kv;
  float* kdst = p.kt + item * p.d * p.tp;
  float* vdst = p.vg + item * p.tp * p.d;
  const int64_t n = keys_of_row(p, bi);
  const int32_t* table = p.tables + bi * p.table_len;
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // block sizes are multiples of kLanes
    int64_t blk = table[j0 / p.bs];
    blk = (blk < 0 || blk >= p.nblocks) ? 0 : blk;
    const int64_t at = ((blk * p.kv + g) * p.bs + j0 % p.bs) * p.d;
    const int64_t rows = std::min<int64_t>(kLanes, n - j0);
    for (int64_t x = 0; x < p.d; x += kLanes) {  // head dims are multiples of kLanes
      saxplane::transpose_block(p.k + at + x, p.d, rows, kdst + x * p.tp + j0, p.tp);
    }
    std::copy(p.v + at, p.v + at + rows * p.d, vdst + j0 * p.d);
  }
  const int64_t written = (n + kLanes - 1) / kLanes * kLanes;  // columns past n already zeroed
  for (int64_t x = 0; x < p.d; ++x) std::fill(kdst + x * p.tp + written, kdst + (x + 1) * p.tp, 0.f);
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
  const int64_t vstride = p.d, ostride = p.h * p.d;
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
  const int32_t* pos = p.positions + bi * p.t;
  // keys after the block's last query are never visible
  const int64_t n = std::clamp<int64_t>(static_cast<int64_t>(pos[q0 + rows - 1]) + 1, 1, keys_of_row(p, bi));
  constexpr int64_t kw = kKV * kLanes;
  const int64_t nw = (n + kLanes - 1) / kLanes * kLanes;  // score columns computed (zero-padded keys)
  const int64_t d = DV * kLanes, qstride = p.h * d;
  scratch.resize(kQB * p.tp + kQB);
  float* s = scratch.data();
  float* sums = s + kQB * p.tp;
  const float* q = p.q + ((bi * p.t + q0) * p.h + hi) * d;
  const float* kt = p.kt + (bi * p.kv + g) * d * p.tp;

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
  // Softmax numerators in place over the keys a query sees, [first, seen); the rest get
  // exactly 0.
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * p.tp;
    const int64_t pi = pos[q0 + r];
    const int64_t seen = std::clamp<int64_t>(pi + 1, 1, n);
    int64_t first = 0;
    if (p.window > 0) first = std::clamp<int64_t>(pi - p.window + 1, 0, seen - 1);
    std::fill(row, row + first, 0.f);
    if (p.softcap > 0.f) {
      const float cap = p.softcap, inv_cap = 1.f / p.softcap;
      for (int64_t j = first; j < seen; ++j) row[j] = std::tanh(row[j] * inv_cap) * cap;
    }
    const float sum = saxplane::softmax_numerators(row + first, seen - first);
    std::fill(row + seen, row + n, 0.f);
    sums[r] = sum;
  }
  const float* v = p.vg + (bi * p.kv + g) * p.tp * d;
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

ffi::Error PrefillAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> positions,
                                ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                ffi::Buffer<ffi::S32> block_tables, ffi::ResultBuffer<ffi::F32> out,
                                float scale, int32_t window, float softcap) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = positions.dimensions();
  auto td = block_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || td.size() != 2) {
    return ffi::Error::InvalidArgument(
        "expected q [B, T, H, D], positions [B, T], pools [blocks, KV, block_size, D], tables [B, K]");
  }
  Problem p;
  p.b = qd[0], p.t = qd[1], p.h = qd[2], p.d = qd[3];
  p.nblocks = kd[0], p.kv = kd[1], p.bs = kd[2], p.table_len = td[1];
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("the key and value pools disagree");
  }
  if (kd[3] != p.d || pd[0] != p.b || pd[1] != p.t || td[0] != p.b) return ffi::Error::InvalidArgument("shapes disagree");
  if (p.kv == 0 || p.h % p.kv) return ffi::Error::InvalidArgument("heads must be a multiple of kv heads");
  if (p.d % kLanes || !supported_head_vectors(p.d / kLanes)) {
    return ffi::Error::InvalidArgument("unsupported head dim");
  }
  if (p.bs % kLanes) return ffi::Error::InvalidArgument("the block size must be a multiple of the vector width");
  if (p.b == 0 || p.t == 0 || p.table_len == 0) return ffi::Error::Success();
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.positions = positions.typed_data();
  p.tables = block_tables.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.window = window;
  p.softcap = softcap;
  int64_t most = 1;
  for (int64_t bi = 0; bi < p.b; ++bi) most = std::max(most, keys_of_row(p, bi));
  p.tp = (most + kKV * kLanes - 1) / (kKV * kLanes) * (kKV * kLanes);
  // The caller's own buffer, kept across calls up to kKeptKeyFloats: a fresh one of a few MB
  // costs its page faults on every call (measured: ~0.15 ms of a 2 ms GPT-2 layer at 512
  // tokens); a long prompt's larger one is freed when the call ends. gather_keys writes all
  // of the transposed keys, padding included, and the values the queries read.
  thread_local std::vector<float> kept;
  std::vector<float> once;
  const size_t need = static_cast<size_t>(2 * p.b * p.kv * p.d * p.tp);
  std::vector<float>& buf = need <= kKeptKeyFloats ? kept : once;
  buf.resize(need);
  p.kt = buf.data();
  p.vg = buf.data() + need / 2;
  saxplane::parallel_for(pool, p.b * p.kv, [&p](int64_t i) { gather_keys(p, i); });
  const int64_t blocks = (p.t + kQB - 1) / kQB;
  saxplane::parallel_for(pool, p.b * p.h * blocks, [&p](int64_t i) { attend(p, i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxPrefillAttention, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Attr<float>("softcap"));
