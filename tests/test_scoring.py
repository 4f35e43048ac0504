"""attrprims.scoring: dense scores and the fused top/bottom-k against the float64 reference, exact ties,
determinism over threads and blocks, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from attrprims import score
from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def inputs(m, n, k, dtype=torch.float32, device="cpu", seed=0, with_k=True, weights=True):
    g = torch.Generator().manual_seed(seed)
    phi_test = torch.randn(m, k, generator=g)
    phi_train = torch.randn(n, k, generator=g).to(dtype)
    K = torch.randn(k, k, generator=g, dtype=torch.float64) / max(k, 1) ** 0.5 if with_k else None
    w = torch.rand(n, generator=g) + 0.5 if weights else None
    move = (lambda t: t.to(device) if t is not None else None)
    return move(phi_test), move(K), move(phi_train), move(w)


def bound(phi_test, K, phi_train, w):
    """What fp32 rounding errors of a score are relative to: |φ_test K| |Φ_train|ᵀ |w|."""
    a = phi_test.cpu().double() if K is None else phi_test.cpu().double() @ K.cpu().double()
    b = a.abs() @ phi_train.cpu().double().abs().T
    return b * w.cpu().double().abs() if w is not None else b


def assert_ranked_close(r_values, r_indices, ref, scale, t, largest):
    """Returned (values, indices) are t distinct valid columns, sorted, whose values match the reference, and
    no column left out beats the last one kept by more than rounding."""
    m, n = ref.shape
    assert r_values.shape == (m, t) and r_indices.shape == (m, t)
    assert r_values.dtype == torch.float32 and r_indices.dtype == torch.int64
    values, indices = r_values.cpu().double(), r_indices.cpu()
    assert ((indices >= 0) & (indices < n)).all()
    for row in indices:
        assert len(set(row.tolist())) == t
    tol = 3 * TOL[torch.float32] * scale.gather(1, indices) + 1e-30
    assert ((values - ref.gather(1, indices)).abs() <= tol).all()
    sign = 1 if largest else -1
    assert (sign * (values[:, :-1] - values[:, 1:]) >= 0).all()
    if t and t < n:
        left_out = torch.ones_like(ref, dtype=torch.bool).scatter(1, indices, False)
        worst_kept = (sign * ref.gather(1, indices)).min(1).values
        best_left = torch.where(left_out, sign * ref, torch.full_like(ref, -torch.inf)).max(1).values
        slack = 6 * TOL[torch.float32] * scale.max(1).values + 1e-30
        assert (best_left <= worst_kept + slack).all()


@pytest.mark.parametrize("m", [0, 1, 7, 65])
@pytest.mark.parametrize("n", [1, 2, 31, 257, 1000])
def test_dense_and_ranked_shapes(device, m, n):
    phi_test, K, phi_train, w = inputs(m, n, 33, device=device, seed=m * 1000 + n)
    ref, scale = reference.scores(phi_test, K, phi_train, w), bound(phi_test, K, phi_train, w)
    dense = score(phi_test, K, phi_train, train_weights=w)
    assert dense.shape == (m, n) and dense.device == phi_test.device
    assert ((dense.cpu().double() - ref).abs() <= 3 * TOL[torch.float32] * scale + 1e-30).all()
    t = min(n, 5)
    r = score(phi_test, K, phi_train, train_weights=w, topk=t, bottomk=min(n, 3), block=97)
    assert_ranked_close(r.top_values, r.top_indices, ref, scale, t, True)
    assert_ranked_close(r.bottom_values, r.bottom_indices, ref, scale, min(n, 3), False)


@pytest.mark.parametrize("k", [0, 1, 2, 17, 129])
@pytest.mark.parametrize("dtype", DTYPES)
def test_features_and_dtypes(device, k, dtype):
    phi_test, K, phi_train, w = inputs(9, 300, k, dtype, device, seed=k)
    ref, scale = reference.scores(phi_test, K, phi_train, w), bound(phi_test, K, phi_train, w)
    r = score(phi_test, K, phi_train, train_weights=w, topk=12, bottomk=4)
    assert_ranked_close(r.top_values, r.top_indices, ref, scale, 12, True)
    assert_ranked_close(r.bottom_values, r.bottom_indices, ref, scale, 4, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_build(cpu_isa, dtype):
    """Each instruction set's kernels (generic and AVX2 builds; AVX-512 machines run the AVX2 one)."""
    phi_test, K, phi_train, w = inputs(11, 301, 37, dtype, seed=11)
    ref, scale = reference.scores(phi_test, K, phi_train, w), bound(phi_test, K, phi_train, w)
    r = score(phi_test, K, phi_train, train_weights=w, topk=9, bottomk=3, block=97)
    assert_ranked_close(r.top_values, r.top_indices, ref, scale, 9, True)
    assert_ranked_close(r.bottom_values, r.bottom_indices, ref, scale, 3, False)


