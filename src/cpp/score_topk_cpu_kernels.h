// The CPU scoring kernel's table: one instance per instruction set, chosen at run time.
#pragma once

#include "attrprims/score_topk.h"

namespace attrprims {

/// Test rows per packed panel (the micro-kernel's width).
constexpr int64_t kScorePanel = 16;

/// Heaps of one training segment: row i's `top` slots then `bottom` slots at i·ld (all m rows).
struct ScoreHeaps {
  float* values = nullptr;
  int64_t* indices = nullptr;
  int64_t ld = 0;
};

/// Work units over raw pointers.
struct ScoreCpuKernelTable {
  const char* name;
  /// Offer the scores of test panels [p0, p1) against training rows [j0, j1) to `heaps`. `test` holds the
  /// test rows packed once per call: panel p is [k, kScorePanel] at p·k·kScorePanel (rows 16p.., zeros past m).
  void (*segment)(const ScoreTopkArgs& a, const float* test, int64_t p0, int64_t p1, int64_t j0, int64_t j1,
                  const ScoreHeaps& heaps);
};

extern const ScoreCpuKernelTable kScoreCpuKernelsGeneric;
#if defined(ATTRPRIMS_HAVE_AVX2)
extern const ScoreCpuKernelTable kScoreCpuKernelsAvx2;
#endif

}  // namespace attrprims
