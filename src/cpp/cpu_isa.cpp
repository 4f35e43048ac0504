// The CPU's instruction-set level and the process-wide choice of kernel builds (compiled without ISA flags).
#include "cpu_isa.h"

#include <atomic>

namespace attrprims {
namespace {

std::atomic<int> active_level{-1};  // -1: not chosen yet, the supported level

}  // namespace

CpuIsa cpu_isa_supported() {
  static const CpuIsa level = [] {
#if defined(ATTRPRIMS_HAVE_AVX2)
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
      return CpuIsa::generic;
#if defined(ATTRPRIMS_HAVE_AVX512)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd"))
      return CpuIsa::avx512;
#endif
    return CpuIsa::avx2;
#else
    return CpuIsa::generic;
#endif
  }();
  return level;
}

CpuIsa cpu_isa_active() {
  const int level = active_level.load(std::memory_order_relaxed);
  return level < 0 ? cpu_isa_supported() : static_cast<CpuIsa>(level);
}

void set_cpu_isa(CpuIsa level) {
  const int supported = static_cast<int>(cpu_isa_supported());
  const int wanted = static_cast<int>(level);
  active_level.store(wanted < supported ? wanted : supported, std::memory_order_relaxed);
}

const char* cpu_isa_name(CpuIsa level) {
  switch (level) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace attrprims
