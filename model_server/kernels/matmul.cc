// y_j = x . w_j^T for float32 x [M, K] and one or more weights w_j [N_j, K] (the models'
// [out, in] layout), an XLA FFI custom call for the CPU. Several weights (a layer's queries,
// keys and values; a gated MLP's gate and up projections) share the inputs and one spread of
// the work over the threads.
//
// Why: XLA:CPU's dot reaches about half of the machine's FMA peak on the few rows of a decode
// step (2 to 64 rows), and at one row, where memory bounds it, reads the weights more slowly
// than a plain stream does. Three forms, none packing the weights, whose rows are read once
// per call (per block of rows for many rows), sequentially along K:
// * one row, a matrix-vector product streaming the weights (see gemv);
// * up to kDotRows rows, dot products: a tile of MR rows x NR outputs keeps MR * NR vector
//   accumulators along K (both operands contiguous there), summed across lanes at the end;
// * more rows, broadcast form on the inputs transposed once per call (see Panel).
// Runs of output tiles are spread over XLA's intra-op threads.
//
// The same code serves int8 weights with float32 scales per output row (SaxMatmulQ8, the
// `quantization: int8` override): w's values are sign-extended and converted to floats in
// registers as they are loaded (a quarter of the bytes to stream), each output multiplied by
// its row's scale at the end. One row on a CPU with AVX512-VNNI: int16 activations and
// integer dot products instead (see dot_row_a16).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using saxplane::hsum;
using saxplane::kLanes;
using saxplane::load;
using saxplane::Vec;

#if defined(__AVX512F__)
constexpr int kMR = 4;  // 4 x 6 accumulators + operands: the compiler streams one side
constexpr int kNR = 6;  // through memory operands
#else
constexpr int kMR = 2;
constexpr int kNR = 4;
#endif

// Output n of a weight of element type W: times its scale (int8), as is (float).
template <typename W>
inline float scaled(float v, const float* scale, int64_t n) {
  if constexpr (std::is_same_v<W, int8_t>) {
    return v * scale[n];
  } else {
    return v;
  }
}

// Prefetch a weight row's data at element kk only once per cache line.
template <typename W>
inline bool line_start(int64_t kk) {
  return (kk * static_cast<int64_t>(sizeof(W))) % 64 < kLanes * static_cast<int64_t>(sizeof(W));
}

template <typename W>
struct Problem {
  const float* x;      // [M, K]
  const W* w;          // [N, K]
  const float* scale;  // [N] (int8 weights)
  float* y;            // [M, N]
  int64_t m, n, k;
  int64_t tiles_per_item;  // NR-output tiles per work item
  int64_t items;
};

// The weight rows of the tile after the one whose rows are `ws` (at output n0), which a tile
// fetches a line per row while it computes: each row is only K floats long, too short a stream
// for the hardware prefetcher to ramp up on. Rows past the end: the tile's own (cached).
template <int NR, typename W>
inline void next_tile_rows(const W* __restrict__ const* ws, int64_t n0, int64_t n, int64_t k,
                           const W** next) {
  for (int j = 0; j < NR; ++j) next[j] = n0 + NR + j < n ? ws[j] + NR * k : ws[j];
}

// y[m0:m0+MR, n0:n0+NR] = x[m0:m0+MR] . w[n0:n0+NR]^T over all of K.
template <int MR, int NR, typename W>
inline void tile(const Problem<W>& p, int64_t m0, int64_t n0) {
  const int64_t k = p.k, kv = k - k % kLanes;
  const float* __restrict__ xs[MR];
  const W* __restrict__ ws[NR];
  for (int i = 0; i < MR; ++i) xs[i] = p.x + (m0 + i) * k;
  for (int j = 0; j < NR; ++j) ws[j] = p.w + (n0 + j) * k;
  Vec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec{};
  const W* next[NR];
  next_tile_rows<NR>(ws, n0, p.n, k, next);
  for (int64_t kk = 0; kk < kv; kk += kLanes) {
    Vec wv[NR];
    if (line_start<W>(kk))
      for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + kk, 0, 3);
    for (int j = 0; j < NR; ++j) wv[j] = load(ws[j] + kk);
    for (int i = 0; i < MR; ++i) {
      const Vec xv = load(xs[i] + kk);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* __restrict__ out = p.y + (m0 + i) * p.n + n0;
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = kv; kk < k; ++kk) s += xs[i][kk] * static_cast<float>(ws[j][kk]);
      out[j] = scaled<W>(s, p.scale, n0 + j);
    }
  }
}

