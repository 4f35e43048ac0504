"""attrprims.factored_projection: products against the float64 Kronecker reference, strides, out=, bits, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from attrprims import _core, project_factored
from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DIMS = [1, 7, 17, 31, 257]
KS = [1, 3, 16, 17, 64]


def inputs(n, t, d_in, d_out, k_in, k_out, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=g).to(dtype)
    delta = torch.randn(n, t, d_out, generator=g).to(dtype)
    p_out, p_in = torch.randn(d_out, k_out, generator=g), torch.randn(d_in, k_in, generator=g)
    return a.to(device), delta.to(device), p_out.to(device), p_in.to(device)


def bound(a, delta, p_out, p_in):
    """Σ_t (|δ_t| |P_out|)ᵀ (|a_t| |P_in|) per example, flattened: what fp32 rounding errors are relative to."""
    ud = delta.detach().cpu().double().abs() @ p_out.cpu().double().abs()
    ua = a.detach().cpu().double().abs() @ p_in.cpu().double().abs()
    return torch.einsum("nto,nti->noi", ud, ua).flatten(1)


def assert_factored_close(out, a, delta, p_out, p_in):
    ref = reference.project_factored(a.cpu(), delta.cpu(), p_out.cpu().contiguous(), p_in.cpu().contiguous())
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device == a.device
    assert not torch.isnan(out).any()
    err = (out.cpu().double() - ref).abs()
    limit = TOL[a.dtype] * bound(a, delta, p_out, p_in) + 1e-30
    assert (err <= limit).all(), f"max err/bound {float((err / limit).max()):.3g}"


def check(a, delta, p_out, p_in, **kwargs):
    out = project_factored(a, delta, p_out, p_in, **kwargs)
    assert_factored_close(out, a, delta, p_out, p_in)
    return out


# ---- products against the float64 reference ------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("t", [0, 1, 2, 33, 129])
def test_examples_and_positions(device, n, t):
    check(*inputs(n, t, 17, 31, 16, 17, device=device, seed=n * 1000 + t))


@pytest.mark.parametrize("d_in", DIMS)
@pytest.mark.parametrize("d_out", DIMS)
def test_feature_dims(device, d_in, d_out):
    check(*inputs(3, 33, d_in, d_out, 5, 3, device=device, seed=d_in * 1000 + d_out))


@pytest.mark.parametrize("k_in", KS)
@pytest.mark.parametrize("k_out", KS)
def test_projected_dims(device, k_in, k_out):
    check(*inputs(2, 9, 7, 9, k_in, k_out, device=device, seed=k_in * 100 + k_out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_build(cpu_isa, dtype):
    """Each instruction set's kernels (this family has generic and AVX2 builds; AVX-512 machines run the AVX2 one)."""
    check(*inputs(5, 37, 19, 23, 17, 33, dtype=dtype, seed=5))


