"""Load the compiled modules and say which devices can run attrprims kernels, and why not.

`_core` (CPU) is required. `_cuda` is optional: when it is missing or cannot run, CUDA tensors given to an
op raise an error with the reason; nothing falls back silently to the CPU. The CPU kernels run with the best
instruction set this CPU has (generic, avx2, avx512); `set_cpu_kernels` or the environment variable
ATTRPRIMS_CPU_KERNELS picks a lower one, to compare or to test the builds.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

from . import _core
from ._kernel_args import cuda_stream

try:
    _cuda = importlib.import_module(f"{__package__}._cuda")
except ImportError as error:  # not built, or built but unloadable
    _cuda = None
    _CUDA_IMPORT_ERROR: ImportError | None = error
else:
    _CUDA_IMPORT_ERROR = None


def set_cpu_kernels(isa: str) -> str:
    """Run the CPU kernels with instruction set `isa` ("generic", "avx2" or "avx512", if this CPU has it) from now
    on, in the whole process; returns the one used before. Every build gives the same results as the others to
    float rounding (avx2 and avx512 bitwise, for the projection and the Gram update)."""
    if not isinstance(isa, str):
        raise TypeError(f"isa: expected a string, one of {_core.cpu_kernels_supported()}, got {type(isa).__name__}")
    return _core.set_cpu_kernels(isa)


if os.environ.get("ATTRPRIMS_CPU_KERNELS"):
    try:
        set_cpu_kernels(os.environ["ATTRPRIMS_CPU_KERNELS"])
    except ValueError as error:
        raise ImportError(f"ATTRPRIMS_CPU_KERNELS: {error}") from None


class CudaStatus(NamedTuple):
    """Whether CUDA kernels can run here; truthy when they can. `reason` says why not (or what was found)."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


@functools.lru_cache(maxsize=1)
def cuda_available() -> CudaStatus:
    """Report whether attrprims' CUDA kernels can run in this process, with the reason when they cannot."""
    if _cuda is None:
        if isinstance(_CUDA_IMPORT_ERROR, ModuleNotFoundError):
            return CudaStatus(False, "attrprims was built without CUDA (no nvcc at build time, or ATTRPRIMS_CUDA=OFF)")
        return CudaStatus(False, f"the _cuda module failed to load: {_CUDA_IMPORT_ERROR}")
    count, runtime_error = _cuda.device_count()
    if count == 0:
        return CudaStatus(False, f"no usable CUDA device or driver: {runtime_error}")
    if not torch.cuda.is_available():
        return CudaStatus(False, f"torch {torch.__version__} cannot use CUDA (torch.version.cuda={torch.version.cuda})")
    return CudaStatus(True, f"{count} CUDA device(s)")


def cuda_module(name: str, device: torch.device):
    """Return `_cuda` for a tensor `name` on `device`, or raise RuntimeError saying why it cannot run."""
    status = cuda_available()
    if not status:
        raise RuntimeError(f"{name}: is on {device} but attrprims' CUDA kernels cannot run here: {status.reason}")
    return _cuda


def module_and_runner(entry: str, name: str, device: torch.device):
    """The compiled module for `device` and a function calling its `{entry}_cpu` / `{entry}_cuda` on an args struct.

    CUDA entries get the device index and torch's current stream, and, when the module has
    `{entry}_workspace_bytes_cuda`, a workspace of that size from torch's caching allocator (kernels never
    allocate). `name` is the tensor named in errors."""
    if device.type == "cpu":
        return _core, getattr(_core, f"{entry}_cpu")
    if device.type == "cuda":
        module = cuda_module(name, device)
        kernel = getattr(module, f"{entry}_cuda")
        workspace_bytes = getattr(module, f"{entry}_workspace_bytes_cuda", None)
        if workspace_bytes is None:
            return module, lambda args: kernel(args, device.index, cuda_stream(device))

        def run(args):
            size = workspace_bytes(args)
            workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
            kernel(args, workspace.data_ptr(), size, device.index, cuda_stream(device))

        return module, run
    raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {device}")


def build_info() -> dict:
    """Describe the build: version, C++ compiler, CPU kernel ISA and threads, CUDA on/off with its compiler and
    archs."""
    info = dict(_core.build_info)
    info["cpu_kernels"] = _core.cpu_kernels()
    info["cpu_kernels_supported"] = _core.cpu_kernels_supported()
    info["cpu_threads"] = _core.cpu_threads()
    info["torch"] = torch.__version__
    if _cuda is None:
        info["cuda"] = False
    else:
        info["cuda"] = True
        info.update({f"cuda_{key}": value for key, value in _cuda.build_info.items()})
    info["cuda_available"] = cuda_available().reason
    return info
