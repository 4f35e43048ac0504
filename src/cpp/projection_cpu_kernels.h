// The CPU projection kernels' table: one instance per instruction set, chosen at run time.
#pragma once

#include "attrprims/projection.h"

namespace attrprims {

/// Output columns of one dense forward work unit (one Rademacher Philox call per row of P).
constexpr int64_t kCpuTileCols = 128;
/// Rows of P (output columns) of one dense transpose work unit.
constexpr int64_t kCpuTransposeTileRows = 128;
/// Range of k whose forward Rademacher projection goes by sign tables: below it, tabulating costs more than
/// the FMAs it saves; above it, the per-thread accumulators (32·k bytes) and sign bytes outgrow the caches.
constexpr int64_t kCpuSignTableMinK = 256;
constexpr int64_t kCpuSignTableMaxK = int64_t{1} << 16;
/// Most bytes of Rademacher signs generated per pass over the input: a pass covers 8 · this / k rows of P,
/// rounded down to a multiple of 512, and at least 64.
constexpr int64_t kCpuSignBytesPerPass = int64_t{4} << 20;
/// Rows of P of one SJLT transpose work unit.
constexpr int64_t kCpuSjltTileRows = 1024;

/// Work units over raw pointers; each writes only its own block of `out`, summing over P's rows in a
/// fixed order, so results do not depend on how units are spread over threads.
struct CpuKernelTable {
  const char* name;
  /// Examples per rademacher_sign_table_block call (its vector lanes).
  int64_t sign_table_lanes;
  /// out[i0:i1, j0:j0+kCpuTileCols] for a dense kind.
  void (*dense_forward)(const ProjectArgs& a, int64_t j0, int64_t i0, int64_t i1);
  /// out[i0:i1, r0:r0+kCpuTransposeTileRows] of the transposed product for a dense kind.
  void (*dense_transpose)(const ProjectArgs& a, int64_t r0, int64_t i0, int64_t i1);
  /// out[i0:i1, :] for SJLT.
  void (*sjlt_forward)(const ProjectArgs& a, int64_t i0, int64_t i1);
  /// out[i0:i1, r0:r0+kCpuSjltTileRows] of the transposed product for SJLT.
  void (*sjlt_transpose)(const ProjectArgs& a, int64_t r0, int64_t i0, int64_t i1);
  /// Rows r0..r1 (relative to a.offset) of the materialised slice.
  void (*materialize)(const MaterializeArgs& a, int64_t r0, int64_t r1);
  /// Rademacher sign bytes of rows offset+r0 .. offset+r1 of P, local groups g0..g1 of 8
  /// rows; `signs` is [groups, k].
  void (*rademacher_sign_bytes)(const ProjectArgs& a, int64_t r0, int64_t r1, int64_t g0, int64_t g1,
                                uint8_t* signs);
  /// out[i0:i0+sign_table_lanes, j0:j1] (+)= the Rademacher projection of x[:, r0:r1] from those rows' sign bytes.
  void (*rademacher_sign_table_block)(const ProjectArgs& a, const uint8_t* signs, int64_t r0, int64_t r1,
                                      int64_t i0, int64_t j0, int64_t j1, bool add);
};

extern const CpuKernelTable kCpuKernelsGeneric;
#if defined(ATTRPRIMS_HAVE_AVX2)
extern const CpuKernelTable kCpuKernelsAvx2;
#endif
#if defined(ATTRPRIMS_HAVE_AVX512)
extern const CpuKernelTable kCpuKernelsAvx512;
#endif

}  // namespace attrprims
