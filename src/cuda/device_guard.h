// RAII: make `device` current for a scope and restore the caller's device after, so nothing launches on cuda:0 by accident.
#pragma once

#include "cuda_check.h"

namespace attrprims {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    AP_CUDA_CHECK(cudaGetDevice(&previous_), "cudaGetDevice");
    changed_ = previous_ != device;
    if (changed_) AP_CUDA_CHECK(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace attrprims
