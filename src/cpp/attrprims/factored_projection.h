// The factored (Kronecker) projection of per-example Linear-layer weight gradients: its argument struct and
// the per-element output rule shared by CPU and CUDA.
//
// For example i with layer inputs a_i [t, d_in] and output gradients delta_i [t, d_out], the weight gradient
// G_i = delta_iᵀ a_i [d_out, d_in] is projected with P = P_out ⊗ P_in without being formed:
//   out[i, o·k_in + j] = Σ_t (delta[i, t] · P_out[:, o]) (a[i, t] · P_in[:, j]),
// i.e. out_i = (delta_i P_out)ᵀ (a_i P_in) flattened row-major, at O(t·(d_out·k_out + d_in·k_in + k_out·k_in)).
#pragma once

#include "attrprims/common.h"

namespace attrprims {

/// One factored projection call: out [n, k_out·k_in] = vec_rowmajor(delta_iᵀ a_i) @ (P_out ⊗ P_in) per example.
/// Element strides; the last dimension of every array is contiguous.
struct FactoredProjectArgs {
  int64_t n = 0;      ///< examples
  int64_t t = 0;      ///< positions (tokens) per example, summed over
  int64_t d_in = 0;   ///< layer input features
  int64_t d_out = 0;  ///< layer output features
  int64_t k_in = 1;   ///< columns of P_in
  int64_t k_out = 1;  ///< columns of P_out
  const void* a = nullptr;  ///< [n, t, d_in] layer inputs, a[i, s, c] at i·a_stride_n + s·a_stride_t + c
  DType a_dtype = DType::f32;  ///< dtype of a and of delta
  int64_t a_stride_n = 0;
  int64_t a_stride_t = 0;
  const void* delta = nullptr;  ///< [n, t, d_out] output gradients, strides as for a
  int64_t delta_stride_n = 0;
  int64_t delta_stride_t = 0;
  const float* p_in = nullptr;  ///< row-major [d_in, k_in], rows p_in_row_stride apart
  int64_t p_in_row_stride = 0;
  const float* p_out = nullptr;  ///< row-major [d_out, k_out], rows p_out_row_stride apart
  int64_t p_out_row_stride = 0;
  float* out = nullptr;  ///< float32 [n, k_out·k_in], rows out_row_stride apart
  int64_t out_row_stride = 0;
  bool accumulate = false;  ///< out += result instead of out = result
  int num_threads = 1;      ///< CPU worker threads (ignored by CUDA)
};

/// Column of out holding (o, j): out_i is the row-major [k_out, k_in] matrix (delta_i P_out)ᵀ (a_i P_in).
AP_HD int64_t factored_out_col(int64_t o, int64_t j, int64_t k_in) { return o * k_in + j; }

/// Write one finished output value `v` to *dst, or add it to *dst when accumulating.
AP_HD void put_factored_output(float* dst, float v, bool accumulate) { *dst = accumulate ? *dst + v : v; }

}  // namespace attrprims
