"""attrprims.ensemble: streaming means and sums against the float64 stack reference, TracIn weights, TRAK's
combination, the ensemble-as-concatenated-features identity, one member alive at a time, errors."""

import gc
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from attrprims import score
from attrprims.ensemble import EnsembleAccumulator, combine, tracin_weights, trak_combine

WEIGHTS = [0.5, 1.0, 2.0, 0.1, 3.0]


def members(count=4, shape=(3, 5), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(count)]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 0), (1, 2, 3), ()])
def test_matches_reference(device, reduce, shape):
    xs = members(5, shape, device=device)
    got = combine(xs, WEIGHTS, reduce=reduce)
    assert got.dtype == torch.float64 and got.shape == shape and got.device == device
    torch.testing.assert_close(got.cpu(), reference.combine(xs, WEIGHTS, reduce), rtol=1e-12, atol=1e-12)
    unweighted = combine(iter(xs), reduce=reduce)
    torch.testing.assert_close(unweighted.cpu(), reference.combine(xs, reduce=reduce), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_member_dtypes_and_weight_forms(dtype):
    xs = members(5, (4, 3), seed=1, dtype=dtype)
    expected = reference.combine(xs, WEIGHTS)
    for weights in (WEIGHTS, torch.tensor(WEIGHTS, dtype=torch.float64), tuple(w for w in WEIGHTS)):
        torch.testing.assert_close(combine(xs, weights), expected, rtol=1e-12, atol=1e-12)
    acc = EnsembleAccumulator(dtype=torch.float32)
    for x, w in zip(xs, WEIGHTS):
        acc.add(x, torch.tensor(w))
    assert acc.count == 5 and acc.total_weight == pytest.approx(sum(WEIGHTS))
    out = acc.result()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@given(count=st.integers(1, 6), reduce=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**31 - 1))
def test_sum_is_linear_and_order_only_rounds(count, reduce, seed):
    xs = members(count, (4,), seed=seed)
    w = torch.rand(count, generator=torch.Generator().manual_seed(seed)).add(0.1).tolist()
    forward, backward = combine(xs, w, reduce=reduce), combine(xs[::-1], w[::-1], reduce=reduce)
    torch.testing.assert_close(forward, backward, rtol=1e-14, atol=1e-14)
    assert torch.equal(forward, combine(xs, w, reduce=reduce))  # same order: bitwise the same
    scaled = combine(xs, [2 * v for v in w], reduce=reduce)
    torch.testing.assert_close(scaled, forward * (1 if reduce == "mean" else 2), rtol=1e-14, atol=1e-14)


def test_result_is_a_snapshot():
    acc = EnsembleAccumulator("sum").add(torch.ones(3))
    first = acc.result()
    acc.add(torch.ones(3))
    assert first.tolist() == [1.0, 1.0, 1.0] and acc.result().tolist() == [2.0, 2.0, 2.0]
    member = torch.ones(2, dtype=torch.float64)
    EnsembleAccumulator().add(member, 3.0).add(member)
    assert member.tolist() == [1.0, 1.0]  # the total never aliases a member


def alive_while_producing(kind):
    """Feeds combine 5 members from a generator (tensors, or callables) and returns, for each member, how many
    earlier members were still referenced when it was produced."""
    refs, counts = [], []

    def produce(i):
        x = torch.full((4,), float(i))
        refs.append(weakref.ref(x))
        return x

    def generator():
        for i in range(5):
            gc.collect()
            counts.append(sum(r() is not None for r in refs))
            yield produce(i) if kind == "tensors" else (lambda i=i: produce(i))

    torch.testing.assert_close(combine(generator()), torch.full((4,), 2.0, dtype=torch.float64))
    return counts


@pytest.mark.parametrize("kind", ["tensors", "callables"])
def test_one_member_alive_at_a_time(kind):
    assert alive_while_producing(kind) == [0] * 5


