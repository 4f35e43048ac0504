"""Factored (Kronecker) projection of per-example Linear-layer weight gradients, never forming them (LoGra).

For a Linear layer with per-example inputs a_i [t, d_in] and output gradients delta_i [t, d_out] (t tokens or
positions), the weight gradient is G_i = Σ_t delta_i[t] a_i[t]ᵀ [d_out, d_in]. Projected with P = P_out ⊗ P_in,
its row-major flattening gives out_i = (delta_i P_out)ᵀ (a_i P_in) [k_out, k_in], at a cost of
O(t·(d_out·k_out + d_in·k_in + k_out·k_in)) per example instead of O(d_out·d_in·k_out·k_in).
"""

from __future__ import annotations

import torch

from ._backend import module_and_runner
from ._checks import check_finite as _check_finite
from ._checks import check_like, check_matrix, check_or_allocate_out, check_tensor
from ._kernel_args import factored_project_args


def _check_factor(name: str, p, d_name: str, k_name: str, d: int, source: str, like: torch.Tensor) -> None:
    """p: [d, k] float32 with k >= 1 on the device of `like`; d comes from the tensor named `source`."""
    dims = f"[{d_name}, {k_name}]"
    check_matrix(name, p, dims, (torch.float32,))
    if p.shape[0] != d:
        raise ValueError(f"{name}: expected shape {dims} with {d_name} == {d} (from {source}), got {list(p.shape)}")
    if p.shape[1] < 1:
        raise ValueError(f"{name}: expected shape {dims} with {k_name} >= 1, got {list(p.shape)}")
    check_like(name, p, "a", like, same_dtype=False)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last dimension is strided (the kernels read rows as contiguous runs)."""
    return t.contiguous() if t.shape[-1] > 1 and t.stride(-1) != 1 else t


def project_factored(a, delta, p_out, p_in, *, out=None, accumulate=False, check_finite=False):
    """Project each example's Linear-layer weight gradient Σ_t delta[i, t] a[i, t]ᵀ with P = P_out ⊗ P_in.

    Equivalent to `(torch.einsum('nto,nti->noi', delta, a).reshape(n, -1) @ torch.kron(p_out, p_in))`, computed as
    out[i] = ((delta[i] @ p_out).T @ (a[i] @ p_in)).flatten() without forming the [d_out, d_in] gradients.

    Args:
        a: [n, t, d_in] layer inputs, float32|float16|bfloat16, CPU or CUDA; any strides with a contiguous
            last dimension (otherwise copied). delta: [n, t, d_out] output gradients, a's dtype and device.
        p_out: [d_out, k_out] float32 on a's device. p_in: [d_in, k_in] float32 on a's device.
        out: [n, k_out*k_in] float32 on a's device. accumulate: add into `out` instead of overwriting it.
        check_finite: raise on NaN/Inf in a or delta.
    Returns: [n, k_out*k_in] float32 (`out` if given), fp32 accumulation. Not differentiable (runs as under no_grad).
    Raises: TypeError/ValueError naming the bad argument; RuntimeError for a CUDA tensor without usable kernels.
    Determinism: bitwise reproducible run to run on a device (fixed summation order, no atomics). CPU outputs
    are bitwise independent of the thread count and of the other examples in the batch; CPU and CUDA agree to
    float32 rounding.
    """
    check_tensor("a", a, "[n, t, d_in]", 3)
    check_tensor("delta", delta, "[n, t, d_out]", 3)
    n, t, d_in = a.shape
    if delta.shape[:2] != a.shape[:2]:
        raise ValueError(f"delta: expected shape [n, t, d_out] with n, t == {n}, {t} (from a), got {list(delta.shape)}")
    check_like("delta", delta, "a", a)
    _check_factor("p_out", p_out, "d_out", "k_out", delta.shape[2], "delta", a)
    _check_factor("p_in", p_in, "d_in", "k_in", d_in, "a", a)
    a, delta = _unit_last_stride(a.detach()), _unit_last_stride(delta.detach())
    p_out, p_in = p_out.detach().contiguous(), p_in.detach().contiguous()  # small: copied when strided at all
    if check_finite:
        _check_finite("a", a)
        _check_finite("delta", delta)
    k = p_out.shape[1] * p_in.shape[1]
    out = check_or_allocate_out(out, (n, k), a.device, "[n, k_out*k_in]", accumulate)
    module, run = module_and_runner("factored_project", "a", a.device)
    run(factored_project_args(module, a, delta, p_out, p_in, out, accumulate=accumulate))
    return out
