// The vector type the kernels compute with: 16 floats with AVX-512, 8 otherwise (GCC vector
// extensions, compiled for the machine's own ISA).
#ifndef SAXPLANE_KERNELS_SIMD_H_
#define SAXPLANE_KERNELS_SIMD_H_

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

inline void store(float* p, Vec v) { *reinterpret_cast<VecMem*>(p) = v; }

inline float hsum(Vec v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

}  // namespace saxplane

#endif  // SAXPLANE_KERNELS_SIMD_H_