def test_exact_ties_go_to_the_smaller_index(device):
    """Integer features make every score exact, with many ties: the result must equal the reference exactly."""
    g = torch.Generator().manual_seed(1)
    phi_test = torch.randint(-2, 3, (6, 5), generator=g).float().to(device)
    phi_train = torch.randint(-1, 2, (700, 5), generator=g).float().to(device)
    ref = reference.scores(phi_test, None, phi_train)
    r = score(phi_test, None, phi_train, topk=40, bottomk=40, block=64)
    for values, indices, largest in [(r.top_values, r.top_indices, True), (r.bottom_values, r.bottom_indices, False)]:
        ref_values, ref_indices = reference.ranked(ref, 40, largest)
        assert torch.equal(indices.cpu(), ref_indices)
        assert torch.equal(values.cpu().double(), ref_values)


def test_only_one_side_and_zero():
    phi_test, K, phi_train, w = inputs(3, 50, 8)
    r = score(phi_test, K, phi_train, topk=4)
    assert r.bottom_values is None and r.bottom_indices is None and r.top_values.shape == (3, 4)
    r = score(phi_test, K, phi_train, bottomk=0)
    assert r.top_values is None and r.bottom_values.shape == (3, 0)
    r = score(phi_test, K, phi_train, topk=50)  # the whole row, sorted
    torch.testing.assert_close(r.top_values.double(), reference.scores(phi_test, K, phi_train).sort(1, descending=True).values,
                               rtol=1e-5, atol=1e-5)


@given(block=st.integers(1, 400), threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_block_and_threads_do_not_change_bits(block, threads, seed):
    phi_test, K, phi_train, w = inputs(13, 400, 19, seed=seed)
    whole = score(phi_test, K, phi_train, train_weights=w, topk=7, bottomk=7)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        parts = score(phi_test, K, phi_train, train_weights=w, topk=7, bottomk=7, block=block)
    finally:
        torch.set_num_threads(previous)
    for x, y in zip(whole, parts):
        assert torch.equal(x, y)


def test_strided_and_memmap_like_inputs(tmp_path):
    import numpy as np

    phi_test, K, phi_train, w = inputs(5, 200, 12, seed=3)
    path = tmp_path / "train.npy"
    np.save(path, phi_train.numpy())
    mapped = torch.from_numpy(np.load(path, mmap_mode="r+"))
    big = torch.randn(20, 40)
    strided = big[::4, 3:15]
    ref_r = score(strided, K, phi_train, topk=6)
    r = score(strided.contiguous(), K, mapped, topk=6, block=33)
    assert torch.equal(ref_r.top_indices, r.top_indices)


def test_errors():
    phi_test, K, phi_train, w = inputs(3, 20, 8)
    with pytest.raises(ValueError, match=r"phi_train: expected shape \[n, k\] with k == 8"):
        score(phi_test, K, phi_train[:, :7])
    with pytest.raises(ValueError, match=r"K: expected shape \[k, k\] with k == 8"):
        score(phi_test, K[:7, :7], phi_train)
    with pytest.raises(ValueError, match=r"train_weights: expected shape \[n\] with n == 20"):
        score(phi_test, K, phi_train, train_weights=w[:19])
    with pytest.raises(ValueError, match="topk: expected an integer in \\[0, 20\\]"):
        score(phi_test, K, phi_train, topk=21)
    with pytest.raises(ValueError, match="bottomk"):
        score(phi_test, K, phi_train, bottomk=-1)
    with pytest.raises(ValueError, match="phi_test: expected dtype"):
        score(phi_test.long(), K, phi_train)
    bad = phi_train.clone()
    bad[4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"phi_train: expected finite values, found inf at \[4, 2\]"):
        score(phi_test, K, bad, topk=3)
    with pytest.raises(ValueError, match="block"):
        score(phi_test, K, phi_train, block=0)
