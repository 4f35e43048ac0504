"""attrprims.projection: the RNG bit for bit, P entry for entry, products against float64, properties, errors."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
import strategies
from attrprims import Projector, _core, project, project_transpose
from attrprims._backend import cuda_module, cuda_available
from conftest import CUDA_TENSOR_CORE_TOL, SIZES, TOL, each_cpu_build

KINDS = ["rademacher", "gaussian", "sjlt"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_projection_close(out, ref, x, p_abs, tol):
    """|out - ref| <= tol * (|x| @ |P|) elementwise: the float32 accumulation bound, scaled."""
    assert out.dtype == torch.float32
    assert not torch.isnan(out).any()
    bound = tol * (x.detach().cpu().double().abs() @ p_abs) + 1e-30
    err = (out.cpu().double() - ref).abs()
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3g}"


def tolerance(device, dtype, kind):
    if device.type == "cuda" and dtype != torch.float32 and kind != "sjlt":
        return CUDA_TENSOR_CORE_TOL
    return TOL[dtype]


def check_project(x, k, *, seed, kind, s=None, offset=0, device=torch.device("cpu")):
    sjlt_s = (s or min(4, k)) if kind == "sjlt" else 1
    p = torch.from_numpy(reference.matrix(seed, kind, k, range(offset, offset + x.shape[1]), sjlt_s)).double()
    out = project(x, k, seed=seed, kind=kind, s=s, offset=offset)
    assert out.shape == (x.shape[0], k) and out.device == x.device
    assert_projection_close(out, x.detach().cpu().double() @ p, x, p.abs(), tolerance(device, x.dtype, kind))
    return out


# ---- the counter-based RNG -------------------------------------------------------------------------

KNOWN_ANSWERS = [  # Random123's published Philox-4x32-10 vectors: counter, key, output
    ([0, 0, 0, 0], 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, 2**64 - 1, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], 0x299F31D0A4093822, [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    ctr = np.array([counter], dtype=np.uint32)
    assert _core.philox4x32_10(ctr, key)[0].tolist() == expected
    assert reference.philox4x32_10(ctr, key)[0].tolist() == expected


@given(seed=strategies.seeds, data=st.data())
def test_philox_matches_numpy_bit_for_bit(seed, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    counters = rng.integers(0, 2**32, size=(257, 4), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(_core.philox4x32_10(counters, seed), reference.philox4x32_10(counters, seed))


# ---- the matrix, entry by entry ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 7, 33, 127, 128, 129, 300])
@pytest.mark.parametrize("offset", [0, 129, 2**32 - 5, 2**61 + 17])
def test_matrix_equals_reference_bitwise(device, kind, k, offset):
    seed = 0xDEADBEEFCAFEF00D
    s = min(3, k) if kind == "sjlt" else None
    got = Projector(2**62, k, seed, kind, s=s).matrix(slice(offset, offset + 37), device=device)
    want = reference.matrix(seed, kind, k, range(offset, offset + 37), s or 1)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_identical_on_cpu_and_cuda(kind):
    status = cuda_available()
    if not status:
        pytest.skip(status.reason)
    proj = Projector(10**6, 1000, 7, kind)
    rows = slice(12345, 12345 + 500)
    assert torch.equal(proj.matrix(rows), proj.matrix(rows, device="cuda").cpu())


# ---- products against the float64 reference ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_project_rows(device, kind, dtype, n):
    x = torch.randn(n, 301, device=device).to(dtype)
    check_project(x, 129, seed=n, kind=kind, offset=1000, device=device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c", SIZES)
def test_project_chunk_lengths(device, kind, c):
    x = torch.randn(13, c, device=device)
    check_project(x, 257, seed=c + 1, kind=kind, offset=3, device=device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 7, 16, 31, 127, 128, 129, 256, 257, 1000])
def test_project_output_dims(device, kind, k):
    x = torch.randn(7, 259, device=device)
    check_project(x, k, seed=k, kind=kind, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,k,offset", [
    (1, 1, 256, 0),          # the smallest sign-table call: one lane, one row of P
    (9, 7, 263, 5),          # a ragged block of 8 examples, a partial group of 8 rows, k % 8 != 0
    (17, 1001, 1024, 2**33 + 3),
])
def test_project_rademacher_sign_tables(n, c, k, offset, dtype):
    """The CPU's forward Rademacher path for k >= 256 (sign tables) against float64."""
    x = torch.randn(n, c).to(dtype)
    out = check_project(x, k, seed=c, kind="rademacher", offset=offset)
    again = torch.full_like(out, 0.5)
    project(x, k, seed=c, kind="rademacher", offset=offset, out=again, accumulate=True)
    torch.testing.assert_close(again, out + 0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", [(1, 256), (9, 263), (16, 300), (17, 129), (33, 1024)])
def test_every_cpu_build(cpu_isa, kind, n, k):
    """Each instruction set's kernels (sign tables take 8 or 16 examples a block) against float64."""
    check_project(torch.randn(n, 203), k, seed=n + k, kind=kind, offset=77)


@given(seed=strategies.seeds, n=st.integers(1, 40), c=st.integers(1, 90), k=st.integers(256, 700))
def test_cpu_builds_agree_bitwise(seed, n, c, k):
    """The Rademacher sign tables sum every example's terms in the same order whatever the build: same bits."""
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed))
    results = each_cpu_build(lambda: project(x, k, seed=seed, kind="rademacher"))
    for out in results[1:]:
        assert torch.equal(out, results[0])


