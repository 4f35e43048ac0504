// Error checks for CUDA runtime calls and kernel launches: throw std::runtime_error naming the call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define AP_CUDA_CHECK(expr, what)                                                                  \
  do {                                                                                             \
    const cudaError_t ap_err_ = (expr);                                                            \
    if (ap_err_ != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(ap_err_)); \
  } while (0)

/// After a launch: configuration errors surface here, named after the kernel.
#define AP_CUDA_LAUNCH_CHECK(kernel_name) AP_CUDA_CHECK(cudaGetLastError(), kernel_name)
