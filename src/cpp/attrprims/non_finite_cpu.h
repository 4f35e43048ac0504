// Scan for NaN/Inf on the CPU without a thread pool: the wrappers' input check, run right before a kernel
// (a torch op there would leave torch's OpenMP workers spinning against the kernel's threads).
#pragma once

#include "attrprims/common.h"

namespace attrprims {

/// Flat index r·cols + c of the first non-finite x[r, c] (rows row_stride elements apart, columns contiguous,
/// any DType), or -1 when all are finite.
int64_t find_non_finite_cpu(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride);

}  // namespace attrprims
