"""Turn validated torch tensors into the kernels' argument structs (pointers, sizes, strides, dtype tags)."""

from __future__ import annotations

import torch

KIND_NAMES = ("rademacher", "gaussian", "sjlt")
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def projection_spec(module, seed: int, kind: str, k: int, s: int):
    """The ProjectionSpec of `module` (_core or _cuda: their pybind types are module-local)."""
    spec = module.ProjectionSpec()
    spec.seed, spec.kind, spec.k, spec.s = seed, getattr(module.Kind, kind), k, s
    return spec


def row_stride(t: torch.Tensor) -> int:
    """Elements between rows; any value >= the row length is valid when there is only one row."""
    return t.stride(0) if t.shape[0] > 1 else max(1, t.shape[1])


def project_args(module, spec, x: torch.Tensor, out: torch.Tensor, *, c: int, offset: int, accumulate: bool):
    """ProjectArgs reading `x` and writing `out`; both have a contiguous last dimension."""
    args = module.ProjectArgs()
    args.spec, args.n, args.c, args.offset = spec, x.shape[0], c, offset
    args.in_ptr, args.in_dtype, args.in_row_stride = x.data_ptr(), getattr(module.DType, _DTYPE_NAMES[x.dtype]), row_stride(x)
    args.out_ptr, args.out_row_stride = out.data_ptr(), row_stride(out)
    args.accumulate, args.num_threads = accumulate, torch.get_num_threads()
    return args


def materialize_args(module, spec, out: torch.Tensor, *, offset: int):
    """MaterializeArgs writing P[offset:offset + out.shape[0]] into `out`."""
    args = module.MaterializeArgs()
    args.spec, args.offset, args.c = spec, offset, out.shape[0]
    args.out_ptr, args.out_row_stride, args.num_threads = out.data_ptr(), row_stride(out), torch.get_num_threads()
    return args


def cuda_stream(device: torch.device) -> int:
    """Handle of torch's current stream on `device`, where CUDA work must go."""
    return torch.cuda.current_stream(device).cuda_stream
