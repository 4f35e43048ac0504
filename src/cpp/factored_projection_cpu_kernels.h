// The CPU factored-projection kernel's table: one instance per instruction set, chosen at run time.
#pragma once

#include "attrprims/factored_projection.h"

namespace attrprims {

/// Rows of packed P_in / P_out are padded with zeros to a multiple of this many columns (the micro-kernel width).
constexpr int64_t kFactoredPackCols = 16;

/// P_in and P_out packed once per call: row-major, rows ld_in / ld_out floats apart (multiples of
/// kFactoredPackCols), zeros past column k_in / k_out.
struct FactoredPacked {
  const float* p_in = nullptr;  ///< [d_in, ld_in]
  int64_t ld_in = 0;
  const float* p_out = nullptr;  ///< [d_out, ld_out]
  int64_t ld_out = 0;
};

/// Work units over raw pointers; each writes only its own part of one row of `out`, summing over positions
/// and features in a fixed order, so results do not depend on how units are spread over threads.
struct FactoredCpuKernelTable {
  const char* name;
  /// out[i, o0·k_in : o1·k_in]: rows o0..o1 of out_i (o0 a multiple of kFactoredPackCols).
  void (*example)(const FactoredProjectArgs& a, const FactoredPacked& p, int64_t i, int64_t o0, int64_t o1);
};

extern const FactoredCpuKernelTable kFactoredCpuKernelsGeneric;
#if defined(ATTRPRIMS_HAVE_AVX2)
extern const FactoredCpuKernelTable kFactoredCpuKernelsAvx2;
#endif

}  // namespace attrprims
