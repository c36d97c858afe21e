// Decode-step attention over the engine's KV cache, an XLA FFI custom call for the CPU.
//
// One query token per row: row b attends to positions [0, positions[b]] of its sequence (with
// a window w > 0, sliding-window attention, to (positions[b] - w, positions[b]] only: the rows
// before that are never read). The cache is a paged pool, keys and values each
// [num_blocks, kv_heads, block_size, head_dim], float32 or bfloat16, or int8 with a float32
// scale per (block, kv head, offset) row ([num_blocks, kv_heads, block_size], SaxDecodeAttentionQ8:
// the `kv_cache_dtype: int8` pool, dequantized in registers as rows are read); position s of row b lies
// in block block_tables[b, s / block_size] at offset s % block_size (an id out of range, a
// table's padding, reads block 0: such positions are never visible to a real query). Output
// [rows, heads, head_dim] float32: softmax(q . k * scale) . v with float32 scores and sums
// (with a softcap c > 0, Gemma 2's soft-capping: scores c * tanh(scores / c) before the softmax),
// normalised after the value product, as model_server/models/layers.py computes it.
//
// Why: XLA:CPU runs the batched dot of that formulation as one tiny matrix product per (row,
// head) on one thread. Here each (row, kv head) pair reads only the positions in use, once
// for all the query heads of its group, and the pairs are spread over XLA's intra-op
// threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows of keys or values prefetched ahead of the one in use: each (row, kv head) reads only a
// few KB, too short for the hardware prefetcher to ramp up (measured: 22 -> 19.5 ms per
// GPT-2-small step at 32 rows, 193 positions). Every cache line of the row is fetched, into
// L2 (prefetcht1), not just its first line into L1: measured on AMD Zen 4, the kernel ~12%
// faster (GPT-2 layers of 32 rows at 128-256 positions), a 32-row engine step 70-72 -> 66-68
// ms. Fetching further ahead, or the values' rows during the keys' pass, was no faster.
constexpr int64_t kPrefetchRows = 16;
constexpr int kCacheLine = 64;

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

enum class Elem { kF32, kBF16, kS8 };

template <Elem E>
constexpr int64_t elem_bytes = E == Elem::kF32 ? 4 : E == Elem::kBF16 ? 2 : 1;

struct Problem {
  const float* q;         // [rows, heads, dim]
  const int32_t* tables;  // [rows, table_len]
  const int32_t* positions;  // [rows]
  float* out;             // [rows, heads, dim]
  const void* k;          // [num_blocks, kv_heads, block_size, dim]
  const void* v;
  const float* k_scale;  // [num_blocks, kv_heads, block_size] (int8 pools)
  const float* v_scale;
  int64_t rows, heads, kv_heads, dim, span, num_blocks, block_size, table_len;
  int64_t window;  // 0: none
  float scale;
  float softcap;  // > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)
  Elem elem;
};

template <Elem E>
inline const void* element(const void* base, int64_t offset) {
  return static_cast<const char*>(base) + offset * elem_bytes<E>;
}

// `len` elements of a cache block from `offset` as float32 (bfloat16 converted into `tmp`;
// int8 times its row's scale `row_scale` into `tmp`).
template <Elem E>
inline const float* load(const void* base, int64_t offset, int64_t len, float* tmp, float row_scale) {
  if constexpr (E == Elem::kBF16) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
    for (int64_t i = 0; i < len; ++i) tmp[i] = bf16_to_float(src[i]);
    return tmp;
  } else if constexpr (E == Elem::kS8) {
    const int8_t* __restrict__ src = static_cast<const int8_t*>(base) + offset;
    const int64_t lv = len - len % saxplane::kLanes;
    const saxplane::Vec sv = saxplane::Vec{} + row_scale;
    for (int64_t i = 0; i < lv; i += saxplane::kLanes) saxplane::store(tmp + i, saxplane::load(src + i) * sv);
    for (int64_t i = lv; i < len; ++i) tmp[i] = static_cast<float>(src[i]) * row_scale;
    return tmp;
  } else {
    return static_cast<const float*>(base) + offset;
  }
}

