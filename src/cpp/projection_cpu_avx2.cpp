// CPU projection kernels for x86-64 with AVX2, FMA and F16C (built with -mavx2 -mfma -mf16c, used when the CPU has all three).
#define AP_ISA_NS isa_avx2
#define AP_ISA_TABLE kCpuKernelsAvx2
#define AP_ISA_NAME "avx2+fma"
#include "projection_cpu_kernels_impl.h"