template <int MR, typename W>
inline void tile_n(const Problem<W>& p, int64_t m0, int64_t n0, int64_t nr) {
  if (nr == kNR) return tile<MR, kNR>(p, m0, n0);
  for (int64_t j = 0; j < nr; ++j) tile<MR, 1>(p, m0, n0 + j);  // a last, narrower tile
}

template <typename W>
inline void tile_mn(const Problem<W>& p, int64_t m0, int64_t mr, int64_t n0, int64_t nr) {
  if (mr == kMR) return tile_n<kMR>(p, m0, n0, nr);
  for (int64_t i = 0; i < mr; ++i) tile_n<1>(p, m0 + i, n0, nr);
}

// Work item `item`: one run of output tiles, tile after tile, each over every row (its weight
// rows are read from memory once and reused from cache).
template <typename W>
void run_item(const Problem<W>& p, int64_t item) {
  const int64_t n_begin = item * p.tiles_per_item * kNR;
  const int64_t n_end = std::min(p.n, n_begin + p.tiles_per_item * kNR);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNR) {
    const int64_t nr = std::min<int64_t>(kNR, n_end - n0);
    for (int64_t m0 = 0; m0 < p.m; m0 += kMR) tile_mn(p, m0, std::min<int64_t>(kMR, p.m - m0), n0, nr);
  }
}

// ---- many rows: broadcast form on the transposed inputs -----------------------------------
//
// xt [K, Mp] holds the inputs transposed (rows padded to a multiple of kLanes * MV with zeros),
// so a vector of kLanes consecutive rows at one k is contiguous. acc[v][j] += xt[k, rows of v]
// * broadcast(w[n0 + j, k]): MV vector loads and NR scalar broadcasts per MV * NR FMAs, no
// horizontal sums; each weight row is read once per block of rows, sequentially along K.

template <typename W>
struct Panel {
  const float* xt;     // [K, mp]
  const W* w;          // [N, K]
  const float* scale;  // [N] (int8 weights)
  float* y;            // [M, N]
  int64_t m, mp, n, k;
  int64_t mc;              // rows per block (a multiple of kLanes * kMV)
  int64_t tiles_per_item;  // kPanelNR-output tiles per work item
  int64_t n_items, m_blocks, items;
};

constexpr int kMV = 2;       // row vectors per tile: 2 x 16 = 32 rows with AVX-512
constexpr int kPanelNR = 12;  // outputs per tile: 24 accumulators

template <int MV, int NR, typename W>
inline void panel_tile(const Panel<W>& p, int64_t m0, int64_t n0) {
  Vec acc[MV][NR];
  for (int v = 0; v < MV; ++v)
    for (int j = 0; j < NR; ++j) acc[v][j] = Vec{};
  const W* __restrict__ ws[NR];
  for (int j = 0; j < NR; ++j) ws[j] = p.w + (n0 + j) * p.k;
  const float* __restrict__ xt = p.xt + m0;
  const W* next[NR];
  next_tile_rows<NR>(ws, n0, p.n, p.k, next);
  for (int64_t k0 = 0; k0 < p.k; k0 += kLanes) {
    if (line_start<W>(k0))
      for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + k0, 0, 3);
    const int64_t k1 = std::min<int64_t>(p.k, k0 + kLanes);
    if constexpr (std::is_same_v<W, int8_t>) {
      // int8: the tile's kLanes columns converted once (a vector per row) into floats the
      // broadcasts then read, as the float32 form reads its weights (a scalar int8 load and
      // conversion per broadcast made 32 rows slower than float32 weights)
      float wf[NR][kLanes];
      if (k1 - k0 == kLanes) {
        for (int j = 0; j < NR; ++j) saxplane::store(wf[j], load(ws[j] + k0));
      } else {
        for (int j = 0; j < NR; ++j)
          for (int64_t kk = k0; kk < k1; ++kk) wf[j][kk - k0] = static_cast<float>(ws[j][kk]);
      }
      for (int64_t kk = k0; kk < k1; ++kk) {
        Vec xv[MV];
        for (int v = 0; v < MV; ++v) xv[v] = load(xt + kk * p.mp + v * kLanes);
        for (int j = 0; j < NR; ++j) {
          const float b = wf[j][kk - k0];
          for (int v = 0; v < MV; ++v) acc[v][j] += xv[v] * b;
        }
      }
    } else {
      for (int64_t kk = k0; kk < k1; ++kk) {
        Vec xv[MV];
        for (int v = 0; v < MV; ++v) xv[v] = load(xt + kk * p.mp + v * kLanes);
        for (int j = 0; j < NR; ++j) {
          const float b = ws[j][kk];
          for (int v = 0; v < MV; ++v) acc[v][j] += xv[v] * b;
        }
      }
    }
  }
  for (int v = 0; v < MV; ++v) {
    const int64_t r0 = m0 + v * kLanes;
    const int64_t rows = std::min<int64_t>(kLanes, p.m - r0);
    for (int64_t l = 0; l < rows; ++l) {
      float* __restrict__ out = p.y + (r0 + l) * p.n + n0;
      for (int j = 0; j < NR; ++j) out[j] = scaled<W>(acc[v][j][l], p.scale, n0 + j);
    }
  }
}

