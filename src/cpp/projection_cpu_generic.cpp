// CPU projection kernels for any target (the portable fallback).
#define AP_ISA_NS isa_generic
#define AP_ISA_TABLE kCpuKernelsGeneric
#define AP_ISA_NAME "generic"
#include "projection_cpu_kernels_impl.h"
