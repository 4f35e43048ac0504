// Streaming Gram accumulation G += Xᵀ X: its argument struct and the per-element accumulation rules shared by
// the CPU and CUDA kernels.
//
// Only the lower triangle of G (row >= column) is maintained; entries above the diagonal are unspecified
// until the caller mirrors the lower triangle. Each call forms the update's partial sums in fp64 (CPU, and CUDA
// for f32/f64 inputs: products of floats are exact in fp64) or fp32 (CUDA tensor cores for f16/bf16 inputs),
// then adds them into G: plainly into an fp64 G, or with Kahan compensation into an fp32 G.
#pragma once

#include "attrprims/common.h"

namespace attrprims {

/// One update G += Xᵀ X of the lower triangle of G [k, k] by the rows of X [b, k].
struct GramUpdateArgs {
  int64_t b = 0;  ///< rows of X in this update
  int64_t k = 0;  ///< features: X has k columns, G is k x k
  const void* x = nullptr;  ///< X [b, k], rows x_row_stride elements apart, columns contiguous
  DType x_dtype = DType::f32;  ///< f32, f16, bf16 or f64
  int64_t x_row_stride = 0;
  void* g = nullptr;  ///< G [k, k] row-major, rows g_row_stride elements apart: double*, or float* when g_f32
  int64_t g_row_stride = 0;
  bool g_f32 = false;  ///< G is float32 with Kahan compensation in `comp`, instead of float64
  float* comp = nullptr;  ///< g_f32 only: Kahan compensation, same layout as G; the sum is G - comp
  int num_threads = 1;  ///< CPU worker threads (ignored by CUDA)
};

/// *g += v into an fp64 accumulator.
AP_HD void gram_add(double* g, double v) { *g += v; }

/// *g += v into an fp32 accumulator with Kahan compensation *c (by how much *g exceeds the exact running sum).
/// Uses exact_add so that no compiler fuses or reassociates the compensation away.
AP_HD void gram_add_compensated(float* g, float* c, float v) {
  const float y = exact_add(v, -*c);
  const float t = exact_add(*g, y);
  *c = exact_add(exact_add(t, -*g), -y);
  *g = t;
}

}  // namespace attrprims
