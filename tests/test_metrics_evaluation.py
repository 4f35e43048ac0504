"""LOO correlation, noisy-label AUC and remove-and-retrain on constructed cases with known answers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attrprims.metrics import detection_curve, loo, noisy_label_auc, remove_and_retrain


# ---- loo -----------------------------------------------------------------------------------------------------

def test_loo_of_the_true_effects_is_one_and_of_their_negation_minus_one():
    g = torch.Generator().manual_seed(0)
    full, loo_out = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    effects = (full - loo_out).T  # [m, s]: what removing each point did to each target
    exact = loo(effects, loo_out, full)
    assert exact.pearson == pytest.approx(1) and exact.spearman == pytest.approx(1) and exact.n_excluded == 0
    reversed_ = loo(-effects, loo_out, full)
    assert reversed_.pearson == pytest.approx(-1) and reversed_.spearman == pytest.approx(-1)
    monotone = loo(effects ** 3, loo_out, full)  # same ranks, other values: Spearman 1, Pearson below
    assert monotone.spearman == pytest.approx(1) and monotone.pearson < 1


def test_loo_hand_computed_and_constant_rows_excluded():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    full = torch.tensor([1.0, 0.0])
    loo_out = torch.tensor([[1.0, 1.0], [0.0, 2.0], [-2.0, 3.0]])  # effects for target 0: 0, 1, 3
    result = loo(scores, loo_out, full)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 3.0])
    x, y = x - x.mean(), y - y.mean()
    assert result.pearson == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())))
    assert result.spearman == pytest.approx(1)
    assert result.n_excluded == 1 and math.isnan(float(result.per_target_pearson[1]))


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2)), r"loo_outputs: expected shape \[s, m\] == \[3, 2\]"),
    ((torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(3)), r"full_outputs: expected shape \[m\] with m == 2"),
    ((torch.zeros(2, 1), torch.zeros(1, 2), torch.zeros(2)), "at least 2 left-out points"),
    ((torch.full((2, 3), float("nan")), torch.zeros(3, 2), torch.zeros(2)), "scores"),
])
def test_loo_errors_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        loo(*args)


# ---- noisy-label AUC ----------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(0, 4), min_size=2, max_size=30), data=st.data())
def test_auc_equals_the_pairwise_count_with_ties(values, data):
    flags = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    if all(flags) or not any(flags):
        flags[0] = not flags[0]
    scores, flipped = torch.tensor(values, dtype=torch.float64), torch.tensor(flags)
    pos = [v for v, f in zip(values, flags) if f]
    neg = [v for v, f in zip(values, flags) if not f]
    expected = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert noisy_label_auc(scores, flipped) == pytest.approx(expected, abs=1e-12)


def test_auc_extremes_curve_and_errors():
    scores, flipped = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([True, True, False, False])
    assert noisy_label_auc(scores, flipped) == 1.0 and noisy_label_auc(-scores, flipped) == 0.0
    inspected, found = detection_curve(scores, flipped)
    torch.testing.assert_close(inspected, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    torch.testing.assert_close(found, torch.tensor([0, 0.5, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="is_flipped: expected both flipped and clean"):
        noisy_label_auc(scores, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_flipped: expected dtype"):
        noisy_label_auc(scores, torch.zeros(4))
    with pytest.raises(ValueError, match=r"is_flipped: expected shape \[n\] == \[4\]"):
        noisy_label_auc(scores, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="self_scores"):
        noisy_label_auc(torch.tensor([1.0, float("nan"), 0, 0]), flipped)


# ---- remove and retrain -------------------------------------------------------------------------------------

class SumModel:
    """A "training run" whose model is the sum of the kept points' values: removing valuable points hurts."""

    def __init__(self, values):
        self.values, self.calls = values, []

    def train(self, kept, seed):
        self.calls.append((tuple(kept.tolist()), seed))
        return float(self.values[kept].sum())


def test_removing_the_top_scored_points_hurts_more_than_random():
    values = torch.arange(20, dtype=torch.float64)  # point i is worth i
    model = SumModel(values)
    result = remove_and_retrain(values, model.train, lambda m: m, fractions=(0.1, 0.25), seed=3, random_repeats=4,
                                progress=False)
    assert result.removed == (2, 5) and result.baseline == 190.0
    torch.testing.assert_close(result.attributed, torch.tensor([190.0 - 19 - 18, 190.0 - 19 - 18 - 17 - 16 - 15],
                                                               dtype=torch.float64))
    assert (result.attributed < result.random_mean).all()
    assert len(model.calls) == 1 + 2 * (1 + 4)  # the baseline once, then one model per removal
    assert {seed for _, seed in model.calls} == {3}
    again = remove_and_retrain(values, SumModel(values).train, lambda m: m, fractions=(0.1, 0.25), seed=3,
                               random_repeats=4, progress=False)
    assert torch.equal(again.random_mean, result.random_mean)


def test_removal_ties_go_by_index_and_errors_name_the_argument():
    model = SumModel(torch.arange(4, dtype=torch.float64))
    result = remove_and_retrain(torch.ones(4), model.train, lambda m: m, fractions=(0.5,), random_repeats=1,
                                progress=False)
    assert model.calls[1][0] == (2, 3)  # equal scores: points 0 and 1 are "top"
    assert result.random_std[0] == 0
    for bad in [(0.0,), (1.0,), ()]:
        with pytest.raises(ValueError, match="fractions"):
            remove_and_retrain(torch.ones(4), model.train, lambda m: m, fractions=bad, progress=False)
    with pytest.raises(ValueError, match="random_repeats"):
        remove_and_retrain(torch.ones(4), model.train, lambda m: m, random_repeats=0, progress=False)
    with pytest.raises(ValueError, match="eval_fn"):
        remove_and_retrain(torch.ones(4), model.train, lambda m: float("nan"), progress=False)
