// The vector type the kernels compute with: 16 floats with AVX-512, 8 otherwise (GCC vector
// extensions, compiled for the machine's own ISA).
#ifndef SAXPLANE_KERNELS_SIMD_H_
#define SAXPLANE_KERNELS_SIMD_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>

namespace saxplane {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float Vec __attribute__((vector_size(kLanes * 4), aligned(4)));

// The same vector, allowed at any float's address and to alias float arrays.
typedef float VecMem __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));

inline Vec load(const float* p) { return *reinterpret_cast<const VecMem*>(p); }

// kLanes int8 values at any address, converted to floats in registers (the int8 weights'
// form of `load`): one sign-extending load and one conversion. Intrinsics, because GCC 12
// scalarises __builtin_convertvector from int8 vectors.
inline Vec load(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<Vec>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  Vec v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
#endif
}

inline void store(float* p, Vec v) { *reinterpret_cast<VecMem*>(p) = v; }

inline float hsum(Vec v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline float hmax(Vec v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

typedef int32_t VecI __attribute__((vector_size(kLanes * 4)));

// exp(x) lane by lane for x <= 0 (a softmax's shifted scores), within 3e-7 (2-3 ulp) of libm down to
// x = -87 (below: ~1e-38 where std::exp underflows to 0). Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n built in the exponent bits. libmvec's
// vector expf, which GCC would call instead, is not used at the full AVX-512 width by its
// tuning (8 lanes, through a call per vector), and was the costliest part of the prefill's
// softmax.
inline Vec exp_nonpositive(Vec x) {
  const Vec lo = Vec{} - 87.f;
  x = x < lo ? lo : x;
  // n = round(x / ln2): truncation of a non-positive t - 0.5 is its ceiling, the nearest
  // integer to t (not the magic-number trick, which -ffast-math folds away).
  const VecI ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, VecI);
  const Vec n = __builtin_convertvector(ni, Vec);
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec y = Vec{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const VecI bits = (ni + 127) << 23;
  return y * __builtin_bit_cast(Vec, bits);
}

// row[j] = exp(row[j] - max(row[0:n])) for j < n; returns their sum (n >= 1).
inline float softmax_numerators(float* row, int64_t n) {
  const int64_t nv = n - n % kLanes;
  float mx = row[0];
  if (nv) {
    Vec m = load(row);
    for (int64_t j = kLanes; j < nv; j += kLanes) {
      const Vec x = load(row + j);
      m = x > m ? x : m;
    }
    mx = hmax(m);
  }
  for (int64_t j = nv; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  Vec sum{};
  for (int64_t j = 0; j < nv; j += kLanes) {
    const Vec e = exp_nonpositive(load(row + j) - mx);
    store(row + j, e);
    sum += e;
  }
  float s = hsum(sum);
  for (int64_t j = nv; j < n; ++j) {
    row[j] = std::exp(row[j] - mx);
    s += row[j];
  }
  return s;
}

// One stage of transposing kLanes x kLanes floats held as kLanes row vectors: exchanges the
// off-diagonal D x D blocks of the rows i and i + D (for every i with bit D clear), i.e. swaps
// bit D of the row and of the column index. The stages for D = 1, 2, 4, ... make the transpose.
template <int D>
inline void transpose_stage(Vec* r) {
  VecI lo, hi;  // lanes of the concatenation (a, b) each new row takes
  for (int l = 0; l < kLanes; ++l) {
    lo[l] = (l & D) ? kLanes + l - D : l;
    hi[l] = (l & D) ? kLanes + l : l + D;
  }
  for (int i = 0; i < kLanes; ++i) {
    if (i & D) continue;
    const Vec a = r[i], b = r[i + D];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + D] = __builtin_shuffle(a, b, hi);
  }
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < kLanes, rows r >= `rows` written
// as zeros: a block transposed in registers. A scalar loop, writing every element to another
// cache line, took 9x as long (32 x 768 floats: 16.2 against 1.8 us, AMD Zen 4).
inline void transpose_block(const float* src, int64_t src_stride, int64_t rows, float* dst, int64_t dst_stride) {
  Vec r[kLanes];
  for (int i = 0; i < kLanes; ++i) r[i] = i < rows ? load(src + i * src_stride) : Vec{};
  transpose_stage<1>(r);
  transpose_stage<2>(r);
  transpose_stage<4>(r);
  if constexpr (kLanes == 16) transpose_stage<8>(r);
  for (int i = 0; i < kLanes; ++i) store(dst + i * dst_stride, r[i]);
}

}  // namespace saxplane

#endif  // SAXPLANE_KERNELS_SIMD_H_
