// The CPU scoring kernel's table: one instance per instruction set, chosen at run time.
#pragma once

#include "attrprims/score_topk.h"

namespace attrprims {

/// Per-unit heaps: for rows [i0, i1) of a unit, `top` slots then `bottom` slots per row, rows `ld` slots apart.
struct ScoreHeaps {
  float* values = nullptr;
  int64_t* indices = nullptr;
  int64_t ld = 0;
};

/// Work units over raw pointers.
struct ScoreCpuKernelTable {
  const char* name;
  /// Offer the scores of test rows [i0, i1) against training rows [j0, j1) to `heaps` (row i at (i - i0)·ld).
  void (*segment)(const ScoreTopkArgs& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const ScoreHeaps& heaps);
};

extern const ScoreCpuKernelTable kScoreCpuKernelsGeneric;
#if defined(ATTRPRIMS_HAVE_AVX2)
extern const ScoreCpuKernelTable kScoreCpuKernelsAvx2;
#endif

}  // namespace attrprims
