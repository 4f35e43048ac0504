// Shared vocabulary of the kernels: the host/device macro, dtype tags, checks and exact float helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define AP_HD __host__ __device__ __forceinline__
#else
// static: each TU keeps its own copy, so the AVX2 and generic builds of the CPU kernels never share one.
#define AP_HD static inline
#endif

namespace attrprims {

/// Element type of an input buffer (f64: Gram and scoring inputs only; the projections reject it).
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

/// Size in bytes of one element of `dt`.
static inline int64_t dtype_size(DType dt) { return dt == DType::f64 ? 8 : dt == DType::f32 ? 4 : 2; }

/// Throw std::invalid_argument("<param>: <what>") when `cond` is false (pybind11 maps it to ValueError).
#define AP_CHECK(cond, param, what)                                                   \
  do {                                                                                \
    if (!(cond)) throw std::invalid_argument(std::string(param) + ": " + (what));     \
  } while (0)

/// Reinterpret the bits of a float as uint32 and back (no aliasing UB, works on host and device).
AP_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
AP_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

/// Correctly rounded float ops that no compiler may fuse or reorder. The projection matrix is defined
/// through them, so its entries are bit-identical on CPU and GPU (host TUs build with -ffp-contract=off).
AP_HD float exact_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AP_HD float exact_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AP_HD float exact_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
AP_HD float exact_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

/// bfloat16 bits -> float (exact).
AP_HD float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

/// IEEE binary16 bits -> float (exact, subnormals, inf and NaN included), without F16C or cuda_fp16.
AP_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: man * 2^-24 is exact in float.
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return bits_float(sign | float_bits(mag));
}

}  // namespace attrprims
