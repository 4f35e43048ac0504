"""Linear datamodeling score (LDS): how well attribution scores predict retrained models' outputs.

LDS is defined in Park et al. 2023 (TRAK, Section 2). Models are retrained on random subsets S of the training
set; an attribution method predicts the output of the model trained on S on a target z as the sum of the scores
of the examples in S, and the LDS of z is the Spearman rank correlation, over the subsets, between these
predictions and the retrained models' actual outputs. The reported figure is the mean over targets.

Conventions: rows of `scores` are targets, as `attrprims.score` and the methods return them ([m, n]: m targets,
n training examples); s subsets. Ties get average ranks (the ranks of tied values are the mean of the positions
they occupy, as scipy.stats.spearmanr and pandas' "average"); values tie only when exactly equal. A target whose
outputs, or whose predictions, are constant over the subsets has no rank correlation: its value is NaN and it is
left out of the mean and the interval, and `n_excluded` counts it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_finite, check_int, check_like, check_matrix, check_seed

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# float64 elements of one block of targets' scores while forming the predictions (64 MiB), and of one block of
# bootstrap resample indices: bounds the memory whatever m, n and the number of resamples.
_BLOCK_ELEMENTS = 1 << 23


class LDSResult(NamedTuple):
    """What `lds` returns: the mean over targets, its bootstrap interval, and the per-target values."""

    mean: float
    """Mean LDS over the targets with a defined correlation (NaN if there are none)."""
    interval: tuple[float, float]
    """Percentile bootstrap interval of `mean` at the requested confidence (NaNs if no target is defined)."""
    per_target: torch.Tensor
    """[m] float64 on the device of `scores`: each target's Spearman correlation, NaN where undefined."""
    n_excluded: int
    """How many targets are NaN (constant outputs or predictions over the subsets) and left out of mean/interval."""


def _rank_average(x: torch.Tensor) -> torch.Tensor:
    """Rank each column of `x` from 1, giving tied values the average of the positions they occupy.

    Equivalent to `torch.stack([scipy.stats.rankdata(col) for col in x.T], 1)` (method "average").

    Args:
        x: [s, m] float, CPU or CUDA; each column is ranked on its own.
    Returns: [s, m] float64 on the device of `x`. Exact: ranks are half-integers.
    """
    s = x.shape[0]
    values, order = torch.sort(x, dim=0, stable=True)
    position = torch.arange(s, device=x.device).unsqueeze(1).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    # The first and last position of each run of equal values, spread over the run.
    first = torch.where(starts, position, 0).cummax(dim=0).values
    last = torch.where(ends, position, s - 1).flip(0).cummin(dim=0).values.flip(0)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks.scatter_(0, order, (first + last).double() / 2 + 1)
    return ranks


def _spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[m] Spearman correlation of each column of a with the same column of b ([s, m]); NaN if either is constant."""
    s = a.shape[0]
    # Average ranks always sum to s(s+1)/2, so their mean is exactly (s+1)/2.
    ra, rb = _rank_average(a) - (s + 1) / 2, _rank_average(b) - (s + 1) / 2
    var_a, var_b = (ra * ra).sum(0), (rb * rb).sum(0)
    rho = ((ra * rb).sum(0) / torch.sqrt(var_a * var_b)).clamp(-1, 1)
    return torch.where((var_a > 0) & (var_b > 0), rho, torch.nan)


def _predictions(scores: torch.Tensor, subset_masks: torch.Tensor) -> torch.Tensor:
    """[s, m] float64: Σ_{i∈S} scores[t, i] for each subset S and target t, a block of targets at a time."""
    m, n = scores.shape
    masks = subset_masks.double()
    out = torch.empty(subset_masks.shape[0], m, dtype=torch.float64, device=scores.device)
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, m, block):
        out[:, start:start + block] = masks @ scores[start:start + block].double().T
    return out


def _bootstrap_interval(values: torch.Tensor, bootstrap: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of the mean of `values` [m'] (CPU float64) over `bootstrap` resamples of the targets."""
    count = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(bootstrap, dtype=torch.float64)
    block = max(1, _BLOCK_ELEMENTS // count)
    for start in range(0, bootstrap, block):
        stop = min(start + block, bootstrap)
        picks = torch.randint(count, (stop - start, count), generator=generator)
        means[start:stop] = values[picks].mean(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def lds(scores: torch.Tensor, subset_masks: torch.Tensor, subset_outputs: torch.Tensor, *, bootstrap: int = 1000,
        seed: int = 0, confidence: float = 0.95) -> LDSResult:
    """Measure how well attribution scores predict retrained models' outputs: the linear datamodeling score.

    Equivalent to `rho[t] = spearmanr(subset_masks.double() @ scores[t].double(), subset_outputs[:, t])` for
    each target t, then the mean of the defined `rho` and the percentile bootstrap interval of that mean.

    Args:
        scores: [m, n] float, CPU or CUDA: row t is the attribution of each training example to target t.
        subset_masks: [s, n] bool, same device: which training examples the model of each subset was trained on.
        subset_outputs: [s, m] float, same device: each subset model's output on each target (e.g. the margin).
        bootstrap: number of resamples of the targets (with replacement) for the interval, >= 1.
        seed: seed of the resampling. confidence: coverage of the interval, in (0, 1).
    Returns: LDSResult(mean, interval, per_target [m] float64, n_excluded). Computed in float64.
    Raises: TypeError/ValueError naming the argument for a wrong type, shape, dtype, device, non-finite value,
        fewer than 2 subsets, or bootstrap/seed/confidence out of range.
    Determinism: `per_target` is exact up to float64 rounding of the sums; the interval is bit-identical for the
    same per-target values, seed and torch version (resampling runs on the CPU whatever the device).
    """
    check_matrix("scores", scores, "[m, n]", _FLOATS)
    check_matrix("subset_masks", subset_masks, "[s, n]", (torch.bool,))
    check_matrix("subset_outputs", subset_outputs, "[s, m]", _FLOATS)
    m, n = scores.shape
    s = subset_masks.shape[0]
    if subset_masks.shape[1] != n:
        raise ValueError(f"subset_masks: expected shape [s, n] with n == {n} (from scores), got "
                         f"{list(subset_masks.shape)}")
    if s < 2:
        raise ValueError(f"subset_masks: expected at least 2 subsets (rows) for a rank correlation, got {s}")
    if tuple(subset_outputs.shape) != (s, m):
        raise ValueError(f"subset_outputs: expected shape [s, m] == [{s}, {m}] (s from subset_masks, m from "
                         f"scores), got {list(subset_outputs.shape)}")
    check_like("subset_masks", subset_masks, "scores", scores, same_dtype=False)
    check_like("subset_outputs", subset_outputs, "scores", scores, same_dtype=False)
    check_finite("scores", scores)
    check_finite("subset_outputs", subset_outputs)
    bootstrap = check_int("bootstrap", bootstrap, 1)
    seed = check_seed(seed)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")

    per_target = _spearman_columns(_predictions(scores, subset_masks), subset_outputs.double())
    defined = per_target[~torch.isnan(per_target)].cpu()
    n_excluded = m - defined.shape[0]
    if defined.shape[0] == 0:
        return LDSResult(float("nan"), (float("nan"), float("nan")), per_target, n_excluded)
    interval = _bootstrap_interval(defined, bootstrap, seed, float(confidence))
    return LDSResult(defined.mean().item(), interval, per_target, n_excluded)

