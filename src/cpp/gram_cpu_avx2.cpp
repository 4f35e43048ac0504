// CPU Gram kernel for x86-64 with AVX2 and FMA (-mavx2 -mfma -mf16c; used when the CPU has all three).
#define AP_ISA_NS isa_avx2
#define AP_ISA_TABLE kGramCpuKernelsAvx2
#define AP_ISA_NAME "avx2+fma"
#include "gram_cpu_kernels_impl.h"
