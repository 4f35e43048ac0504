"""Turn validated torch tensors into the kernels' argument structs (pointers, sizes, strides, dtype tags)."""

from __future__ import annotations

import torch

KIND_NAMES = ("rademacher", "gaussian", "sjlt")
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def projection_spec(module, seed: int, kind: str, k: int, s: int):
    """The ProjectionSpec of `module` (_core or _cuda: their pybind types are module-local)."""
    spec = module.ProjectionSpec()
    spec.seed, spec.kind, spec.k, spec.s = seed, getattr(module.Kind, kind), k, s
    return spec


def _dtype_tag(module, dtype: torch.dtype):
    """`module.DType` member of a float input dtype."""
    return getattr(module.DType, _DTYPE_NAMES[dtype])


def row_stride(t: torch.Tensor) -> int:
    """Elements between rows; any value >= the row length is valid when there is only one row."""
    return t.stride(0) if t.shape[0] > 1 else max(1, t.shape[1])


def project_args(module, spec, x: torch.Tensor, out: torch.Tensor, *, c: int, offset: int, accumulate: bool):
    """ProjectArgs reading `x` and writing `out`; both have a contiguous last dimension."""
    args = module.ProjectArgs()
    args.spec, args.n, args.c, args.offset = spec, x.shape[0], c, offset
    args.in_ptr, args.in_dtype, args.in_row_stride = x.data_ptr(), _dtype_tag(module, x.dtype), row_stride(x)
    args.out_ptr, args.out_row_stride = out.data_ptr(), row_stride(out)
    args.accumulate, args.num_threads = accumulate, torch.get_num_threads()
    return args


def materialize_args(module, spec, out: torch.Tensor, *, offset: int):
    """MaterializeArgs writing P[offset:offset + out.shape[0]] into `out`."""
    args = module.MaterializeArgs()
    args.spec, args.offset, args.c = spec, offset, out.shape[0]
    args.out_ptr, args.out_row_stride, args.num_threads = out.data_ptr(), row_stride(out), torch.get_num_threads()
    return args


def factored_project_args(module, a: torch.Tensor, delta: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor,
                          out: torch.Tensor, *, accumulate: bool):
    """FactoredProjectArgs reading a [n, t, d_in], delta [n, t, d_out] (a's dtype), p_out [d_out, k_out], p_in
    [d_in, k_in] and writing out [n, k_out*k_in]; all have a contiguous last dimension."""
    args = module.FactoredProjectArgs()
    (args.n, args.t, args.d_in), args.d_out = a.shape, delta.shape[2]
    args.k_out, args.k_in = p_out.shape[1], p_in.shape[1]
    args.a_ptr, args.a_dtype = a.data_ptr(), _dtype_tag(module, a.dtype)
    args.a_stride_n, args.a_stride_t = a.stride()[:2]
    args.delta_ptr, (args.delta_stride_n, args.delta_stride_t) = delta.data_ptr(), delta.stride()[:2]
    args.p_out_ptr, args.p_out_row_stride = p_out.data_ptr(), row_stride(p_out)
    args.p_in_ptr, args.p_in_row_stride = p_in.data_ptr(), row_stride(p_in)
    args.out_ptr, args.out_row_stride = out.data_ptr(), row_stride(out)
    args.accumulate, args.num_threads = accumulate, torch.get_num_threads()
    return args


def gram_update_args(module, x: torch.Tensor, g: torch.Tensor, comp: torch.Tensor | None):
    """GramUpdateArgs adding x [b, k]ᵀ x into the lower triangle of g [k, k] (float64, or float32 with Kahan
    compensation `comp`); x has a contiguous last dimension, g and comp are contiguous."""
    args = module.GramUpdateArgs()
    args.b, args.k = x.shape
    args.x_ptr, args.x_dtype, args.x_row_stride = x.data_ptr(), _dtype_tag(module, x.dtype), row_stride(x)
    args.g_ptr, args.g_row_stride, args.g_f32 = g.data_ptr(), row_stride(g), g.dtype == torch.float32
    args.comp_ptr = comp.data_ptr() if comp is not None else 0
    args.num_threads = torch.get_num_threads()
    return args


def score_topk_args(module, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None, index_offset: int,
                    top: tuple[torch.Tensor, torch.Tensor], bottom: tuple[torch.Tensor, torch.Tensor]):
    """ScoreTopkArgs scoring a [m, k] float32 against b [n, k] (weights w [n] float32 or None), merging into the
    running (values, indices) lists top [m, t] and bottom [m, t'] (contiguous)."""
    args = module.ScoreTopkArgs()
    (args.m, args.k), args.n = a.shape, b.shape[0]
    args.a_ptr, args.a_row_stride = a.data_ptr(), row_stride(a)
    args.b_ptr, args.b_dtype, args.b_row_stride = b.data_ptr(), _dtype_tag(module, b.dtype), row_stride(b)
    args.w_ptr, args.index_offset = (w.data_ptr() if w is not None else 0), index_offset
    (tv, ti), (bv, bi) = top, bottom
    args.top, args.top_values_ptr, args.top_indices_ptr, args.top_row_stride = tv.shape[1], tv.data_ptr(), \
        ti.data_ptr(), row_stride(tv)
    args.bottom, args.bottom_values_ptr, args.bottom_indices_ptr, args.bottom_row_stride = bv.shape[1], \
        bv.data_ptr(), bi.data_ptr(), row_stride(bv)
    args.num_threads = torch.get_num_threads()
    return args


def cuda_stream(device: torch.device) -> int:
    """Handle of torch's current stream on `device`, where CUDA work must go."""
    return torch.cuda.current_stream(device).cuda_stream