// Calls f(position - lo, row as float32) for positions [lo, n) of (row b, kv head), in the
// keys or the values (`data`, with `scales` for int8), through the row's block table.
template <Elem E, typename F>
inline void for_rows(const Problem& p, const void* data, const float* scales, int64_t b, int64_t kvh, int64_t lo,
                     int64_t n, int64_t dim, float* tmp, F&& f) {
  const int32_t* table = p.tables + b * p.table_len;
  const int64_t bs = p.block_size;
  auto row = [&](int64_t s) {  // the (block, kv head, offset) row of position s
    int64_t blk = table[s / bs];
    blk = (blk < 0 || blk >= p.num_blocks) ? 0 : blk;
    return (blk * p.kv_heads + kvh) * bs + s % bs;
  };
  for (int64_t s = lo; s < n; ++s) {
    if (s + kPrefetchRows < n) {
      const char* ahead = static_cast<const char*>(element<E>(data, row(s + kPrefetchRows) * dim));
      for (int64_t c = 0; c < dim * elem_bytes<E>; c += kCacheLine) __builtin_prefetch(ahead + c, 0, 2);
    }
    const int64_t r = row(s);
    f(s - lo, load<E>(data, r * dim, dim, tmp, E == Elem::kS8 ? scales[r] : 1.f));
  }
}

// One (row, kv head) item: every query head of the group, over positions [lo, end). DIM > 0
// fixes the head dim at compile time (unrolled dot products), 0 reads it from the problem.
template <Elem E, int DIM>
void attend_item(const Problem& p, int64_t item, std::vector<float>& scores, std::vector<float>& tmp) {
  const int64_t b = item / p.kv_heads, kvh = item % p.kv_heads;
  const int64_t group = p.heads / p.kv_heads, dim = DIM > 0 ? DIM : p.dim;
  const int64_t end = std::clamp<int64_t>(static_cast<int64_t>(p.positions[b]) + 1, 1, p.span);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, static_cast<int64_t>(p.positions[b]) + 1 - p.window) : 0;
  const int64_t start = std::min(lo, end - 1), n = end - start;  // positions [start, end)
  const float* __restrict__ q = p.q + (b * p.heads + kvh * group) * dim;  // [group, dim]
  float* __restrict__ out = p.out + (b * p.heads + kvh * group) * dim;
  scores.resize(group * n + group * dim + group);
  float* __restrict__ sc = scores.data();
  float* __restrict__ acc = sc + group * n;  // [group, dim] output accumulators
  float* __restrict__ sums = acc + group * dim;  // [group] softmax denominators
  tmp.resize(dim);

  // scores[g, s] = q[g] . k[s] * scale
  for_rows<E>(p, p.k, p.k_scale, b, kvh, start, end, dim, tmp.data(), [&](int64_t s, const float* __restrict__ k) {
    for (int64_t g = 0; g < group; ++g) {
      const float* __restrict__ qg = q + g * dim;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * k[d];
      sc[g * n + s] = dot * p.scale;
    }
  });
  if (p.softcap > 0.f) {
    const float cap = p.softcap, inv_cap = 1.f / p.softcap;
    for (int64_t i = 0; i < group * n; ++i) sc[i] = std::tanh(sc[i] * inv_cap) * cap;
  }
  // softmax numerators; their sums divide the output at the end
  for (int64_t g = 0; g < group; ++g) sums[g] = saxplane::softmax_numerators(sc + g * n, n);
  std::fill(acc, acc + group * dim, 0.f);
  // acc[g] = sum_s e[g, s] v[s]
  for_rows<E>(p, p.v, p.v_scale, b, kvh, start, end, dim, tmp.data(), [&](int64_t s, const float* __restrict__ v) {
    for (int64_t g = 0; g < group; ++g) {
      const float e = sc[g * n + s];
      float* __restrict__ a = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) a[d] += e * v[d];
    }
  });
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / sums[g];
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = acc[g * dim + d] * inv;
  }
}

template <Elem E>
void attend(const Problem& p, int64_t item, std::vector<float>& scores, std::vector<float>& tmp) {
  switch (p.dim) {
    case 64: return attend_item<E, 64>(p, item, scores, tmp);
    case 128: return attend_item<E, 128>(p, item, scores, tmp);
    default: return attend_item<E, 0>(p, item, scores, tmp);
  }
}