template <typename W>
void panel_item(const Panel<W>& p, int64_t item) {
  const int64_t mb = item / p.n_items, ni = item % p.n_items;
  const int64_t m_begin = mb * p.mc, m_end = std::min(p.mp, m_begin + p.mc);
  const int64_t n_begin = ni * p.tiles_per_item * kPanelNR;
  const int64_t n_end = std::min(p.n, n_begin + p.tiles_per_item * kPanelNR);
  constexpr int64_t step = kLanes * kMV;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelNR) {
    const int64_t nr = std::min<int64_t>(kPanelNR, n_end - n0);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += step) {
      if (m0 + step > p.m && m0 + kLanes >= p.m) {  // one vector of rows left
        if (nr == kPanelNR) {
          panel_tile<1, kPanelNR>(p, m0, n0);
        } else {
          for (int64_t j = 0; j < nr; ++j) panel_tile<1, 1>(p, m0, n0 + j);
        }
      } else if (nr == kPanelNR) {
        panel_tile<kMV, kPanelNR>(p, m0, n0);
      } else {
        for (int64_t j = 0; j < nr; ++j) panel_tile<kMV, 1>(p, m0, n0 + j);
      }
    }
  }
}

// ---- one row: a matrix-vector product, bound by the weights' read bandwidth ---------------
//
// Each work item is a contiguous run of weight rows, read front to back one row at a time (one
// sequential stream per thread, as the hardware prefetcher likes it best); x stays in L1.
// Measured on GPT-2-small's chain of products: 5-20% faster than XLA's dot, at the speed of
// XLA's own row sums over the same matrices. Several rows side by side were slower; software
// prefetch depends on the CPU (SAX_GEMV_PREFETCH_ROWS below).
template <typename W>
inline float dot_row(const float* __restrict__ x, const W* __restrict__ w, int64_t k) {
  const int64_t kv = k - k % kLanes;
  Vec acc{}, acc1{}, acc2{}, acc3{};  // four chains of FMAs, not one (measured 2-10% faster)
  int64_t kk = 0;
  for (; kk + 4 * kLanes <= kv; kk += 4 * kLanes) {
    acc += load(x + kk) * load(w + kk);
    acc1 += load(x + kk + kLanes) * load(w + kk + kLanes);
    acc2 += load(x + kk + 2 * kLanes) * load(w + kk + 2 * kLanes);
    acc3 += load(x + kk + 3 * kLanes) * load(w + kk + 3 * kLanes);
  }
  for (; kk < kv; kk += kLanes) acc += load(x + kk) * load(w + kk);
  float s = hsum((acc + acc1) + (acc2 + acc3));
  for (kk = kv; kk < k; ++kk) s += x[kk] * static_cast<float>(w[kk]);
  return s;
}

// Work items per thread: enough for a thread that starts late to leave its share to the others.
constexpr int64_t kGemvItemsPerThread = 8;

// Each row first fetches the row this many ahead (0: none; the build sets it per CPU vendor).
// Measured on GPT-2-small's chain of products: on Intel Sapphire Rapids 4 rows ahead read
// 5-8% faster; on AMD Zen 4 any software prefetch in this stream was 10-15% slower.
#ifndef SAX_GEMV_PREFETCH_ROWS
#define SAX_GEMV_PREFETCH_ROWS 0
#endif

