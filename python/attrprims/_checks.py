"""Argument validation for the public wrappers: every error names the argument, what was expected and what came."""

from __future__ import annotations

import torch

from . import _core

FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
UINT64_MAX = 2**64 - 1
_SCAN_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: dtypes as error messages spell them."""
    return str(dtype).removeprefix("torch.")


def kernel_float(t: torch.Tensor) -> torch.Tensor:
    """`t` if the kernels take its dtype (FLOAT_INPUTS), else cast to float32 (float64 models' gradients)."""
    return t if t.dtype in FLOAT_INPUTS else t.float()


def check_tensor(name: str, t, dims: str, ndim: int, dtypes=FLOAT_INPUTS) -> None:
    """Require an `ndim`-D tensor of one of `dtypes`; `dims` names the dimensions for messages, e.g. "[n, t, d]"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {dims}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype {names}, got {dtype_name(t.dtype)}")


def check_matrix(name: str, t, dims: str, dtypes=FLOAT_INPUTS) -> None:
    """Require a 2-D tensor of one of `dtypes`; `dims` names the dimensions for the message, e.g. "[n, c]"."""
    check_tensor(name, t, dims, 2, dtypes)


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, same_dtype: bool = True) -> None:
    """Require `t` on the device of `ref` and, when `same_dtype`, of its dtype."""
    if same_dtype and t.dtype != ref.dtype:
        expected, got = dtype_name(ref.dtype), dtype_name(t.dtype)
        raise ValueError(f"{name}: expected dtype {expected} (that of {ref_name}), got {got}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Require a Python or NumPy integer (not bool) with low <= value (<= high)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an integer {bound}, got {value}")
    return value


def check_seed(seed) -> int:
    """Seeds are unsigned 64-bit integers."""
    return check_int("seed", seed, 0, UINT64_MAX)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if `t` holds NaN or Inf, naming the first offending position."""
    flat = _scan_non_finite(t)
    if flat is not None:
        if flat < 0:
            return
        index = (flat // t.shape[1], flat % t.shape[1])
        raise ValueError(f"{name}: expected finite values, found {t[index].item()} at {list(index)}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, found {t[index].item()} at {list(index)}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or Inf."""
    flat = _scan_non_finite(t)
    return bool(torch.isfinite(t).all()) if flat is None else flat < 0


def _scan_non_finite(t: torch.Tensor) -> int | None:
    """The flat index of the first NaN/Inf of a CPU matrix with a contiguous last dimension (-1: none), by a
    compiled single-threaded loop, or None for other tensors. A torch op here would leave torch's OpenMP workers
    spinning while the kernel that follows starts its own threads."""
    if t.device.type != "cpu" or t.dim() != 2 or t.dtype not in _SCAN_TAGS or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    rows, cols = t.shape
    return _core.find_non_finite_cpu(t.data_ptr(), getattr(_core.DType, _SCAN_TAGS[t.dtype]), rows, cols,
                                     t.stride(0) if rows > 1 else max(cols, 1))


def check_out(out, shape: tuple[int, int], device: torch.device, dims: str) -> None:
    """`out` must be float32, of `shape`, on `device`, with a contiguous last dimension."""
    check_matrix("out", out, dims, (torch.float32,))
    if tuple(out.shape) != shape:
        raise ValueError(f"out: expected shape {list(shape)} {dims}, got {list(out.shape)}")
    if out.device != device:
        raise ValueError(f"out: expected device {device} (that of the input), got {out.device}")
    if shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"out: expected a contiguous last dimension (stride 1), got strides {list(out.stride())}")


def check_or_allocate_out(out, shape: tuple[int, int], device: torch.device, dims: str, accumulate: bool):
    """Validate a given `out` (see check_out) or allocate one; `accumulate` needs a given `out`."""
    if out is not None:
        check_out(out, shape, device, dims)
        return out
    if accumulate:
        raise ValueError("accumulate: needs out= to accumulate into")
    return torch.empty(shape, dtype=torch.float32, device=device)
