// CPU scoring kernel for x86-64 with AVX2, FMA and F16C (-mavx2 -mfma -mf16c; used when the CPU has all three).
#define AP_ISA_NS isa_avx2
#define AP_ISA_TABLE kScoreCpuKernelsAvx2
#define AP_ISA_NAME "avx2+fma"
#include "score_topk_cpu_kernels_impl.h"
