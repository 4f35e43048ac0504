// Run-time choice between the per-instruction-set builds of the CPU kernel tables.
#pragma once

namespace attrprims {

/// True when this binary has the AVX2+FMA builds of the kernels (which also use F16C) and this CPU can run them.
inline bool cpu_runs_avx2() {
#if defined(ATTRPRIMS_HAVE_AVX2)
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

/// The kernel table for this CPU: `avx2` (null when not built, see AP_AVX2_TABLE) if it can run, else `generic`.
template <typename Table>
const Table& select_cpu_kernels(const Table& generic, const Table* avx2) {
  return avx2 != nullptr && cpu_runs_avx2() ? *avx2 : generic;
}

}  // namespace attrprims

/// Address of an AVX2 kernel table, or nullptr in a build without one (the name is then never referenced).
#if defined(ATTRPRIMS_HAVE_AVX2)
#define AP_AVX2_TABLE(table) (&(table))
#else
#define AP_AVX2_TABLE(table) nullptr
#endif
