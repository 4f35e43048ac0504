"""Shared fixtures: the device list (CUDA auto-skipped where it cannot run), sizes, tolerances, hypothesis profiles."""

import os

import pytest
import torch
from hypothesis import settings

import attrprims

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Awkward sizes: empty, one, primes, around tile edges (16, 32, 128, 256).
SIZES = [0, 1, 2, 7, 31, 33, 127, 257, 1000]

# Relative error bound per input dtype for fp32 accumulation: |out - ref| <= TOL * (|x| @ |P|).
TOL = {torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}
# Tensor cores accumulate with truncated alignment, and Gaussian P is carried as bf16/fp16 hi + lo.
CUDA_TENSOR_CORE_TOL = 3e-4


def _cuda_param():
    status = attrprims.cuda_available()
    return pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not status, reason=status.reason)])


@pytest.fixture(params=["cpu", _cuda_param()])
def device(request):
    """Each kernel test runs on the CPU and, where CUDA kernels can run, on cuda."""
    return torch.device(request.param)


def each_cpu_build(fn):
    """[fn() under each CPU kernel build this machine runs], lowest first; the build in use before is restored."""
    results = []
    for isa in attrprims.build_info()["cpu_kernels_supported"]:
        previous = attrprims.set_cpu_kernels(isa)
        try:
            results.append(fn())
        finally:
            attrprims.set_cpu_kernels(previous)
    return results


@pytest.fixture(params=attrprims.build_info()["cpu_kernels_supported"])
def cpu_isa(request):
    """The test runs under each CPU kernel build this machine can run (generic, avx2, avx512); the one in use
    before comes back afterwards."""
    previous = attrprims.set_cpu_kernels(request.param)
    yield request.param
    attrprims.set_cpu_kernels(previous)
