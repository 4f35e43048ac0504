// What the CUDA runtime sees: device count, versions, and the error when no device is usable.
#include "cuda_api.h"
#include "cuda_check.h"

namespace attrprims {

CudaRuntimeInfo cuda_runtime_info() {
  CudaRuntimeInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);
  const cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  }
  return info;
}

}  // namespace attrprims
