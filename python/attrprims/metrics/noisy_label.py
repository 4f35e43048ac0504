"""Noisy-label detection: how well self-influence ranks training points whose labels were flipped.

A flipped label is hard to fit, so the model leans on that point itself: its self-score (a method's
`self_score()`) tends to be high. Ranking the training set by self-score and inspecting from the top, the ROC AUC
is the probability that a flipped point outranks a clean one (ties count one half), and `detection_curve` gives the
fraction of flipped points found against the fraction of the training set inspected (the curve dattri plots).
"""

from __future__ import annotations

import torch

from .._checks import check_finite, check_like, check_tensor
from .lds import _FLOATS, _rank_average


def _checked(self_scores, is_flipped) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("self_scores", self_scores, "[n]", 1, _FLOATS)
    check_tensor("is_flipped", is_flipped, "[n]", 1, (torch.bool,))
    if is_flipped.shape != self_scores.shape:
        raise ValueError(f"is_flipped: expected shape [n] == {list(self_scores.shape)} (from self_scores), got "
                         f"{list(is_flipped.shape)}")
    check_like("is_flipped", is_flipped, "self_scores", self_scores, same_dtype=False)
    check_finite("self_scores", self_scores.unsqueeze(0))
    flipped = int(is_flipped.sum())
    if flipped == 0 or flipped == is_flipped.numel():
        raise ValueError(f"is_flipped: expected both flipped and clean points, got {flipped} flipped of "
                         f"{is_flipped.numel()}")
    return self_scores.double(), is_flipped


def noisy_label_auc(self_scores: torch.Tensor, is_flipped: torch.Tensor) -> float:
    """ROC AUC of finding the flipped labels by ranking training points by self-score (higher: more suspicious).

    Equivalent to the fraction of (flipped, clean) pairs whose flipped point scores higher, ties counting 1/2
    (the Mann–Whitney U statistic over n_flipped · n_clean), computed from average ranks in float64.

    Args: self_scores [n] float; is_flipped [n] bool on the same device, with both classes present.
    Raises: ValueError naming the argument (shape, dtype, device, NaN/Inf, a class missing).
    """
    scores, flipped = _checked(self_scores, is_flipped)
    ranks = _rank_average(scores.unsqueeze(1)).squeeze(1)
    positives, negatives = int(flipped.sum()), int((~flipped).sum())
    u = float(ranks[flipped].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def detection_curve(self_scores: torch.Tensor, is_flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inspected [n + 1], found [n + 1]) float64: after inspecting the top i points by self-score (ties by smaller
    index), the fraction i/n of the training set inspected and the fraction of flipped points found.

    Args and errors: as `noisy_label_auc`.
    """
    scores, flipped = _checked(self_scores, is_flipped)
    order = torch.sort(-scores, stable=True).indices
    found = torch.cat([torch.zeros(1, dtype=torch.float64, device=scores.device),
                       flipped[order].double().cumsum(0)]) / int(flipped.sum())
    inspected = torch.arange(scores.numel() + 1, dtype=torch.float64, device=scores.device) / scores.numel()
    return inspected, found
