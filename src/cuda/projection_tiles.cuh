// Helpers shared by the CUDA projection kernels: input types and loads, and pieces of P written to shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attrprims/projection.h"

namespace attrprims {

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return static_cast<float>(*p);
}
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

/// Call fn(T()) with T the CUDA type of input dtype `dt` (float, __half or __nv_bfloat16); `param` names the
/// dtype field in the error for any other value.
template <typename Fn>
void dispatch_input_type(DType dt, const char* param, Fn&& fn) {
  switch (dt) {
    case DType::f32: fn(float()); break;
    case DType::f16: fn(__half()); break;
    case DType::bf16: fn(__nv_bfloat16()); break;
    default: AP_CHECK(false, param, "must be f32, f16 or bf16");
  }
}

/// dst[b * stride] = P[row, col0 + b] for b < count (col0 % count == 0, count divides 32): Rademacher
/// entries ±`scale` from one Philox call.
template <int count>
__device__ __forceinline__ void rademacher_run(uint64_t seed, uint64_t row, int64_t col0, float scale, float* dst,
                                               int stride) {
  const U32x4 w = projection_words(seed, kTagRademacher, row, static_cast<uint32_t>(col0 >> 7));
  const uint32_t word = word_at(w, (col0 >> 5) & 3);
  const int bit0 = static_cast<int>(col0 & 31);
#pragma unroll
  for (int b = 0; b < count; ++b) dst[b * stride] = rademacher_entry(word, bit0 + b, scale);
}

/// z[0..3] = unscaled normals of P[row, col0 .. col0+3] (col0 % 4 == 0).
__device__ __forceinline__ void gaussian_run(uint64_t seed, uint64_t row, int64_t col0, float z[4]) {
  gaussian4(projection_words(seed, kTagGaussian, row, static_cast<uint32_t>(col0 >> 2)), z);
}

/// dst[b * stride] = P[row, col0 + b] for b < count (col0 % count == 0; count is 4, 8 or 16) for a dense
/// kind, scaled exactly as on the CPU.
template <int count>
__device__ __forceinline__ void dense_run(const ProjectionSpec& spec, uint64_t row, int64_t col0, float scale,
                                          float* dst, int stride) {
  if (spec.kind == Kind::rademacher) {
    rademacher_run<count>(spec.seed, row, col0, scale, dst, stride);
    return;
  }
#pragma unroll
  for (int q = 0; q < count; q += 4) {
    float z[4];
    gaussian_run(spec.seed, row, col0 + q, z);
#pragma unroll
    for (int b = 0; b < 4; ++b) dst[(q + b) * stride] = exact_mul(z[b], scale);
  }
}

}  // namespace attrprims
