// SIMD helpers (8 floats, 4 doubles) and the 6x16 register-blocked fp32 FMA micro-kernel shared by the CPU
// kernels, compiled once per instruction set: the including TU defines AP_ISA_NS, and each ISA's copy lives in
// its own namespace.
// No standard-library templates here: out-of-line copies built with AVX2 could be merged by the linker
// into the generic build.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "attrprims/common.h"

namespace attrprims {
namespace AP_ISA_NS {

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
static inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
static inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return reinterpret_cast<v8f>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}
typedef double v4d __attribute__((vector_size(32)));

static inline v4d load4(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store4(double* p, v4d v) { std::memcpy(p, &v, sizeof(v)); }
static inline v4d splat4(double x) { return v4d{x, x, x, x}; }
static inline v4d fma4(v4d a, v4d b, v4d c) {
#if defined(__FMA__)
  return reinterpret_cast<v4d>(_mm256_fmadd_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b),
                                               reinterpret_cast<__m256d>(c)));
#else
  return a * b + c;
#endif
}
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int kMR = 6;                 // register block rows: 6x2 accumulators + 2 B vectors + 1 broadcast = 15 ymm
constexpr int kNR = 16;                // register block columns

/// Owns a 64-byte-aligned array of `count` elements of T.
template <typename T>
struct Buffer {
  T* p;
  explicit Buffer(int64_t count)
      : p(static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>((count * sizeof(T) + 63) / 64 * 64)))) {
    if (!p) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

/// C[0:MR, 0:16] += A[0:MR, 0:depth] @ B[0:depth, 0:16]; rows lda / ldb / ldc elements apart.
template <int MR>
static void micro_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t depth, float* C,
                         int64_t ldc) {
  v8f acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    acc0[i] = load8(C + i * ldc);
    acc1[i] = load8(C + i * ldc + 8);
  }
  for (int64_t r = 0; r < depth; ++r) {
    const v8f b0 = load8(B + r * ldb), b1 = load8(B + r * ldb + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const v8f av = splat8(A[i * lda + r]);
      acc0[i] = fma8(av, b0, acc0[i]);
      acc1[i] = fma8(av, b1, acc1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    store8(C + i * ldc, acc0[i]);
    store8(C + i * ldc + 8, acc1[i]);
  }
}

/// micro_kernel for mr in 1..6 rows (the ragged last block of rows included).
static inline void run_micro(int mr, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t depth, float* C,
                      int64_t ldc) {
  switch (mr) {
    case 1: micro_kernel<1>(A, lda, B, ldb, depth, C, ldc); break;
    case 2: micro_kernel<2>(A, lda, B, ldb, depth, C, ldc); break;
    case 3: micro_kernel<3>(A, lda, B, ldb, depth, C, ldc); break;
    case 4: micro_kernel<4>(A, lda, B, ldb, depth, C, ldc); break;
    case 5: micro_kernel<5>(A, lda, B, ldb, depth, C, ldc); break;
    default: micro_kernel<6>(A, lda, B, ldb, depth, C, ldc); break;
  }
}

/// dst[i, 0:cols] = float(src[i, 0:cols]) for `rows` rows; src rows src_stride apart, dst rows ld_dst.
static inline void convert_rows(const void* src, DType dt, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
                         int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + i * src_stride;
    float* d = dst + i * ld_dst;
    if (dt == DType::f16) {
      int64_t j = 0;
#if defined(__F16C__)
      // vcvtph2ps is exact like f16_bits_to_float (NaNs stay NaN) and keeps fp16 input as fast as bf16.
      for (; j + 8 <= cols; j += 8)
        _mm256_storeu_ps(d + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
#endif
      for (; j < cols; ++j) d[j] = f16_bits_to_float(s[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) d[j] = bf16_bits_to_float(s[j]);
    }
  }
}

}  // namespace AP_ISA_NS
}  // namespace attrprims
