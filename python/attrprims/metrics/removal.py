"""Remove-and-retrain: does removing the most valuable training points by attribution hurt more than random?

The fidelity measure of GGDA (Ley et al. 2024) and of many attribution papers: for each fraction f, the ⌈f·n⌉
training points with the largest scores (the most helpful to the targets the scores were summed over) are removed,
the model is retrained on the rest and evaluated; so are models trained without random sets of the same size.
A faithful attribution makes the attributed removal hurt more (a lower accuracy or target output) than random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .._checks import check_finite, check_int, check_seed, check_tensor
from .._progress import Progress
from .lds import _FLOATS


class RemovalResult(NamedTuple):
    """What `remove_and_retrain` returns: evaluations after each removal, and of the model trained on everything."""

    fractions: tuple[float, ...]
    removed: tuple[int, ...]
    """Points removed at each fraction, ⌈f·n⌉."""
    attributed: torch.Tensor
    """[F] float64: eval_fn after removing the top-scored points."""
    random_mean: torch.Tensor
    """[F] float64: mean of eval_fn over the random removals of the same sizes."""
    random_std: torch.Tensor
    """[F] float64: their standard deviation (0 with one repeat)."""
    baseline: float
    """eval_fn of the model trained on every point."""


def remove_and_retrain(scores: torch.Tensor, train_fn: Callable, eval_fn: Callable, *,
                       fractions: Sequence[float] = (0.05, 0.1, 0.2), seed: int = 0, random_repeats: int = 3,
                       progress: bool = True) -> RemovalResult:
    """Retrain without the top-scored fraction of the training set, and without random sets of the same size.

    Args:
        scores: [n] float: one value per training point (e.g. attributions summed over a set of targets).
        train_fn: (indices LongTensor [n_kept] of the kept points, seed int) -> a trained model; every model,
            the baseline included, is trained with `seed`, so the runs differ only in their data.
        eval_fn: model -> float, e.g. test accuracy or the mean output on the targets.
        fractions: each in (0, 1); the top ⌈f·n⌉ points go (ties: the smaller index first).
        seed: the training seed, and the seed of the random removals. random_repeats: random sets per fraction.
        progress: a tqdm bar over the retrainings when stderr is a terminal.
    Returns: RemovalResult. 1 + len(fractions)·(1 + random_repeats) models are trained, each once.
    Raises: ValueError naming the argument (shape, NaN/Inf, a fraction outside (0, 1), random_repeats < 1), or
        `eval_fn` when it does not return a finite number.
    Determinism: the same arguments give the same removals and training seeds.
    """
    check_tensor("scores", scores, "[n]", 1, _FLOATS)
    check_finite("scores", scores.unsqueeze(0))
    n = scores.shape[0]
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions: expected numbers in (0, 1), got {fractions!r}")
    seed = check_seed(seed)
    random_repeats = check_int("random_repeats", random_repeats, 1)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected True or False, got {type(progress).__name__}")
    removed = tuple(min(n, math.ceil(f * n)) for f in fractions)
    # Largest score first, ties by the smaller index: a stable sort of the negated scores.
    ranking = torch.sort(-scores.detach().double().cpu(), stable=True).indices
    generator = torch.Generator().manual_seed(seed)
    everything = torch.arange(n)

    def evaluate(kept: torch.Tensor) -> float:
        value = eval_fn(train_fn(kept, seed))
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"eval_fn: expected a finite number, got {value!r}")
        return float(value)

    attributed, random_mean, random_std = [], [], []
    with Progress(progress, 1 + len(fractions) * (1 + random_repeats), "remove and retrain", "model") as bar:
        baseline = evaluate(everything)
        bar.update()
        for count in removed:
            attributed.append(evaluate(ranking[count:].sort().values))
            bar.update()
            runs = []
            for _ in range(random_repeats):
                runs.append(evaluate(torch.randperm(n, generator=generator)[count:].sort().values))
                bar.update()
            runs = torch.tensor(runs, dtype=torch.float64)
            random_mean.append(float(runs.mean()))
            random_std.append(float(runs.std(unbiased=False)))
    attributed, random_mean, random_std = (torch.tensor(v, dtype=torch.float64)
                                           for v in (attributed, random_mean, random_std))
    return RemovalResult(fractions, removed, attributed, random_mean, random_std, baseline)
