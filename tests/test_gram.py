"""attrprims.gram: updates against float64 XᵀX (shapes, dtypes, strides, many updates, order, threads),
merge and all-reduce, damped solves against torch.linalg.solve, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from attrprims import GramAccumulator
from attrprims.gram import FeatureGram
from conftest import CUDA_TENSOR_CORE_TOL, each_cpu_build
from strategies import splits

INPUTS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
PASS_ROWS = 256  # rows per CPU pass (kMaxDepth): one fp32 rounding per pass with a float32 accumulator


def features(b, k, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def assert_gram_close(acc, batches):
    """acc's G against the float64 reference, within the rounding its accumulator and device allow."""
    ref = sum((reference.gram(x) for x in batches), torch.zeros(acc.k, acc.k, dtype=torch.float64))
    scale = sum((reference.gram(x.abs()) for x in batches), torch.zeros_like(ref))
    g = acc.finalize()
    assert g.dtype == acc.dtype and g.shape == (acc.k, acc.k) and g.device == acc.device
    g = g.cpu().double()
    assert torch.equal(g, g.T)
    rows = sum(x.shape[0] for x in batches)
    if acc.dtype == torch.float64:
        rel = 4 * (rows + 1) * EPS[torch.float64]
    else:
        passes = sum(-(-x.shape[0] // PASS_ROWS) for x in batches)
        rel = 4 * (passes + 2) * EPS[torch.float32]
    if acc.device.type == "cuda" and any(x.dtype in (torch.float16, torch.bfloat16) for x in batches):
        rel += CUDA_TENSOR_CORE_TOL
    err = (g - ref).abs()
    assert (err <= rel * scale + 1e-300).all(), f"max err/scale {float((err / (scale + 1e-300)).max()):.3g} > {rel:.3g}"


@pytest.mark.parametrize("b", [0, 1, 2, 7, 257, 600])
@pytest.mark.parametrize("k", [0, 1, 2, 7, 31, 33, 127])
def test_shapes(device, b, k):
    x = features(b, k, device=device, seed=b * 1000 + k)
    acc = GramAccumulator(k, device=device).update(x)
    assert acc.count == b
    assert_gram_close(acc, [x])


@pytest.mark.parametrize("dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_dtypes(device, dtype, acc_dtype):
    x = features(300, 61, dtype, device, seed=3)
    assert_gram_close(GramAccumulator(61, dtype=acc_dtype, device=device).update(x), [x])


@pytest.mark.parametrize("b,k", [(1, 1), (7, 13), (257, 33), (300, 127), (37, 301)])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_every_cpu_build(cpu_isa, b, k, acc_dtype):
    """Each instruction set's kernel (AVX-512 pairs row panels: odd and even panel counts, ragged last panels)."""
    x = features(b, k, seed=b + k)
    assert_gram_close(GramAccumulator(k, dtype=acc_dtype).update(x), [x])


@given(b=st.integers(0, 300), k=st.integers(1, 140), seed=st.integers(0, 2**16))
def test_cpu_builds_agree_bitwise(b, k, seed):
    """One fused multiply-add per row in every SIMD build, in the same order: the same bits from AVX2 and AVX-512
    (and from the generic build for float32 input, whose products are exact in float64)."""
    x = features(b, k, seed=seed)
    results = each_cpu_build(lambda: GramAccumulator(k).update(x).finalize())
    for g in results[1:]:
        assert torch.equal(g, results[0])


def test_large_k_crosses_tiles(device):
    x = features(70, 1000, device=device, seed=5)
    assert_gram_close(GramAccumulator(1000, device=device).update(x), [x])


def test_strided_views(device):
    big = features(40, 90, device=device, seed=7)
    x = big[::3, 5:70]  # row stride 270, last dim contiguous
    assert_gram_close(GramAccumulator(65, device=device).update(x), [x])
    xt = features(33, 20, device=device, seed=8).T  # last dim strided: copied
    assert_gram_close(GramAccumulator(33, device=device).update(xt), [xt])


@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_many_small_updates(device, acc_dtype):
    batches = [features(b, 45, device=device, seed=b) for b in [1, 2, 3, 1, 7, 0, 5] * 20]
    acc = GramAccumulator(45, dtype=acc_dtype, device=device)
    for x in batches:
        acc.update(x)
    assert acc.count == sum(x.shape[0] for x in batches)
    assert_gram_close(acc, batches)


def test_float32_accumulator_is_compensated():
    """Kahan compensation keeps a float32 G near fp64 accuracy where plain float32 sums drift."""
    x = features(1, 8, seed=9) + 100.0
    acc = GramAccumulator(8, dtype=torch.float32)
    plain = torch.zeros(8, 8, dtype=torch.float32)
    for _ in range(3000):
        acc.update(x)
        plain += x.T @ x
    ref = 3000 * reference.gram(x)
    err_kahan = float((acc.finalize().double() - ref).abs().max() / ref.abs().max())
    err_plain = float((plain.double() - ref).abs().max() / ref.abs().max())
    assert err_kahan < 1e-7 < err_plain


@given(cuts=splits(120), seed=st.integers(0, 2**16))
def test_split_and_order_do_not_matter(cuts, seed):
    x = features(120, 23, seed=seed)
    batches = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    forward, backward = GramAccumulator(23), GramAccumulator(23)
    for piece in batches:
        forward.update(piece)
    for piece in reversed(batches):
        backward.update(piece)
    assert_gram_close(forward, [x])
    torch.testing.assert_close(forward.finalize(), backward.finalize(), rtol=1e-13, atol=1e-12)


def test_thread_count_is_bitwise_irrelevant():
    x = features(700, 101, seed=11)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(GramAccumulator(101).update(x).finalize())
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_merge(device, acc_dtype):
    a, b = features(50, 17, device=device, seed=1), features(30, 17, device=device, seed=2)
    left = GramAccumulator(17, dtype=acc_dtype, device=device).update(a)
    left.merge(GramAccumulator(17, dtype=acc_dtype, device=device).update(b))
    assert left.count == 80
    assert_gram_close(left, [a, b])
    with pytest.raises(ValueError, match="other"):
        left.merge(GramAccumulator(18, dtype=acc_dtype, device=device))
    with pytest.raises(TypeError, match="other"):
        left.merge(torch.zeros(17, 17))


def _all_reduce_worker(rank, world, init, acc_dtype, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        acc = GramAccumulator(13, dtype=acc_dtype).update(features(10 + rank, 13, seed=rank))
        acc.all_reduce()
        results[rank] = (acc.finalize(), acc.count)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_all_reduce(tmp_path, acc_dtype):
    import torch.multiprocessing as mp

    world = 2
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_all_reduce_worker, args=(world, f"file://{tmp_path / 'store'}", acc_dtype, results),
                       nprocs=world, start_method="spawn")
    batches = [features(10 + r, 13, seed=r) for r in range(world)]
    ref = sum(reference.gram(x) for x in batches)
    for rank in range(world):
        g, count = results[rank]
        assert count == 21
        torch.testing.assert_close(g.double(), ref, rtol=1e-13 if acc_dtype == torch.float64 else 1e-6, atol=1e-6)


# ---- solves ---------------------------------------------------------------------------------------

def spd_accumulator(k=20, n=50, device="cpu", seed=0):
    x = features(n, k, torch.float64, device, seed=seed)
    return GramAccumulator(k, device=device).update(x), reference.gram(x)


@pytest.mark.parametrize("with_eigh", [False, True])
@pytest.mark.parametrize("damping", [0.0, 0.1, 10.0])
def test_solve_matches_linalg(device, with_eigh, damping):
    acc, g = spd_accumulator(device=device)
    if with_eigh:
        acc.eigh()
    rhs = features(4, 20, device=device, seed=3)
    x = acc.solve(rhs, damping)
    assert x.shape == rhs.shape and x.dtype == torch.float64
    torch.testing.assert_close(x.cpu(), reference.damped_solve(g, rhs, damping), rtol=1e-8, atol=1e-10)
    vector = acc.solve(rhs[0], damping)
    assert vector.shape == (20,)
    torch.testing.assert_close(vector, x[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_eigh", [False, True])
def test_damping_sweep_and_relative(with_eigh):
    acc, g = spd_accumulator(k=15, n=10)  # rank 10 < k: singular without damping
    if with_eigh:
        values, vectors = acc.eigh()
        torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, g, rtol=1e-10, atol=1e-9)
    rhs = features(3, 15, seed=4)
    sweep = [1e-3, 0.1, 1.0, 100.0]
    x = acc.solve(rhs, sweep)
    assert x.shape == (4, 3, 15)
    for i, lam in enumerate(sweep):
        torch.testing.assert_close(x[i], reference.damped_solve(g, rhs, lam), rtol=1e-7, atol=1e-9)
    mean_eig = float(torch.trace(g)) / 15
    torch.testing.assert_close(acc.solve(rhs, 0.01, relative=True), reference.damped_solve(g, rhs, 0.01 * mean_eig),
                               rtol=1e-8, atol=1e-10)
    inverse = acc.inverse(torch.tensor([0.5, 2.0]))
    assert inverse.shape == (2, 15, 15)
    eye = torch.eye(15, dtype=torch.float64)
    torch.testing.assert_close(inverse[1] @ (g + 2.0 * eye), eye, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="damping"):
        acc.solve(rhs, 0.0)


@pytest.mark.parametrize("n", [0, 1, 7, 14])
def test_feature_gram_solves_as_the_accumulator(n):
    """Fewer rows than columns: Woodbury through ΦΦᵀ equals the k×k solve, for one λ, a sweep and relative λ."""
    x = features(n, 15, torch.float32, seed=n)
    fg, g = FeatureGram(x), reference.gram(x.double())
    assert (fg.count, fg.k) == (n, 15)
    assert fg.trace() == pytest.approx(float(torch.trace(g)), rel=1e-12, abs=1e-12)
    rhs = features(3, 15, seed=5)
    for lam in (1e-3, 0.5, 100.0):
        torch.testing.assert_close(fg.solve(rhs, lam), reference.damped_solve(g, rhs, lam), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fg.solve(rhs[1], 0.5), reference.damped_solve(g, rhs, 0.5)[1], rtol=1e-7, atol=1e-9)
    sweep = fg.solve(rhs, [0.01, 1.0])
    assert sweep.shape == (2, 3, 15)
    torch.testing.assert_close(sweep[1], reference.damped_solve(g, rhs, 1.0), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fg.solve(rhs, 1.0), sweep[1], rtol=1e-9, atol=1e-11)  # after the cached eigh
    if n:
        relative = reference.damped_solve(g, rhs, 0.2 * float(torch.trace(g)) / 15)
        torch.testing.assert_close(fg.solve(rhs, 0.2, relative=True), relative, rtol=1e-7, atol=1e-9)


def test_feature_gram_errors():
    with pytest.raises(ValueError, match=r"features: expected fewer rows than columns"):
        FeatureGram(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="features: expected finite"):
        FeatureGram(torch.tensor([[0.0, float("nan"), 1.0]]))
    fg = FeatureGram(features(2, 5))
    with pytest.raises(ValueError, match=r"damping: G = ΦᵀΦ of 2 rows for k = 5 is singular"):
        fg.solve(features(1, 5), 0.0)
    with pytest.raises(ValueError, match="rhs: expected last dimension k == 5"):
        fg.solve(features(1, 4), 1.0)


def test_eigh_cache_is_dropped_by_update():
    acc, _ = spd_accumulator(k=6, n=10)
    first = acc.eigh()
    assert acc.eigh() is first
    acc.update(features(2, 6, torch.float64, seed=9))
    assert acc.eigh() is not first


# ---- errors ---------------------------------------------------------------------------------------

def test_errors():
    acc = GramAccumulator(5)
    with pytest.raises(ValueError, match=r"phi: expected shape \[b, k\] with k == 5"):
        acc.update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="phi: expected shape"):
        acc.update(torch.zeros(5))
    with pytest.raises(ValueError, match="phi: expected dtype"):
        acc.update(torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="phi"):
        acc.update([[0.0] * 5])
    bad = torch.zeros(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"phi: expected finite values, found nan at \[1, 2\]"):
        acc.update(bad)
    assert acc.count == 0
    with pytest.raises(ValueError, match="dtype"):
        GramAccumulator(5, dtype=torch.float16)
    with pytest.raises(ValueError, match="k"):
        GramAccumulator(-1)
    with pytest.raises(ValueError, match="rhs: expected last dimension k == 5"):
        acc.solve(torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="damping"):
        acc.solve(torch.zeros(5), -1.0)
    with pytest.raises(ValueError, match="damping"):
        acc.solve(torch.zeros(5), [])


def test_cuda_tensor_without_kernels_says_why():
    import attrprims

    if attrprims.cuda_available() or not torch.cuda.is_available():
        pytest.skip("needs a CUDA tensor on a machine whose attrprims CUDA kernels cannot run")
    with pytest.raises(RuntimeError, match="phi"):
        GramAccumulator(3, device="cuda").update(torch.zeros(2, 3, device="cuda"))


def test_cholesky_factors_are_reused_until_g_changes():
    acc, g = spd_accumulator(k=6, n=10)
    rhs = features(2, 6, torch.float64, seed=4)
    first = acc.solve(rhs, 0.5)
    assert list(acc._factors) == [0.5]
    torch.testing.assert_close(acc.solve(rhs, 0.5), first)
    assert acc.trace() == pytest.approx(float(torch.trace(g)))
    extra = features(3, 6, torch.float64, seed=5)
    acc.update(extra)
    assert acc._factors == {}
    torch.testing.assert_close(acc.solve(rhs, 0.5), reference.damped_solve(g + reference.gram(extra), rhs, 0.5),
                               rtol=1e-8, atol=1e-10)