def test_tracin_weights():
    assert tracin_weights([0.1, 0.05, 0.01]) == [0.1, 0.05, 0.01]
    assert tracin_weights(torch.tensor([0.5, 0.25])) == [0.5, 0.25]
    xs = members(3)
    torch.testing.assert_close(combine(xs, tracin_weights([0.1, 0.05, 0.01]), reduce="sum"),
                               reference.combine(xs, [0.1, 0.05, 0.01], "sum"))
    with pytest.raises(ValueError, match="learning_rates: expected one finite rate > 0 per checkpoint, got none"):
        tracin_weights([])
    for bad, where in (([0.1, 0.0], r"0.0 at \[1\]"), ([float("nan")], r"nan at \[0\]"), ([1, -1.0], r"-1.0 at \[1\]")):
        with pytest.raises(ValueError, match=f"learning_rates: expected finite rates > 0, got {where}"):
            tracin_weights(bad)


def test_trak_combine(device):
    scores, q = members(3, (4, 6), seed=1, device=device), members(3, (6,), seed=2, device=device)
    got = trak_combine(iter(scores), (lambda x=x: x for x in q))
    assert got.shape == (4, 6) and got.dtype == torch.float64 and got.device == device
    torch.testing.assert_close(got.cpu(), reference.trak_combine(scores, q), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"out_to_loss_per_model: expected members of shape \[n_train\] with "
                                         r"n_train == 6 \(from scores_per_model\), got \[5\]"):
        trak_combine(scores, members(3, (5,)))
    with pytest.raises(ValueError, match=r"scores_per_model: expected members of shape \[m_test, n_train\], got \[6\]"):
        trak_combine(q, q)


def test_ensemble_mean_is_one_pass_over_concatenated_features():
    g = torch.Generator().manual_seed(3)
    m, n, k, models = 5, 40, 8, 3
    phi_test = [torch.randn(m, k, generator=g) for _ in range(models)]
    phi_train = [torch.randn(n, k, generator=g) for _ in range(models)]
    kernels = [torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 for _ in range(models)]
    per_model = (lambda i=i: reference.scores(phi_test[i], kernels[i], phi_train[i]) for i in range(models))
    fused = score(torch.cat([(phi_test[i].double() @ kernels[i] / models).float() for i in range(models)], 1), None,
                  torch.cat(phi_train, 1))
    torch.testing.assert_close(fused.double(), combine(per_model), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="reduce: expected one of"):
        EnsembleAccumulator("max")
    with pytest.raises(ValueError, match="dtype: expected a floating torch dtype, got torch.int64"):
        EnsembleAccumulator(dtype=torch.int64)
    acc = EnsembleAccumulator()
    with pytest.raises(ValueError, match="members: expected at least one member, got none"):
        acc.result()
    with pytest.raises(ValueError, match="members: expected at least one member"):
        combine(iter([]))
    acc.add(torch.zeros(3))
    with pytest.raises(ValueError, match=r"member 1: expected shape \[3\], dtype float32 on cpu \(those of member 0\), "
                                         r"got \[4\], dtype float32 on cpu"):
        acc.add(torch.zeros(4))
    with pytest.raises(ValueError, match=r"member 1: expected shape \[3\], dtype float32 .* got \[3\], dtype float64"):
        acc.add(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"member 1: .* got \[3\], dtype float32 on meta"):
        acc.add(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="member 1: expected a floating-point tensor, got dtype int64"):
        acc.add(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="member 1: expected a torch.Tensor, got list"):
        acc.add([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"member 1: expected finite values, found nan at \[1\]"):
        acc.add(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="weight: expected > 0 for a mean \\(member 1\\), got 0.0"):
        acc.add(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="weight: expected a finite number for member 1, got inf"):
        acc.add(torch.zeros(3), float("inf"))
    with pytest.raises(ValueError, match="weight: expected a finite number for member 1, got True"):
        acc.add(torch.zeros(3), True)
    assert acc.count == 1  # failed adds change nothing
    assert EnsembleAccumulator("sum").add(torch.ones(2), -2.0).result().tolist() == [-2.0, -2.0]
    with pytest.raises(ValueError, match="weights: expected one weight per member, got 2 for more members"):
        combine(members(3), [1.0, 2.0])
    with pytest.raises(ValueError, match="weights: expected one weight per member, got 3 for 2 members"):
        combine(members(2), [1.0, 2.0, 3.0])