template <typename W>
struct Gemv {
  const float* x;      // [K]
  const W* w;          // [N, K]
  const float* scale;  // [N] (int8 weights)
  float* y;            // [N]
  int64_t n, k;
  int64_t per;  // rows per work item
  int64_t items;
};

template <typename W>
void gemv_item(const Gemv<W>& p, int64_t i) {
  for (int64_t r = i * p.per, e = std::min(p.n, r + p.per); r < e; ++r) {
    if constexpr (SAX_GEMV_PREFETCH_ROWS > 0) {
      const W* ahead = p.w + std::min<int64_t>(e - 1, r + SAX_GEMV_PREFETCH_ROWS) * p.k;
      for (int64_t kk = 0; kk < p.k; kk += 64 / sizeof(W)) __builtin_prefetch(ahead + kk, 0, 3);
    }
    p.y[r] = scaled<W>(dot_row(p.x, p.w + r * p.k, p.k), p.scale, r);
  }
}

// ---- one row, int8 weights, int16 activations (AVX512-VNNI) -------------------------------
//
// The float form above costs 3 vector ops per 16 int8 weights (sign-extending load,
// conversion, FMA) and on these CPUs the one-row stream is bound by them, not by memory. With
// VNNI the row of x is first rounded to int16 with one scale per call (xq = round(x / sx),
// sx = max|x| / 32767: an error of at most sx / 2, ~1.5e-5 of the row's max, far below the
// int8 weights' own step of max|w| / 254), then each 32 weights cost one sign-extending load
// to int16 and one `vpdpwssd` (32 int16 products summed pairwise into 16 int32 lanes).
// int32 is exact while K <= kQ8A16MaxK: each lane of each of the 4 accumulators sums at most
// K / 64 pairs of |32767 * 127| products.
constexpr int64_t kQ8A16MaxK = 32768;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHaveQ8A16 = true;

inline int32_t dot_row_a16(const int16_t* __restrict__ x, const int8_t* __restrict__ w, int64_t k) {
  const int64_t kv = k - k % 32;
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  auto w16 = [&](int64_t kk) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk)));
  };
  auto x16 = [&](int64_t kk) { return _mm512_loadu_si512(reinterpret_cast<const void*>(x + kk)); };
  int64_t kk = 0;
  for (; kk + 128 <= kv; kk += 128) {
    acc0 = _mm512_dpwssd_epi32(acc0, x16(kk), w16(kk));
    acc1 = _mm512_dpwssd_epi32(acc1, x16(kk + 32), w16(kk + 32));
    acc2 = _mm512_dpwssd_epi32(acc2, x16(kk + 64), w16(kk + 64));
    acc3 = _mm512_dpwssd_epi32(acc3, x16(kk + 96), w16(kk + 96));
  }
  for (; kk < kv; kk += 32) acc0 = _mm512_dpwssd_epi32(acc0, x16(kk), w16(kk));
  int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(acc2, acc3)));
  for (kk = kv; kk < k; ++kk) s += static_cast<int32_t>(x[kk]) * static_cast<int32_t>(w[kk]);
  return s;
}
#else
constexpr bool kHaveQ8A16 = false;

inline int32_t dot_row_a16(const int16_t* x, const int8_t* w, int64_t k) {
  int32_t s = 0;
  for (int64_t kk = 0; kk < k; ++kk) s += static_cast<int32_t>(x[kk]) * static_cast<int32_t>(w[kk]);
  return s;
}
#endif

// x [K] rounded to int16 with one scale (returned): xq = round(x / sx), sx = max|x| / 32767.
float quantize_row_a16(const float* __restrict__ x, int64_t k, int16_t* __restrict__ xq) {
  float amax = 0.f;
  for (int64_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::abs(x[kk]));
  if (!(amax > 0.f)) amax = 32767.f;  // a row of zeros
  const float sx = amax / 32767.f, inv = 32767.f / amax;
  for (int64_t kk = 0; kk < k; ++kk) xq[kk] = static_cast<int16_t>(std::lrint(x[kk] * inv));
  return sx;
}

struct GemvA16 {
  const int16_t* x;    // [K]
  float sx;            // x's scale
  const int8_t* w;     // [N, K]
  const float* scale;  // [N]
  float* y;            // [N]
  int64_t n, k;
  int64_t per;  // rows per work item
  int64_t items;
};

