"""attrprims.ensemble: streaming means and sums against torch.stack references, TracIn weights, TRAK's
combination, one member alive at a time, errors."""

import gc
import weakref

import pytest
import torch

from attrprims.ensemble import EnsembleAccumulator, combine, tracin_weights, trak_combine


def members(count=4, shape=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 0), (1, 2, 3)])
def test_matches_stack(reduce, shape):
    xs = members(5, shape)
    w = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=torch.float64)
    stacked = torch.stack([x.double() for x in xs]) * w.reshape(-1, *[1] * len(shape))
    expected = stacked.sum(0) / (w.sum() if reduce == "mean" else 1)
    got = combine(xs, w.tolist(), reduce=reduce)
    assert got.dtype == torch.float64 and got.shape == shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    unweighted = combine(iter(xs), reduce=reduce)
    torch.testing.assert_close(unweighted, torch.stack(xs).double().sum(0) / (5 if reduce == "mean" else 1))


def test_accumulator_state_and_dtype():
    acc = EnsembleAccumulator(dtype=torch.float32)
    for x in members(3):
        acc.add(x, 2.0)
    assert acc.count == 3 and acc.total_weight == 6.0
    out = acc.result()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack(members(3)).mean(0))


def test_callables_keep_one_member_alive():
    alive = []

    def make(i):
        def produce():
            x = torch.full((4,), float(i))
            alive.append(weakref.ref(x))
            return x
        return produce

    seen_alive = []

    def producers():
        for i in range(5):
            gc.collect()
            seen_alive.append(sum(r() is not None for r in alive))
            yield make(i)

    out = combine(producers())
    torch.testing.assert_close(out, torch.full((4,), 2.0, dtype=torch.float64))
    assert max(seen_alive) == 0  # each member was released before the next was produced


def test_tracin_weights_and_trak_combine():
    assert tracin_weights([0.1, 0.05, 0.01]) == [0.1, 0.05, 0.01]
    for bad in ([], [0.1, 0.0], [float("nan")], [-1.0]):
        with pytest.raises(ValueError, match="learning_rates"):
            tracin_weights(bad)
    scores, q = members(3, (4, 6), seed=1), members(3, (6,), seed=2)
    expected = torch.stack(scores).double().mean(0) * torch.stack(q).double().mean(0)[None, :]
    torch.testing.assert_close(trak_combine(iter(scores), iter(q)), expected)
    with pytest.raises(ValueError, match="out_to_loss_per_model"):
        trak_combine(scores, members(3, (5,)))


def test_errors():
    with pytest.raises(ValueError, match="reduce"):
        EnsembleAccumulator("max")
    with pytest.raises(ValueError, match="dtype"):
        EnsembleAccumulator(dtype=torch.int64)
    acc = EnsembleAccumulator()
    with pytest.raises(ValueError, match="members: expected at least one"):
        acc.result()
    acc.add(torch.zeros(3))
    with pytest.raises(ValueError, match=r"member 1: expected shape \[3\]"):
        acc.add(torch.zeros(4))
    with pytest.raises(ValueError, match="member 1: expected a floating-point"):
        acc.add(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"member 1: expected finite values, found nan at \[1\]"):
        acc.add(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="weight: expected > 0"):
        acc.add(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="weight: expected a finite"):
        acc.add(torch.zeros(3), float("inf"))
    with pytest.raises(ValueError, match="weights: expected one weight per member"):
        combine(members(3), [1.0, 2.0])
    with pytest.raises(ValueError, match="weights: expected one weight per member"):
        combine(members(2), [1.0, 2.0, 3.0])
