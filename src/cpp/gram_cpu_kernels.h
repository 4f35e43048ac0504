// The CPU Gram kernel's table: one instance per instruction set, chosen at run time.
#pragma once

#include "attrprims/gram.h"

namespace attrprims {

/// Columns of G per micro-kernel call (the width of a column panel) and rows (the width of a row panel).
constexpr int64_t kGramPanel = 8;
constexpr int64_t kGramTileRows = 6;

/// `depth` rows of X converted to fp64, packed twice with zeros past column k: column panel q is
/// cols[q·depth·8 ..] = [depth, 8] (columns 8q..8q+7), row panel u is rows[u·depth·6 ..] = [depth, 6]
/// (columns 6u..6u+5).
struct GramPacked {
  const double* cols = nullptr;
  const double* rows = nullptr;
  int64_t depth = 0;
};

/// Work units over raw pointers.
struct GramCpuKernelTable {
  const char* name;
  /// Column panels a unit covers (1, or 2 for AVX-512).
  int64_t panels_per_unit;
  /// G[i0:i1, 8q : 8(q + panels_per_unit)] += the packed rows' products, i0 a multiple of kGramTileRows; entries
  /// outside G skipped.
  void (*tiles)(const GramUpdateArgs& a, const GramPacked& p, int64_t q, int64_t i0, int64_t i1);
};

extern const GramCpuKernelTable kGramCpuKernelsGeneric;
#if defined(ATTRPRIMS_HAVE_AVX2)
extern const GramCpuKernelTable kGramCpuKernelsAvx2;
#endif
#if defined(ATTRPRIMS_HAVE_AVX512)
extern const GramCpuKernelTable kGramCpuKernelsAvx512;
#endif

}  // namespace attrprims