def test_several_output_tiles(device):
    """k past the CUDA 64 x 64 tiles and the CPU 16-column panels, one example (the CPU splits it over threads)."""
    check(*inputs(1, 70, 5, 6, 70, 130, device=device))
    check(*inputs(4, 70, 5, 6, 130, 70, device=device, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_dtypes(device, dtype):
    """fp16/bf16 inputs are converted exactly, then summed in fp32: the float32 bound holds for the rounded inputs."""
    check(*inputs(3, 100, 257, 300, 5, 3, dtype=dtype, device=device, seed=3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(device, dtype):
    big_a = torch.randn(9, 50, 40, device=device).to(dtype)
    big_d = torch.randn(50, 9, 30, device=device).to(dtype)
    p_big = torch.randn(40, 20, device=device)
    a = big_a[1:6, 3:40:2, 5:22]                  # padded rows, every other position: t-stride != d_in
    delta = big_d[3:40:2, 1:6, :25].transpose(0, 1)  # position-major storage: n-stride < t-stride
    check(a, delta, p_big[:25, 2:9], p_big[10:27, :11])          # P with row stride > k
    check(a, delta, p_big[:25, 2:9], p_big[:11, 3:20].t())       # P_in column-major: copied
    check(big_a[:4, :7, :8].transpose(1, 2), delta[:4, :8, :3], p_big[:3, :4], p_big[:7, :5])  # strided last dim: copied
    row = torch.randn(1, 1, 17, device=device).to(dtype)
    check(row.expand(5, 19, 17), delta[:, :19], p_big[:25, :6], p_big[:17, :4])  # broadcast a (zero strides)


def test_out_and_accumulate(device):
    a, delta, p_out, p_in = inputs(6, 40, 33, 20, 7, 5, device=device)
    ref = project_factored(a, delta, p_out, p_in)
    holder = torch.full((6, 45), float("nan"), device=device)
    out = holder[:, 5:40]  # strided output rows
    assert project_factored(a, delta, p_out, p_in, out=out) is out
    assert torch.equal(out, ref)
    assert torch.isnan(holder[:, :5]).all() and torch.isnan(holder[:, 40:]).all()
    project_factored(a, delta, p_out, p_in, out=out, accumulate=True)
    torch.testing.assert_close(out, 2 * ref, rtol=0, atol=0)  # x + x is exact


def test_no_positions(device):
    """t = 0: out is zero, or left as it was (bit for bit) when accumulating."""
    a, delta, p_out, p_in = inputs(3, 0, 8, 9, 4, 5, device=device)
    before = torch.full((3, 20), -0.0, device=device)
    out = before.clone()
    project_factored(a, delta, p_out, p_in, out=out, accumulate=True)
    assert torch.equal(out.view(torch.int32), before.view(torch.int32))
    assert torch.equal(project_factored(a, delta, p_out, p_in), torch.zeros(3, 20, device=device))


# ---- determinism -----------------------------------------------------------------------------------

def test_reproducible_run_to_run(device):
    args = inputs(5, 150, 300, 70, 33, 65, dtype=torch.bfloat16, device=device)
    assert torch.equal(project_factored(*args), project_factored(*args))


@pytest.mark.parametrize("n", [1, 7])
def test_threads_and_batch_do_not_change_bits(n):
    """CPU outputs are bitwise independent of the thread count and of the other examples of the batch."""
    a, delta, p_out, p_in = inputs(n, 100, 300, 70, 24, 65)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = project_factored(a, delta, p_out, p_in)
        torch.set_num_threads(2)
        double = project_factored(a, delta, p_out, p_in)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)
    for i in {0, n // 2, n - 1}:
        assert torch.equal(project_factored(a[i:i + 1], delta[i:i + 1], p_out, p_in), single[i:i + 1])


# ---- properties --------------------------------------------------------------------------------------

@given(n=st.integers(1, 3), t=st.integers(0, 20), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       k_in=st.integers(1, 20), k_out=st.integers(1, 20), alpha=st.floats(-3, 3), beta=st.floats(-3, 3),
       seed=st.integers(0, 2**31))
def test_linear_in_delta(n, t, d_in, d_out, k_in, k_out, alpha, beta, seed):
    a, d1, p_out, p_in = inputs(n, t, d_in, d_out, k_in, k_out, seed=seed)
    d2 = torch.randn(n, t, d_out, generator=torch.Generator().manual_seed(seed + 1))
    lhs = project_factored(a, (alpha * d1.double() + beta * d2.double()).float(), p_out, p_in).double()
    rhs = alpha * project_factored(a, d1, p_out, p_in).double() + beta * project_factored(a, d2, p_out, p_in).double()
    limit = 3 * TOL[torch.float32] * (abs(alpha) * bound(a, d1, p_out, p_in) + abs(beta) * bound(a, d2, p_out, p_in))
    assert ((lhs - rhs).abs() <= limit + 1e-30).all()


# ---- errors name the argument -----------------------------------------------------------------------

def _args(**changes):
    args = dict(zip(["a", "delta", "p_out", "p_in"], inputs(8, 5, 7, 16, 3, 4)))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,exc,match", [
    ({"a": [[[1.0]]]}, TypeError, r"a: expected a torch.Tensor of shape \[n, t, d_in\]"),
    ({"a": torch.randn(8, 5)}, ValueError, r"a: expected shape \[n, t, d_in\], got \[8, 5\]"),
    ({"a": torch.randn(8, 5, 7, dtype=torch.float64)}, ValueError, "a: expected dtype float32, float16, bfloat16"),
    ({"delta": torch.randn(8, 5)}, ValueError, r"delta: expected shape \[n, t, d_out\], got \[8, 5\]"),
    ({"delta": torch.randn(8, 4, 16)}, ValueError,
     r"delta: expected shape \[n, t, d_out\] with n, t == 8, 5 \(from a\), got \[8, 4, 16\]"),
    ({"delta": torch.randn(7, 5, 16)}, ValueError, r"delta: expected shape \[n, t, d_out\] with n, t == 8, 5"),
    ({"delta": torch.randn(8, 5, 16, dtype=torch.bfloat16)}, ValueError,
     r"delta: expected dtype float32 \(that of a\), got bfloat16"),
    ({"delta": torch.randn(8, 5, 16, device="meta")}, ValueError, r"delta: expected device cpu \(that of a\), got meta"),
    ({"p_out": torch.randn(15, 4)}, ValueError,
     r"p_out: expected shape \[d_out, k_out\] with d_out == 16 \(from delta\), got \[15, 4\]"),
    ({"p_out": torch.randn(16, 0)}, ValueError, r"p_out: expected shape \[d_out, k_out\] with k_out >= 1"),
    ({"p_out": torch.randn(16, 4, dtype=torch.float16)}, ValueError, "p_out: expected dtype float32, got float16"),
    ({"p_out": torch.randn(16)}, ValueError, r"p_out: expected shape \[d_out, k_out\], got \[16\]"),
    ({"p_out": torch.randn(16, 4, device="meta")}, ValueError, r"p_out: expected device cpu \(that of a\)"),
    ({"p_in": torch.randn(8, 3)}, ValueError, r"p_in: expected shape \[d_in, k_in\] with d_in == 7 \(from a\), got \[8, 3\]"),
    ({"p_in": torch.randn(7, 0)}, ValueError, r"p_in: expected shape \[d_in, k_in\] with k_in >= 1"),
    ({"p_in": "P"}, TypeError, "p_in: expected a torch.Tensor"),
    ({"p_in": torch.randn(7, 3, dtype=torch.bfloat16)}, ValueError, "p_in: expected dtype float32"),
    ({"out": torch.empty(8, 11)}, ValueError, r"out: expected shape \[8, 12\] \[n, k_out\*k_in\], got \[8, 11\]"),
    ({"out": torch.empty(8, 12, dtype=torch.float64)}, ValueError, "out: expected dtype float32"),
    ({"out": torch.empty(12, 8).t()}, ValueError, "out: expected a contiguous last dimension"),
    ({"out": torch.empty(8, 12, device="meta")}, ValueError, r"out: expected device cpu \(that of the input\)"),
    ({"accumulate": True}, ValueError, "accumulate: needs out="),
])
def test_bad_arguments_are_named(changes, exc, match):
    with pytest.raises(exc, match=match):
        project_factored(**_args(**changes))


def test_meta_tensors_are_refused():
    a, delta, p_out, p_in = (t.to("meta") for t in inputs(2, 3, 4, 5, 2, 2))
    with pytest.raises(ValueError, match="a: expected a CPU or CUDA tensor, got device meta"):
        project_factored(a, delta, p_out, p_in)


@pytest.mark.parametrize("name", ["a", "delta"])
def test_non_finite_input_reported_when_asked(name):
    args = _args()
    args[name][1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: expected finite values, found nan at \[1, 2, 3\]"):
        project_factored(**args, check_finite=True)
    out = project_factored(**args)  # unchecked: propagates, never hidden
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("field,value,match", [
    ("k_in", 0, "k_in: must be >= 1, got 0"),
    ("t", -1, "t: must be >= 0, got -1"),
    ("a_stride_t", -3, "a_stride_t: must be >= 0"),
    ("out_row_stride", 5, "out_row_stride: must be >= k_out \\* k_in"),
    ("out_ptr", 0, "out: null pointer"),
])
def test_kernel_rechecks_its_arguments(field, value, match):
    """The C++ entry point re-checks cheap invariants itself and names the field."""
    a, delta, p_out, p_in = inputs(2, 3, 4, 5, 2, 3)
    out = torch.empty(2, 6)
    args = _core.FactoredProjectArgs()
    args.n, args.t, args.d_in, args.d_out, args.k_in, args.k_out = 2, 3, 4, 5, 2, 3
    args.a_ptr, args.a_stride_n, args.a_stride_t = a.data_ptr(), 12, 4
    args.delta_ptr, args.delta_stride_n, args.delta_stride_t = delta.data_ptr(), 15, 5
    args.p_in_ptr, args.p_in_row_stride, args.p_out_ptr, args.p_out_row_stride = p_in.data_ptr(), 2, p_out.data_ptr(), 3
    args.out_ptr, args.out_row_stride = out.data_ptr(), 6
    _core.factored_project_cpu(args)
    assert torch.equal(out, project_factored(a, delta, p_out, p_in))
    setattr(args, field, value)
    with pytest.raises(ValueError, match=match):
        _core.factored_project_cpu(args)
