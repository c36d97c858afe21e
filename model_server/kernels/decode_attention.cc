// Decode-step attention over the engine's KV cache, an XLA FFI custom call for the CPU.
//
// One query token per row: row b attends to positions [0, positions[b]] of cache slot
// slot_ids[b]; with a window w > 0 (sliding-window attention) to (positions[b] - w,
// positions[b]] only: the rows before that are never read. The cache arrives as consecutive
// position blocks (keys then values), each [num_slots, kv_heads, size_j, head_dim], float32 or bfloat16. Output [rows, heads, head_dim]
// float32: softmax(q . k * scale) . v with float32 scores and sums, normalised after the
// value product, as model_server/models/layers.py computes it.
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

struct Block {
  const void* k;
  const void* v;
  int64_t size;  // positions in this block
};

struct Problem {
  const float* q;         // [rows, heads, dim]
  const int32_t* slots;   // [rows]
  const int32_t* positions;  // [rows]
  float* out;             // [rows, heads, dim]
  std::vector<Block> blocks;
  int64_t rows, heads, kv_heads, dim, span, num_slots;
  int64_t window;  // 0: none
  float scale;
  bool bf16;
};

template <bool BF16>
inline const void* element(const void* base, int64_t offset) {
  return static_cast<const char*>(base) + offset * (BF16 ? 2 : 4);
}

// `len` elements of a cache block from `offset` as float32 (bfloat16 converted into `tmp`).
template <bool BF16>
inline const float* load(const void* base, int64_t offset, int64_t len, float* tmp) {
  if constexpr (BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
    for (int64_t i = 0; i < len; ++i) tmp[i] = bf16_to_float(src[i]);
    return tmp;
  } else {
    return static_cast<const float*>(base) + offset;
  }
}

// Calls f(position - lo, row as float32) for positions [lo, n) of (slot, kv head), in the keys
// or the values (`data`), block after block.
template <bool BF16, typename F>
inline void for_rows(const Problem& p, const void* Block::*data, int64_t slot, int64_t kvh, int64_t lo,
                     int64_t n, int64_t dim, float* tmp, F&& f) {
  int64_t s0 = 0;
  for (const Block& blk : p.blocks) {
    if (s0 >= n) break;
    if (s0 + blk.size <= lo) {  // wholly before the window
      s0 += blk.size;
      continue;
    }
    const void* rows = blk.*data;
    const int64_t m = std::min(blk.size, n - s0);
    const int64_t base = ((slot * p.kv_heads + kvh) * blk.size) * dim;
    for (int64_t s = std::max<int64_t>(0, lo - s0); s < m; ++s) {
      const char* ahead = static_cast<const char*>(element<BF16>(rows, base + (s + kPrefetchRows) * dim));
      for (int64_t c = 0; c < dim * (BF16 ? 2 : 4); c += kCacheLine) __builtin_prefetch(ahead + c, 0, 2);
      f(s0 + s - lo, load<BF16>(rows, base + s * dim, dim, tmp));
    }
    s0 += blk.size;
  }
}

// One (row, kv head) item: every query head of the group, over positions [lo, n). DIM > 0
// fixes the head dim at compile time (unrolled dot products), 0 reads it from the problem.
template <bool BF16, int DIM>
void attend_item(const Problem& p, int64_t item, std::vector<float>& scores, std::vector<float>& tmp) {
  const int64_t b = item / p.kv_heads, kvh = item % p.kv_heads;
  const int64_t group = p.heads / p.kv_heads, dim = DIM > 0 ? DIM : p.dim;
  const int64_t slot = std::clamp<int64_t>(p.slots[b], 0, p.num_slots - 1);  // as JAX's gather clamps
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
  for_rows<BF16>(p, &Block::k, slot, kvh, start, end, dim, tmp.data(), [&](int64_t s, const float* __restrict__ k) {
    for (int64_t g = 0; g < group; ++g) {
      const float* __restrict__ qg = q + g * dim;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * k[d];
      sc[g * n + s] = dot * p.scale;
    }
  });
  // softmax numerators; their sums divide the output at the end
  for (int64_t g = 0; g < group; ++g) sums[g] = saxplane::softmax_numerators(sc + g * n, n);
  std::fill(acc, acc + group * dim, 0.f);
  // acc[g] = sum_s e[g, s] v[s]
  for_rows<BF16>(p, &Block::v, slot, kvh, start, end, dim, tmp.data(), [&](int64_t s, const float* __restrict__ v) {
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

template <bool BF16>
void attend(const Problem& p, int64_t item, std::vector<float>& scores, std::vector<float>& tmp) {
  switch (p.dim) {
    case 64: return attend_item<BF16, 64>(p, item, scores, tmp);
    case 128: return attend_item<BF16, 128>(p, item, scores, tmp);
    default: return attend_item<BF16, 0>(p, item, scores, tmp);
  }
}

void attend_any(const Problem& p, int64_t item) {
  // per-thread scratch, reused across items and calls
  thread_local std::vector<float> scores, tmp;
  if (p.bf16) {
    attend<true>(p, item, scores, tmp);
  } else {
    attend<false>(p, item, scores, tmp);
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::S32> slot_ids, ffi::Buffer<ffi::S32> positions,
                               ffi::RemainingArgs cache, ffi::ResultBuffer<ffi::F32> out,
                               float scale, int32_t window) {
  auto qd = q.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument("q must be [rows, heads, dim]");
  if (cache.size() == 0 || cache.size() % 2) {
    return ffi::Error::InvalidArgument("expected key blocks then as many value blocks");
  }
  Problem p;
  p.rows = qd[0];
  p.heads = qd[1];
  p.dim = qd[2];
  p.q = q.typed_data();
  p.slots = slot_ids.typed_data();
  p.positions = positions.typed_data();
  p.out = out->typed_data();
  p.scale = scale;
  p.window = window;
  const size_t nblocks = cache.size() / 2;
  p.span = 0;
  for (size_t j = 0; j < nblocks; ++j) {
    auto k = cache.get<ffi::AnyBuffer>(j);
    auto v = cache.get<ffi::AnyBuffer>(nblocks + j);
    if (k.has_error() || v.has_error()) return ffi::Error::InvalidArgument("bad cache block");
    auto kd = k->dimensions(), vd = v->dimensions();
    if (kd.size() != 4 || vd.size() != 4 || kd[3] != p.dim || vd[3] != p.dim || kd[2] != vd[2] ||
        kd[1] != vd[1] || kd[0] != vd[0] || k->element_type() != v->element_type()) {
      return ffi::Error::InvalidArgument("cache blocks must be [slots, kv_heads, size, dim]");
    }
    if (j == 0) {
      p.kv_heads = kd[1];
      p.num_slots = kd[0];
      p.bf16 = k->element_type() == ffi::DataType::BF16;
      if (!p.bf16 && k->element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("cache blocks must be float32 or bfloat16");
      }
    }
    const auto dtype = p.bf16 ? ffi::DataType::BF16 : ffi::DataType::F32;
    if (kd[0] != p.num_slots || kd[1] != p.kv_heads || k->element_type() != dtype) {
      return ffi::Error::InvalidArgument("cache blocks must share their slots, kv heads and dtype");
    }
    if (p.heads % p.kv_heads) return ffi::Error::InvalidArgument("heads must be a multiple of kv heads");
    p.blocks.push_back(Block{k->untyped_data(), v->untyped_data(), kd[2]});
    p.span += kd[2];
  }
  saxplane::parallel_for(pool, p.rows * p.kv_heads, [&p](int64_t i) { attend_any(p, i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window"));