void attend_any(const Problem& p, int64_t item) {
  // per-thread scratch, reused across items and calls
  thread_local std::vector<float> scores, tmp;
  switch (p.elem) {
    case Elem::kF32: return attend<Elem::kF32>(p, item, scores, tmp);
    case Elem::kBF16: return attend<Elem::kBF16>(p, item, scores, tmp);
    case Elem::kS8: return attend<Elem::kS8>(p, item, scores, tmp);
  }
}

// Both handlers: the pools' scales are null for float32 / bfloat16 ones.
ffi::Error Decode(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> block_tables,
                  ffi::Buffer<ffi::S32> positions, ffi::AnyBuffer k, ffi::AnyBuffer v, const float* k_scale,
                  const float* v_scale, ffi::ResultBuffer<ffi::F32> out, float scale, int32_t window,
                  float softcap) {
  auto qd = q.dimensions(), td = block_tables.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument("q must be [rows, heads, dim]");
  if (td.size() != 2 || td[0] != qd[0]) return ffi::Error::InvalidArgument("block tables must be [rows, blocks]");
  if (kd.size() != 4 || vd.size() != 4 || kd[3] != qd[2] || kd[0] != vd[0] || kd[1] != vd[1] ||
      kd[2] != vd[2] || kd[3] != vd[3] || k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("the pools must be [blocks, kv_heads, block_size, dim]");
  }
  Problem p;
  p.rows = qd[0];
  p.heads = qd[1];
  p.dim = qd[2];
  p.q = q.typed_data();
  p.tables = block_tables.typed_data();
  p.table_len = td[1];
  p.positions = positions.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.window = window;
  p.softcap = softcap;
  p.num_blocks = kd[0];
  p.kv_heads = kd[1];
  p.block_size = kd[2];
  p.span = p.table_len * p.block_size;
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  if (k_scale != nullptr) {
    if (k.element_type() != ffi::DataType::S8) return ffi::Error::InvalidArgument("scaled pools must be int8");
    p.elem = Elem::kS8;
  } else if (k.element_type() == ffi::DataType::BF16) {
    p.elem = Elem::kBF16;
  } else if (k.element_type() == ffi::DataType::F32) {
    p.elem = Elem::kF32;
  } else {
    return ffi::Error::InvalidArgument("the pools must be float32 or bfloat16 (int8: with scales)");
  }
  if (p.kv_heads == 0 || p.heads % p.kv_heads) return ffi::Error::InvalidArgument("heads must be a multiple of kv heads");
  if (p.rows == 0 || p.span == 0) return ffi::Error::Success();
  saxplane::parallel_for(pool, p.rows * p.kv_heads, [&p](int64_t i) { attend_any(p, i); });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> positions,
                               ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::ResultBuffer<ffi::F32> out,
                               float scale, int32_t window, float softcap) {
  return Decode(pool, q, block_tables, positions, k, v, nullptr, nullptr, out, scale, window, softcap);
}

// int8 pools k, v [blocks, kv_heads, block_size, dim] with float32 scales [blocks, kv_heads,
// block_size] each (Decode refuses other pools).
ffi::Error DecodeAttentionQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                 ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> positions,
                                 ffi::AnyBuffer k, ffi::Buffer<ffi::F32> k_scale, ffi::AnyBuffer v,
                                 ffi::Buffer<ffi::F32> v_scale, ffi::ResultBuffer<ffi::F32> out, float scale,
                                 int32_t window, float softcap) {
  auto kd = k.dimensions(), ksd = k_scale.dimensions(), vsd = v_scale.dimensions();
  if (kd.size() != 4 || ksd.size() != 3 || vsd.size() != 3 || ksd[0] != kd[0] || ksd[1] != kd[1] ||
      ksd[2] != kd[2] || vsd[0] != ksd[0] || vsd[1] != ksd[1] || vsd[2] != ksd[2]) {
    return ffi::Error::InvalidArgument("the scales must be [blocks, kv_heads, block_size], as the pools' rows");
  }
  return Decode(pool, q, block_tables, positions, k, v, k_scale.typed_data(),
                v_scale.typed_data(), out, scale, window, softcap);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxDecodeAttentionQ8, DecodeAttentionQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Attr<float>("softcap"));
