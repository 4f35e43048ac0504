"""Leave-one-out correlation: do attribution scores predict the actual effect of removing each training point?

For a set of training points j (each left out of one retrained model) and targets t, the actual effect of point j
on target t is full_outputs[t] − loo_outputs[j, t]: positive when the model trained without j does worse on t, i.e.
j helped (the sign convention of every method in attrprims.methods). Per target, the Pearson and the Spearman
correlation between scores[t, j] and those effects over the left-out points; the figures are the means over the
targets with a defined correlation (a target whose scores or effects are constant over the points is NaN, left out
and counted in n_excluded, as in `lds`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_finite, check_like, check_matrix, check_tensor
from .lds import _FLOATS, _spearman_columns


class LOOResult(NamedTuple):
    """What `loo` returns: mean correlations over targets and the per-target values (NaN where undefined)."""

    pearson: float
    spearman: float
    per_target_pearson: torch.Tensor
    per_target_spearman: torch.Tensor
    n_excluded: int


def loo(scores: torch.Tensor, loo_outputs: torch.Tensor, full_outputs: torch.Tensor) -> LOOResult:
    """Correlation between attributions and leave-one-out effects, per target, averaged over targets.

    Args:
        scores: [m, s] float: row t scores the s left-out training points for target t (columns restricted to them).
        loo_outputs: [s, m] float, same device: row j is the output on every target of the model trained without
            point j. full_outputs: [m] float, same device: the outputs of the model trained on every point.
    Returns: LOOResult(pearson, spearman, per_target_pearson [m], per_target_spearman [m], n_excluded), float64.
        n_excluded counts targets where either correlation is undefined; both means skip them.
    Raises: ValueError naming the argument for a wrong shape, dtype, device, a NaN/Inf, or fewer than 2 points.
    """
    check_matrix("scores", scores, "[m, s]", _FLOATS)
    check_matrix("loo_outputs", loo_outputs, "[s, m]", _FLOATS)
    check_tensor("full_outputs", full_outputs, "[m]", 1, _FLOATS)
    m, s = scores.shape
    if tuple(loo_outputs.shape) != (s, m):
        raise ValueError(f"loo_outputs: expected shape [s, m] == [{s}, {m}] (from scores [m, s]), got "
                         f"{list(loo_outputs.shape)}")
    if full_outputs.shape[0] != m:
        raise ValueError(f"full_outputs: expected shape [m] with m == {m} (from scores), got "
                         f"{list(full_outputs.shape)}")
    if s < 2:
        raise ValueError(f"scores: expected at least 2 left-out points (columns) for a correlation, got {s}")
    for name, t in (("loo_outputs", loo_outputs), ("full_outputs", full_outputs)):
        check_like(name, t, "scores", scores, same_dtype=False)
    for name, t in (("scores", scores), ("loo_outputs", loo_outputs), ("full_outputs", full_outputs.unsqueeze(0))):
        check_finite(name, t)
    predicted = scores.double().T  # [s, m]
    effects = full_outputs.double().unsqueeze(0) - loo_outputs.double()
    spearman = _spearman_columns(predicted, effects)
    a, b = predicted - predicted.mean(0), effects - effects.mean(0)
    var_a, var_b = (a * a).sum(0), (b * b).sum(0)
    pearson = torch.where((var_a > 0) & (var_b > 0), ((a * b).sum(0) / torch.sqrt(var_a * var_b)).clamp(-1, 1),
                          torch.nan)
    defined = ~(pearson.isnan() | spearman.isnan())
    means = [float(v[defined].mean()) if defined.any() else float("nan") for v in (pearson, spearman)]
    return LOOResult(*means, pearson, spearman, int((~defined).sum()))
