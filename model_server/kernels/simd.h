// The vector type the kernels compute with: 16 floats with AVX-512, 8 otherwise (GCC vector
// extensions, compiled for the machine's own ISA).
#ifndef SAXPLANE_KERNELS_SIMD_H_
#define SAXPLANE_KERNELS_SIMD_H_

#include <cstring>

namespace saxplane {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float Vec __attribute__((vector_size(kLanes * 4), aligned(4)));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(Vec v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

}  // namespace saxplane

#endif  // SAXPLANE_KERNELS_SIMD_H_
