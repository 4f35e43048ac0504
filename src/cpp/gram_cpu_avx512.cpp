// CPU Gram kernel for x86-64 with AVX-512 (x86-64-v4 plus FMA and F16C; used when the CPU has them all).
#define AP_ISA_NS isa_avx512
#define AP_ISA_TABLE kGramCpuKernelsAvx512
#define AP_ISA_NAME "avx512"
#include "gram_cpu_kernels_impl.h"
