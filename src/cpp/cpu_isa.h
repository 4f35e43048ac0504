// Run-time choice between the per-instruction-set builds of the CPU kernel tables.
#pragma once

namespace attrprims {

/// Instruction-set levels of the CPU kernel builds, each including the one before.
enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

/// The highest level this binary has a build for and this CPU can run: AVX2 needs AVX2+FMA+F16C, AVX-512 the
/// x86-64-v4 set (F, VL, BW, DQ, CD) on top.
CpuIsa cpu_isa_supported();

/// The level the kernels run at now: the supported one, or a lower one chosen by set_cpu_isa.
CpuIsa cpu_isa_active();

/// Run the kernels at `level` (at most the supported one) from now on, e.g. to test or time the other builds.
void set_cpu_isa(CpuIsa level);

/// The names of the levels: "generic", "avx2", "avx512".
const char* cpu_isa_name(CpuIsa level);

/// The kernel table for the active level; a family without a build at that level (null) uses the next one down.
template <typename Table>
const Table& select_cpu_kernels(const Table& generic, const Table* avx2, const Table* avx512 = nullptr) {
  const CpuIsa level = cpu_isa_active();
  if (level >= CpuIsa::avx512 && avx512 != nullptr) return *avx512;
  if (level >= CpuIsa::avx2 && avx2 != nullptr) return *avx2;
  return generic;
}

}  // namespace attrprims

/// Address of an AVX2 / AVX-512 kernel table, or nullptr in a build without one (the name is then never referenced).
#if defined(ATTRPRIMS_HAVE_AVX2)
#define AP_AVX2_TABLE(table) (&(table))
#else
#define AP_AVX2_TABLE(table) nullptr
#endif
#if defined(ATTRPRIMS_HAVE_AVX512)
#define AP_AVX512_TABLE(table) (&(table))
#else
#define AP_AVX512_TABLE(table) nullptr
#endif
