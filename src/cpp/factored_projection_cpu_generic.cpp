// CPU factored-projection kernel for any target (the portable fallback).
#define AP_ISA_NS isa_generic
#define AP_ISA_TABLE kFactoredCpuKernelsGeneric
#define AP_ISA_NAME "generic"
#include "factored_projection_cpu_kernels_impl.h"
