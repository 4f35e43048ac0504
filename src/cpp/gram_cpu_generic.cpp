// CPU Gram kernel for any target (the portable fallback).
#define AP_ISA_NS isa_generic
#define AP_ISA_TABLE kGramCpuKernelsGeneric
#define AP_ISA_NAME "generic"
#include "gram_cpu_kernels_impl.h"