@pytest.mark.parametrize("k", [2**16, 2**16 + 1])
def test_project_rademacher_large_k(k):
    """The largest sign-table k covers P's rows in passes (512 rows each here, the last one partial); one more goes
    by the GEMM path again."""
    c = 600
    x = torch.randn(3, c)
    p = Projector(11 + c, k, seed=2).matrix(slice(11, 11 + c))  # bitwise the reference's matrix
    out = project(x, k, seed=2, offset=11)
    for c0 in range(0, k, 8192):  # float64 reference a slice of columns at a time
        part = p[:, c0:c0 + 8192].double()
        assert_projection_close(out[:, c0:c0 + 8192], x.double() @ part, x, part.abs(), TOL[torch.float32])


@pytest.mark.parametrize("s", [1, 2, 5, 8, 64])
def test_project_sjlt_nonzeros(device, s):
    x = torch.randn(9, 333, device=device)
    check_project(x, 64, seed=5, kind="sjlt", s=s, device=device)


@pytest.mark.parametrize("kind", KINDS)
def test_project_large_batch_and_chunk(device, kind):
    """Sizes past the CPU register blocks and the CUDA slices (several slices of 2048 rows of P)."""
    x = torch.randn(70, 9000, device=device)
    check_project(x, 300, seed=11, kind=kind, offset=2**33, device=device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_strided_views(device, kind, dtype):
    big = torch.randn(40, 700, device=device).to(dtype)
    check_project(big[3:20, 5:400], 100, seed=1, kind=kind, device=device)      # padded rows
    check_project(big[::3, 100:351], 100, seed=2, kind=kind, device=device)     # every third row
    check_project(big[:50, :30].t(), 100, seed=3, kind=kind, device=device)     # non-unit column stride (copied)


@pytest.mark.parametrize("kind", KINDS)
def test_project_out_and_accumulate(device, kind):
    x = torch.randn(11, 200, device=device)
    ref = project(x, 77, seed=4, kind=kind)
    holder = torch.full((11, 90), float("nan"), device=device)
    out = holder[:, 5:82]  # strided output rows
    assert project(x, 77, seed=4, kind=kind, out=out) is out
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.isnan(holder[:, :5]).all() and torch.isnan(holder[:, 82:]).all()
    project(x, 77, seed=4, kind=kind, out=out, accumulate=True)
    torch.testing.assert_close(out, 2 * ref, rtol=1e-5, atol=1e-5)  # summed into out in a different order


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_chunk", [0, 1, 31, 129, 1000])
def test_project_transpose(device, kind, dtype, p_chunk):
    k = 300
    s = 4 if kind == "sjlt" else 1
    y = torch.randn(9, k, device=device).to(dtype)
    out = project_transpose(y, p_chunk, seed=6, kind=kind, offset=77)
    p = torch.from_numpy(reference.matrix(6, kind, k, range(77, 77 + p_chunk), s)).double()
    assert out.shape == (9, p_chunk)
    assert_projection_close(out, y.cpu().double() @ p.T, y, p.abs().T, TOL[dtype])


def test_project_transpose_is_adjoint(device):
    """<x P, y> == <x, y P^T>."""
    x, y = torch.randn(5, 400, device=device, dtype=torch.float64), torch.randn(5, 64, device=device)
    xp = project(x.float(), 64, seed=9, kind="gaussian").double()
    ypt = project_transpose(y, 400, seed=9, kind="gaussian").double()
    torch.testing.assert_close((xp * y.double()).sum(), (x * ypt).sum(), rtol=1e-5, atol=1e-5)


# ---- properties --------------------------------------------------------------------------------

@given(seed=strategies.seeds, kind=strategies.kinds, k=strategies.small_k, n=strategies.rows, c=strategies.chunk_len,
       offset=strategies.offsets)
def test_seed_determinism(seed, kind, k, n, c, offset):
    x = torch.randn(n, c)
    a = project(x, k, seed=seed, kind=kind, offset=offset)
    b = project(x, k, seed=seed, kind=kind, offset=offset)
    assert torch.equal(a, b)


@given(seed=strategies.seeds, kind=strategies.kinds, k=strategies.small_k, c=strategies.chunk_len, data=st.data())
def test_chunk_invariance(seed, kind, k, c, data):
    """Projecting any split of the columns and summing equals projecting the whole vector."""
    cuts = data.draw(strategies.splits(c))
    x = torch.randn(4, c)
    whole = project(x, k, seed=seed, kind=kind, offset=10)
    parts = sum(project(x[:, a:b], k, seed=seed, kind=kind, offset=10 + a) for a, b in zip(cuts, cuts[1:]))
    p = torch.from_numpy(reference.matrix(seed, kind, k, range(10, 10 + c), min(4, k))).double().abs()
    assert_projection_close(parts, whole.double(), x, p, 2 * TOL[torch.float32])
    # The matrix itself is bit-identical under any slicing.
    proj = Projector(10 + c, k, seed, kind)
    rows = torch.cat([proj.matrix(slice(10 + a, 10 + b)) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(rows, proj.matrix(slice(10, 10 + c)))


@given(seed=strategies.seeds, kind=strategies.kinds, k=strategies.small_k, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linearity(seed, kind, k, a, b):
    x, y = torch.randn(3, 150, dtype=torch.float64), torch.randn(3, 150, dtype=torch.float64)
    lhs = project((a * x + b * y).float(), k, seed=seed, kind=kind).double()
    rhs = a * project(x.float(), k, seed=seed, kind=kind).double() + b * project(y.float(), k, seed=seed, kind=kind).double()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4 * (abs(a) + abs(b) + 1))


@given(seed=strategies.seeds, kind=strategies.kinds)
def test_different_seeds_give_different_matrices(seed, kind):
    other = (seed + 1) % 2**64
    assert not torch.equal(Projector(64, 64, seed, kind).matrix(), Projector(64, 64, other, kind).matrix())


@pytest.mark.parametrize("kind", KINDS)
def test_rows_and_threads_do_not_change_bits(kind):
    """CPU results are bitwise independent of batch composition and of the thread count (with fewer examples than
    threads, the sign tables split the columns between threads)."""
    x = torch.randn(37, 1100)
    full = project(x, 300, seed=3, kind=kind)
    for i in [0, 5, 36]:
        assert torch.equal(project(x[i:i + 1], 300, seed=3, kind=kind), full[i:i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = project(x, 300, seed=3, kind=kind)
        torch.set_num_threads(4)
        one_row_four_threads = project(x[5:6], 300, seed=3, kind=kind)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, full)
    assert torch.equal(one_row_four_threads, full[5:6])


# ---- statistics of P --------------------------------------------------------------------------------

def test_rademacher_entries():
    m = Projector(4000, 500, 1, "rademacher").matrix().double()
    assert (m.abs() == float(np.float32(500**-0.5))).all()
    positive = (m > 0).double().mean().item()
    assert abs(positive - 0.5) < 4 * 0.5 / np.sqrt(m.numel())


def test_gaussian_entries():
    z = (Projector(4000, 500, 2, "gaussian").matrix().double() * 500**0.5).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / np.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * np.sqrt(2 / n)
    assert abs(((z**4).mean() / z.var() ** 2).item() - 3) < 0.05  # kurtosis of a normal
    for q, expected in [(1.0, 0.682689), (2.0, 0.954500), (3.0, 0.997300)]:
        frac = (z.abs() < q).double().mean().item()
        assert abs(frac - expected) < 5 * np.sqrt(expected * (1 - expected) / n)
    assert z.abs().max().item() <= 5.77


@pytest.mark.parametrize("s", [1, 3, 4, 7])
def test_sjlt_entries(s):
    k = 97
    m = Projector(5000, k, 3, "sjlt", s=s).matrix()
    nonzero = m != 0
    assert (nonzero.sum(1) == s).all()  # exactly s distinct columns per row
    assert torch.allclose(m[nonzero].abs(), torch.tensor(s**-0.5))
    for j in range(s):  # one nonzero in each column block
        lo, hi = j * k // s, (j + 1) * k // s
        assert (nonzero[:, lo:hi].sum(1) == 1).all()
    assert abs((m[nonzero] > 0).double().mean().item() - 0.5) < 0.02
    per_column = nonzero.sum(0).double()
    expected = 5000 * s / k
    assert (per_column - expected).abs().max() < 6 * np.sqrt(expected) + 5000 / (k // s)  # uniform within blocks


@pytest.mark.parametrize("kind", KINDS)
def test_norm_preserved_on_average(kind):
    """E||xP||^2 = ||x||^2: mean over 200 independent matrices within 4 standard errors."""
    x = torch.randn(1, 512)
    ratios = torch.tensor([(project(x, 64, seed=seed, kind=kind).double().norm() ** 2 / x.double().norm() ** 2).item()
                           for seed in range(200)])
    assert abs(ratios.mean().item() - 1) < 4 * ratios.std().item() / np.sqrt(200)


def test_inner_products_preserved_at_large_k():
    x = torch.randn(6, 2000, dtype=torch.float64)
    gram = x @ x.T
    for kind in KINDS:
        y = project(x.float(), 4096, seed=0, kind=kind).double()
        assert ((y @ y.T - gram).abs().max() / gram.diagonal().mean()).item() < 0.12


# ---- Projector ----------------------------------------------------------------------------------------

def test_projector_call_transpose_and_config():
    proj = Projector(1000, 64, 5, "sjlt", s=2)
    x = torch.randn(3, 400)
    assert torch.equal(proj(x, offset=600), project(x, 64, seed=5, kind="sjlt", s=2, offset=600))
    y = torch.randn(3, 64)
    assert torch.equal(proj.transpose(y, offset=600), project_transpose(y, 400, seed=5, kind="sjlt", s=2, offset=600))
    assert proj.config() == {"kind": "sjlt", "p": 1000, "k": 64, "seed": 5, "rng": "philox4x32-10", "format": 1, "s": 2}
    assert Projector.from_config(proj.config()) == proj
    assert proj != Projector(1000, 64, 6, "sjlt", s=2) and proj != Projector(1000, 64, 5, "sjlt", s=3)
    assert hash(Projector(10, 3, 1)) == hash(Projector(10, 3, 1))
    assert repr(proj) == "Projector(p=1000, k=64, seed=5, kind='sjlt', s=2)"
    assert Projector(10, 4, 0).config()["kind"] == "rademacher" and "s" not in Projector(10, 4, 0).config()


def test_projector_matrix_consistent_with_call():
    proj = Projector(300, 40, 8, "gaussian")
    x = torch.randn(5, 300, dtype=torch.float64)
    torch.testing.assert_close(proj(x.float()).double(), x @ proj.matrix().double(), rtol=1e-5, atol=1e-5)


# ---- errors name the argument -----------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda: project(torch.randn(3), 4, seed=0), ValueError, r"x: expected shape \[n, c\], got \[3\]"),
    (lambda: project([[1.0]], 4, seed=0), TypeError, "x: expected a torch.Tensor"),
    (lambda: project(torch.randn(2, 3), 0, seed=0), ValueError, "k: expected an integer in"),
    (lambda: project(torch.randn(2, 3), 2**31, seed=0), ValueError, "k: "),
    (lambda: project(torch.randn(2, 3), 4.0, seed=0), TypeError, "k: expected an integer"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, offset=-1), ValueError, "offset: "),
    (lambda: project(torch.randn(2, 3), 4, seed=-1), ValueError, "seed: "),
    (lambda: project(torch.randn(2, 3), 4, seed=2**64), ValueError, "seed: "),
    (lambda: project(torch.randn(2, 3), 4, seed=True), TypeError, "seed: "),
    (lambda: project(torch.randn(2, 3, dtype=torch.float64), 4, seed=0), ValueError, "x: expected dtype float32"),
    (lambda: project(torch.ones(2, 3, dtype=torch.int32), 4, seed=0), ValueError, "x: expected dtype"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, kind="normal"), ValueError, "kind: expected one of"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, s=2), ValueError, "s: only kind='sjlt'"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, kind="sjlt", s=5), ValueError, "s: expected an integer in"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, out=torch.empty(2, 5)), ValueError, r"out: expected shape \[2, 4\]"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, out=torch.empty(2, 4, dtype=torch.float64)), ValueError, "out: expected dtype float32"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, out=torch.empty(4, 2).t()), ValueError, "out: expected a contiguous last"),
    (lambda: project(torch.randn(2, 3), 4, seed=0, accumulate=True), ValueError, "accumulate: needs out="),
    (lambda: project(torch.randn(2, 3, device="meta"), 4, seed=0), ValueError, "x: expected a CPU or CUDA tensor"),
    (lambda: project_transpose(torch.randn(2, 3), -1, seed=0), ValueError, "p_chunk: "),
    (lambda: project_transpose(torch.randn(3), 4, seed=0), ValueError, r"y: expected shape \[n, k\]"),
    (lambda: Projector(0, 4), ValueError, "p: "),
    (lambda: Projector(10, 4)(torch.randn(2, 8), offset=3), ValueError, "x: columns offset..offset"),
    (lambda: Projector(10, 4).transpose(torch.randn(2, 5)), ValueError, r"y: expected shape \[n, k\] with k == 4"),
    (lambda: Projector(10, 4).matrix(slice(0, 10, 2)), ValueError, "rows: expected a slice with step 1"),
    (lambda: Projector(10, 4).matrix(3), TypeError, "rows: expected a slice"),
    (lambda: Projector.from_config({"kind": "gaussian", "p": 3, "k": 2, "seed": 0}), ValueError, "config: "),
])
def test_bad_arguments_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_reported_when_asked(bad):
    x = torch.randn(4, 10)
    x[2, 7] = bad
    with pytest.raises(ValueError, match=r"x: expected finite values, found .* at \[2, 7\]"):
        project(x, 8, seed=0, check_finite=True)
    assert not torch.isfinite(project(x, 8, seed=0)).all()  # unchecked: propagates, never hidden


def test_cuda_tensor_without_usable_kernels_says_why():
    status = cuda_available()
    if status:
        pytest.skip("CUDA kernels can run here")
    with pytest.raises(RuntimeError, match=re.escape(f"x: is on cuda:0 but attrprims' CUDA kernels cannot run here: {status.reason}")):
        cuda_module("x", torch.device("cuda:0"))
