// Scoring fused with a per-row top-k: its argument struct and the ranking/heap rules shared by CPU and CUDA.
//
// scores[i, j] = (a_i · b_j) · w_j for test rows a [m, k] (already multiplied by K) and training rows b [n, k].
// Each test row keeps the `top` largest and the `bottom` smallest scores with their column indices, so the
// [m, n] matrix never exists. Ranking is a total order: by value, then by smaller index, so the kept sets and
// their order do not depend on how columns are split over threads, blocks or calls.
#pragma once

#include "attrprims/common.h"

namespace attrprims {

/// One call: merge this call's candidates into running per-row lists (index -1 marks an empty slot).
struct ScoreTopkArgs {
  int64_t m = 0;  ///< test rows
  int64_t n = 0;  ///< training rows in this call
  int64_t k = 0;  ///< features
  const float* a = nullptr;  ///< [m, k] float32 test features times K, rows a_row_stride apart
  int64_t a_row_stride = 0;
  const void* b = nullptr;  ///< [n, k] training features, rows b_row_stride apart, columns contiguous
  DType b_dtype = DType::f32;  ///< f32, f16 or bf16
  int64_t b_row_stride = 0;
  const float* w = nullptr;  ///< [n] column weights (TRAK's out-to-loss term), or null for all ones
  int64_t index_offset = 0;  ///< added to column indices (the position of this call's b in the training set)
  int64_t top = 0;           ///< largest scores kept per row (0: none)
  float* top_values = nullptr;  ///< [m, top], rows top_row_stride apart: running list in, sorted best-first out
  int64_t* top_indices = nullptr;  ///< [m, top], same layout; -1 = empty
  int64_t top_row_stride = 0;
  int64_t bottom = 0;  ///< smallest scores kept per row (0: none)
  float* bottom_values = nullptr;  ///< [m, bottom], rows bottom_row_stride apart, as for top
  int64_t* bottom_indices = nullptr;
  int64_t bottom_row_stride = 0;
  int num_threads = 1;  ///< CPU worker threads (ignored by CUDA)
};

/// True when (v1, i1) ranks before (v2, i2): a real entry before an empty one (index < 0); then the larger
/// value (`largest`) or the smaller one; then the smaller index.
AP_HD bool ranks_before(float v1, int64_t i1, float v2, int64_t i2, bool largest) {
  if (i2 < 0) return i1 >= 0;
  if (i1 < 0) return false;
  if (v1 != v2) return largest ? v1 > v2 : v1 < v2;
  return i1 < i2;
}

/// Restore the heap below slot `pos` of a heap of `size` slots whose root ranks last (slot c's children are
/// 2c+1 and 2c+2), so the root is the entry a better candidate replaces.
AP_HD void heap_sift_down(float* v, int64_t* idx, int64_t size, int64_t pos, bool largest) {
  const float pv = v[pos];
  const int64_t pi = idx[pos];
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= size) break;
    // Follow the child that ranks later: it must move above the other.
    if (child + 1 < size && ranks_before(v[child], idx[child], v[child + 1], idx[child + 1], largest)) ++child;
    if (!ranks_before(pv, pi, v[child], idx[child], largest)) break;
    v[pos] = v[child];
    idx[pos] = idx[child];
    pos = child;
  }
  v[pos] = pv;
  idx[pos] = pi;
}

/// Offer candidate (value, index) to a full heap of `size` slots (empty slots hold index -1): it replaces the
/// root when it ranks before it.
AP_HD void heap_offer(float* v, int64_t* idx, int64_t size, float value, int64_t index, bool largest) {
  if (size == 0 || !ranks_before(value, index, v[0], idx[0], largest)) return;
  v[0] = value;
  idx[0] = index;
  heap_sift_down(v, idx, size, 0, largest);
}

/// Turn a heap of `size` slots into a list sorted best-first, in place (heap sort).
AP_HD void heap_sort_best_first(float* v, int64_t* idx, int64_t size, bool largest) {
  for (int64_t end = size - 1; end > 0; --end) {
    const float tv = v[0];
    const int64_t ti = idx[0];
    v[0] = v[end];
    idx[0] = idx[end];
    v[end] = tv;
    idx[end] = ti;
    heap_sift_down(v, idx, end, 0, largest);
  }
}

}  // namespace attrprims
