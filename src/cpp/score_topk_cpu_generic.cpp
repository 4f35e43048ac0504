// CPU scoring kernel for any target (the portable fallback).
#define AP_ISA_NS isa_generic
#define AP_ISA_TABLE kScoreCpuKernelsGeneric
#define AP_ISA_NAME "generic"
#include "score_topk_cpu_kernels_impl.h"
