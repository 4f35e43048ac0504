"""lds: per-target Spearman against the counting reference, known values, ties, undefined targets, the bootstrap."""

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from attrprims.metrics import LDSResult, lds
from attrprims.metrics.lds import _rank_average

lds_module = importlib.import_module("attrprims.metrics.lds")  # attrprims.metrics.lds is the function


def _random_case(s, m, n, seed, device, dtype=torch.float64, levels=None):
    """Masks [s, n], scores [m, n], outputs [s, m]; with `levels`, integer values in [0, levels) (many ties)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(s, n, generator=g) < 0.5
    if levels is None:
        scores, outputs = torch.randn(m, n, generator=g), torch.randn(s, m, generator=g)
    else:
        scores = torch.randint(levels, (m, n), generator=g).double()
        outputs = torch.randint(levels, (s, m), generator=g).double()
    return scores.to(device, dtype), masks.to(device), outputs.to(device, dtype)


def _assert_same(actual, expected):
    """Equal to float64 rounding, NaN in the same places."""
    actual = actual.cpu()
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    torch.testing.assert_close(actual.nan_to_num(), expected.nan_to_num(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("s, m, n", [(2, 1, 1), (3, 4, 5), (7, 0, 3), (33, 5, 9), (31, 3, 0), (127, 2, 31)])
@pytest.mark.parametrize("levels", [None, 3])
def test_per_target_matches_reference(device, s, m, n, levels):
    scores, masks, outputs = _random_case(s, m, n, seed=s * 100 + m, device=device, levels=levels)
    result = lds(scores, masks, outputs)
    _assert_same(result.per_target, reference.lds(scores, masks, outputs))
    assert result.per_target.device == scores.device
    defined = result.per_target[~torch.isnan(result.per_target)].cpu()
    assert result.n_excluded == m - defined.numel()
    if defined.numel():
        assert result.mean == pytest.approx(defined.mean().item(), abs=1e-15)
    else:
        assert math.isnan(result.mean) and all(math.isnan(v) for v in result.interval)


def test_hand_computed_case():
    # 3 training examples, 4 subsets, 3 targets.
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    outputs = torch.tensor([[0.1, 5.0, 2.0], [0.9, 7.0, 2.0], [0.2, 7.0, 2.0], [0.3, 0.0, 2.0]], dtype=torch.float64)
    # Target 0: predictions 3, 6, 5, 1 -> ranks 2, 4, 3, 1; outputs 0.1, 0.9, 0.2, 0.3 -> ranks 1, 4, 2, 3.
    #   No ties: rho = 1 - 6 Σd² / (s(s² - 1)) with d = 1, 0, 1, -2: 1 - 6·6/60 = 0.4.
    # Target 1: predictions 2, 2, 2, 1 -> ranks 3, 3, 3, 1 (positions 2..4 share 3); outputs 5, 7, 7, 0 -> ranks
    #   2, 3.5, 3.5, 1. Centred at 2.5: a = (.5, .5, .5, -1.5), b = (-.5, 1, 1, -1.5); a·b = 3, |a|² = 3,
    #   |b|² = 4.5, rho = 3 / sqrt(13.5) = sqrt(2/3).
    # Target 2: outputs constant -> undefined, excluded.
    result = lds(scores, masks, outputs)
    assert result.per_target[0].item() == pytest.approx(0.4, abs=1e-15)
    assert result.per_target[1].item() == pytest.approx(math.sqrt(2 / 3), abs=1e-15)
    assert math.isnan(result.per_target[2].item())
    assert result.n_excluded == 1
    assert result.mean == pytest.approx((0.4 + math.sqrt(2 / 3)) / 2, abs=1e-15)
    assert isinstance(result, LDSResult)


@pytest.mark.parametrize("transform", [lambda y: y, torch.exp, lambda y: y**3 - 5, lambda y: torch.tanh(y / 10)])
def test_perfect_linear_datamodel_scores_one(device, transform):
    g = torch.Generator().manual_seed(1)
    s, m, n = 60, 8, 40
    masks = torch.rand(s, n, generator=g) < 0.5
    w, b = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    outputs = transform(masks.double() @ w.T + b)
    result = lds(w.to(device), masks.to(device), outputs.to(device))
    torch.testing.assert_close(result.per_target.cpu(), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(1, abs=1e-12) and result.n_excluded == 0
    assert result.interval == pytest.approx((1, 1), abs=1e-12)
    assert lds(-w, masks, outputs).mean == pytest.approx(-1, abs=1e-12)


def test_random_scores_score_near_zero():
    g = torch.Generator().manual_seed(2)
    s, m, n = 400, 300, 400
    masks = torch.rand(s, n, generator=g) < 0.5
    outputs = masks.double() @ torch.randn(n, m, generator=g, dtype=torch.float64)
    result = lds(torch.randn(m, n, generator=g), masks, outputs.float())
    # Two random linear functions of the masks: each target's rho has sd ≈ sqrt(1/s + 1/n) ≈ 0.07, independent
    # across targets given the masks, so the mean has sd ≈ 0.004.
    assert abs(result.mean) < 0.015
    assert result.interval[0] < 0 < result.interval[1]
    assert result.per_target.abs().max() < 0.25


@given(st.integers(2, 12), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**32 - 1), st.sampled_from([2, 4]))
def test_matches_scipy_spearmanr(s, m, n, seed, levels):
    stats = pytest.importorskip("scipy.stats")
    scores, masks, outputs = _random_case(s, m, n, seed, "cpu", levels=levels)
    result = lds(scores, masks, outputs)
    predictions = masks.double() @ scores.T
    for t in range(m):
        if len(set(predictions[:, t].tolist())) == 1 or len(set(outputs[:, t].tolist())) == 1:
            assert math.isnan(result.per_target[t].item())  # scipy warns and returns NaN here
        else:
            expected = stats.spearmanr(predictions[:, t].numpy(), outputs[:, t].numpy()).statistic
            assert result.per_target[t].item() == pytest.approx(expected, abs=1e-12)


@given(st.integers(1, 40), st.integers(1, 5), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_rank_average_matches_counting_and_scipy(s, m, levels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(levels + 1, (s, m), generator=g).float() if levels else torch.randn(s, m, generator=g)
    ranks = _rank_average(x)
    expected = torch.tensor([reference.average_ranks(x[:, t].tolist()) for t in range(m)], dtype=torch.float64).T
    assert torch.equal(ranks, expected)
    stats = pytest.importorskip("scipy.stats")
    assert torch.equal(ranks, torch.from_numpy(stats.rankdata(x.numpy(), axis=0)))


@given(st.integers(3, 20), st.integers(0, 2**32 - 1))
def test_invariances(s, seed):
    """Monotone maps of outputs, positive scaling of scores and the order of the subsets change nothing."""
    scores, masks, outputs = _random_case(s, 3, 6, seed, "cpu", levels=3)
    base = lds(scores, masks, outputs).per_target
    _assert_same(lds(scores, masks, torch.exp(outputs) * 3 - 1).per_target, base)
    _assert_same(lds(scores * 4, masks, outputs).per_target, base)
    _assert_same(lds(-scores, masks, outputs).per_target, -base)
    order = torch.randperm(s, generator=torch.Generator().manual_seed(seed))
    _assert_same(lds(scores, masks[order], outputs[order]).per_target, base)


def test_constant_targets_are_nan_and_excluded(device):
    scores, masks, outputs = _random_case(30, 6, 10, seed=3, device=device)
    outputs[:, 1] = 2.5  # constant outputs
    scores[4] = 0  # constant predictions
    result = lds(scores, masks, outputs)
    nan = torch.isnan(result.per_target.cpu())
    assert nan.tolist() == [False, True, False, False, True, False]
    assert result.n_excluded == 2
    assert result.mean == pytest.approx(result.per_target.cpu()[~nan].mean().item(), abs=1e-15)
    assert all(math.isfinite(v) for v in result.interval)

    none = lds(scores, masks, torch.ones_like(outputs))
    assert none.n_excluded == 6 and math.isnan(none.mean) and all(math.isnan(v) for v in none.interval)
    empty = lds(scores[:0], masks, outputs[:, :0])
    assert empty.per_target.shape == (0,) and empty.n_excluded == 0 and math.isnan(empty.mean)


def _interval_case(m, seed=4):
    g = torch.Generator().manual_seed(seed)
    s, n = 20, 15
    masks = torch.rand(s, n, generator=g) < 0.5
    return torch.randn(m, n, generator=g), masks, masks.double() @ torch.randn(n, m, generator=g, dtype=torch.float64)


def test_bootstrap_interval_contains_mean_and_shrinks_with_targets():
    widths = []
    for m in (25, 400):
        result = lds(*_interval_case(m))
        low, high = result.interval
        assert low < result.mean < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about sqrt(400 / 25) = 4 times narrower
    narrow = lds(*_interval_case(25), confidence=0.5).interval
    wide = lds(*_interval_case(25), confidence=0.99).interval
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_is_seeded_and_block_invariant(monkeypatch):
    case = _interval_case(50)
    first = lds(*case, seed=7)
    assert lds(*case, seed=7).interval == first.interval
    assert lds(*case, seed=8).interval != first.interval
    assert lds(*case, seed=7, bootstrap=1).interval[0] == lds(*case, seed=7, bootstrap=1).interval[1]
    # Resampling and the predictions run in blocks bounded in memory; the block size changes nothing.
    monkeypatch.setattr(lds_module, "_BLOCK_ELEMENTS", 97)
    blocked = lds(*case, seed=7)
    assert blocked.interval == first.interval
    _assert_same(blocked.per_target, first.per_target.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    scores, masks, outputs = _random_case(9, 3, 7, seed=5, device="cpu", dtype=dtype)
    result = lds(scores, masks, outputs)
    _assert_same(result.per_target, reference.lds(scores.double(), masks, outputs.double()))


def test_cuda_matches_cpu(device):
    scores, masks, outputs = _random_case(50, 20, 30, seed=6, device="cpu")
    on_device, on_cpu = lds(scores.to(device), masks.to(device), outputs.to(device)), lds(scores, masks, outputs)
    _assert_same(on_device.per_target, on_cpu.per_target)
    assert on_device.interval == pytest.approx(on_cpu.interval, abs=1e-12)


def _good():
    return _random_case(5, 3, 4, seed=0, device="cpu")


@pytest.mark.parametrize("change, error, match", [
    (lambda s, k, o: (s[0], k, o), ValueError, r"scores: expected shape \[m, n\]"),
    (lambda s, k, o: (s.long(), k, o), ValueError, "scores: expected dtype"),
    (lambda s, k, o: ([[1.0]], k, o), TypeError, "scores: expected a torch.Tensor"),
    (lambda s, k, o: (s, k.float(), o), ValueError, "subset_masks: expected dtype bool"),
    (lambda s, k, o: (s, k[:, :3], o), ValueError, r"subset_masks: expected shape \[s, n\] with n == 4"),
    (lambda s, k, o: (s, k[:1], o[:1]), ValueError, "subset_masks: expected at least 2 subsets"),
    (lambda s, k, o: (s, k, o[:4]), ValueError, r"subset_outputs: expected shape \[s, m\] == \[5, 3\]"),
    (lambda s, k, o: (s, k, o.T), ValueError, "subset_outputs: expected shape"),
    (lambda s, k, o: (s, k, o.int()), ValueError, "subset_outputs: expected dtype"),
    (lambda s, k, o: (s.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(math.nan, dtype=s.dtype)), k, o),
     ValueError, r"scores: expected finite values, found nan at \[1, 2\]"),
    (lambda s, k, o: (s, k, o.index_fill(0, torch.tensor(0), math.inf)), ValueError,
     "subset_outputs: expected finite values, found inf"),
    (lambda s, k, o: (s, k.to("meta"), o), ValueError, "subset_masks: expected device cpu"),
])
def test_errors_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        lds(*change(*_good()))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"bootstrap": 0}, ValueError, "bootstrap: expected an integer >= 1, got 0"),
    ({"bootstrap": 1.5}, TypeError, "bootstrap: expected an integer"),
    ({"seed": -1}, ValueError, "seed: expected an integer in"),
    ({"confidence": 1.0}, ValueError, r"confidence: expected a number in \(0, 1\), got 1.0"),
    ({"confidence": 0}, ValueError, "confidence"),
    ({"confidence": "0.9"}, ValueError, "confidence"),
])
def test_option_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        lds(*_good(), **kwargs)
