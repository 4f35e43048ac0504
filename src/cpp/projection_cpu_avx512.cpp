// CPU projection kernels for x86-64 with AVX-512 (x86-64-v4: F, VL, BW, DQ, CD, plus FMA and F16C; used when the CPU
// has them all). Only the Rademacher sign tables differ from the AVX2 build: 16 examples per block.
#define AP_ISA_NS isa_avx512
#define AP_ISA_TABLE kCpuKernelsAvx512
#define AP_ISA_NAME "avx512"
#include "projection_cpu_kernels_impl.h"