void gemv_a16_item(const GemvA16& p, int64_t i) {
  for (int64_t r = i * p.per, e = std::min(p.n, r + p.per); r < e; ++r) {
    p.y[r] = static_cast<float>(dot_row_a16(p.x, p.w + r * p.k, p.k)) * (p.sx * p.scale[r]);
  }
}

// Output tiles per work item: enough items for every thread to take several (load balance).
int64_t tiles_per_item(int64_t n_tiles, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(16, n_tiles / (4 * threads)));
}

// Up to this many rows the dot-product form (no transposition) is used.
constexpr int64_t kDotRows = 8;

// One product of a call: a weight matrix and its output.
template <typename W>
struct Output {
  const W* w;          // [N, K]
  const float* scale;  // [N] (int8 weights)
  float* y;            // [M, N]
  int64_t n;
};

// Runs every work item of every part (`part.items` each) as one loop over the thread pool:
// one start and one join for all of a call's products.
template <typename Part, typename F>
void run_parts(ffi::ThreadPool& pool, const std::vector<Part>& parts, F run) {
  std::vector<int64_t> start{0};
  for (const Part& part : parts) start.push_back(start.back() + part.items);
  saxplane::parallel_for(pool, start.back(), [&](int64_t i) {
    const size_t j = std::upper_bound(start.begin(), start.end(), i) - start.begin() - 1;
    run(parts[j], i - start[j]);
  });
}

template <typename W>
void matmul(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, const std::vector<Output<W>>& outs,
            bool a16 = false) {
  const int64_t threads = pool.num_threads();  // the caller is one of them (parallel.h)
  if constexpr (std::is_same_v<W, int8_t>) {
    if (m == 1 && a16 && kHaveQ8A16 && k <= kQ8A16MaxK) {
      std::vector<int16_t> xq(static_cast<size_t>(k));
      const float sx = quantize_row_a16(x, k, xq.data());
      std::vector<GemvA16> parts;
      for (const Output<W>& o : outs) {
        const int64_t items = std::min<int64_t>(o.n, kGemvItemsPerThread * threads);
        const int64_t per = (o.n + items - 1) / items;
        parts.push_back(GemvA16{xq.data(), sx, o.w, o.scale, o.y, o.n, k, per, (o.n + per - 1) / per});
      }
      return run_parts(pool, parts, gemv_a16_item);
    }
  }
  if (m == 1) {
    std::vector<Gemv<W>> parts;
    for (const Output<W>& o : outs) {
      const int64_t items = std::min<int64_t>(o.n, kGemvItemsPerThread * threads);
      const int64_t per = (o.n + items - 1) / items;
      parts.push_back(Gemv<W>{x, o.w, o.scale, o.y, o.n, k, per, (o.n + per - 1) / per});
    }
    return run_parts(pool, parts, gemv_item<W>);
  }
  if (m <= kDotRows) {
    std::vector<Problem<W>> parts;
    for (const Output<W>& o : outs) {
      Problem<W> p;
      p.x = x, p.w = o.w, p.scale = o.scale, p.y = o.y;
      p.m = m, p.n = o.n, p.k = k;
      const int64_t n_tiles = (o.n + kNR - 1) / kNR;
      p.tiles_per_item = tiles_per_item(n_tiles, threads);
      p.items = (n_tiles + p.tiles_per_item - 1) / p.tiles_per_item;
      parts.push_back(p);
    }
    return run_parts(pool, parts, run_item<W>);
  }
  constexpr int64_t step = kLanes * kMV;
  const int64_t mp = (m + step - 1) / step * step;
  std::vector<float> xt(static_cast<size_t>(k * mp), 0.f);  // shared by every product
  const int64_t kv = k - k % kLanes;
  for (int64_t r0 = 0; r0 < m; r0 += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, m - r0);
    for (int64_t kk = 0; kk < kv; kk += kLanes) {
      saxplane::transpose_block(x + r0 * k + kk, k, rows, xt.data() + kk * mp + r0, mp);
    }
    for (int64_t r = r0; r < r0 + rows; ++r)
      for (int64_t kk = kv; kk < k; ++kk) xt[kk * mp + r] = x[r * k + kk];
  }
  std::vector<Panel<W>> parts;
  for (const Output<W>& o : outs) {
    Panel<W> p;
    p.m = m, p.mp = mp, p.n = o.n, p.k = k;
    p.xt = xt.data();
    p.w = o.w;
    p.scale = o.scale;
    p.y = o.y;
    // Rows per block: their transposed inputs (mc * K floats) stay within about 512 KB of L2.
    p.mc = std::min(mp, std::max<int64_t>(step, (131072 / std::max<int64_t>(k, 1)) / step * step));
    p.m_blocks = (mp + p.mc - 1) / p.mc;
    const int64_t n_tiles = (o.n + kPanelNR - 1) / kPanelNR;
    p.tiles_per_item = tiles_per_item(n_tiles, threads);
    p.n_items = (n_tiles + p.tiles_per_item - 1) / p.tiles_per_item;
    p.items = p.m_blocks * p.n_items;
    parts.push_back(p);
  }
  run_parts(pool, parts, panel_item<W>);
}

// x [M, K] and weights w_j [N_j, K] -> y_j = x . w_j^T [M, N_j]: several weights applied to
// the same inputs (a layer's queries, keys and values) in one call, their work spread over
// the threads at once.
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                      ffi::RemainingRets ys) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() == 0 || ws.size() != ys.size()) {
    return ffi::Error::InvalidArgument("expected x [M, K] and as many weights [N, K] as results");
  }
  const int64_t m = xd[0], k = xd[1];
  std::vector<Output<float>> outs;
  for (size_t j = 0; j < ws.size(); ++j) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(j);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(j);
    if (w.has_error() || y.has_error()) return ffi::Error::InvalidArgument("weights and results must be float32");
    auto wd = w->dimensions(), yd = y.value()->dimensions();
    if (wd.size() != 2 || wd[1] != k || yd.size() != 2 || yd[0] != m || yd[1] != wd[0]) {
      return ffi::Error::InvalidArgument("expected weights [N, K] and results [M, N]");
    }
    if (wd[0] > 0) outs.push_back(Output<float>{w->typed_data(), nullptr, y.value()->typed_data(), wd[0]});
  }
  if (m > 0 && !outs.empty()) matmul(pool, x.typed_data(), m, k, outs);
  return ffi::Error::Success();
}

// x [M, K] and int8 weights q_j [N_j, K] with float32 scales s_j [N_j] (arguments q_0, s_0,
// q_1, s_1, ...) -> y_j = (x . q_j^T) * s_j [M, N_j].
// `a16` (nonzero): one-row products round x to int16 and use integer dot products where the
// CPU has AVX512-VNNI (see dot_row_a16); elsewhere, and with a16 = 0, the float form.
ffi::Error MatmulQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                        ffi::RemainingRets ys, int32_t a16) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() == 0 || ws.size() != 2 * ys.size()) {
    return ffi::Error::InvalidArgument("expected x [M, K] and (int8 weight [N, K], scales [N]) per result");
  }
  const int64_t m = xd[0], k = xd[1];
  std::vector<Output<int8_t>> outs;
  for (size_t j = 0; j < ys.size(); ++j) {
    auto w = ws.get<ffi::Buffer<ffi::S8>>(2 * j);
    auto s = ws.get<ffi::Buffer<ffi::F32>>(2 * j + 1);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(j);
    if (w.has_error() || s.has_error() || y.has_error()) {
      return ffi::Error::InvalidArgument("weights must be int8, scales and results float32");
    }
    auto wd = w->dimensions(), sd = s->dimensions(), yd = y.value()->dimensions();
    if (wd.size() != 2 || wd[1] != k || sd.size() != 1 || sd[0] != wd[0] || yd.size() != 2 || yd[0] != m ||
        yd[1] != wd[0]) {
      return ffi::Error::InvalidArgument("expected weights [N, K], scales [N] and results [M, N]");
    }
    if (wd[0] > 0) {
      outs.push_back(Output<int8_t>{w->typed_data(), s->typed_data(), y.value()->typed_data(), wd[0]});
    }
  }
  if (m > 0 && !outs.empty()) matmul(pool, x.typed_data(), m, k, outs, a16 != 0);
  return ffi::Error::Success();
}

}  // namespace

// Whether this build has the int16-activation one-row form (AVX512-VNNI): 1 or 0.
extern "C" int SaxQ8A16Available() { return kHaveQ8A16 ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxMatmulQ8, MatmulQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("a16"));
