"""Combine per-model quantities over an ensemble or over training checkpoints, one model in memory at a time.

TRAK averages scores and out-to-loss terms over independently trained models; TracIn sums gradient products
over checkpoints weighted by their learning rates. Both are streaming weighted sums: `EnsembleAccumulator`
keeps only the running total, so members can be produced (loaded, featurized, scored) one after another.

An ensemble's mean score Σ_m φ_m K_m Φ_mᵀ / M is also a single scoring pass over features concatenated along
k: [φ_1 K_1, …, φ_M K_M] / M against [Φ_1, …, Φ_M]. That is how `attrprims.score` gives a fused top-k over a
whole ensemble without any [m, n] matrix per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ._checks import check_finite, dtype_name

REDUCTIONS = ("mean", "sum")


class EnsembleAccumulator:
    """Running weighted mean or sum of same-shaped tensors.

    Equivalent to `(torch.stack(xs) * w[:, None...]).sum(0)` (reduce="sum") or that divided by `w.sum()`
    (reduce="mean"), accumulated in `dtype`.

    Args:
        reduce: "mean" (weighted mean) or "sum" (weighted sum). dtype: accumulation and result dtype.
    """

    def __init__(self, reduce: str = "mean", dtype: torch.dtype = torch.float64):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype_name(dtype)}")
        self.reduce, self.dtype = reduce, dtype
        self.count, self.total_weight = 0, 0.0
        self._total: torch.Tensor | None = None

    def add(self, x: torch.Tensor, weight: float = 1.0) -> "EnsembleAccumulator":
        """Add one member's tensor with `weight` (finite; > 0 for a mean). Raises ValueError naming the member."""
        name = f"member {self.count}"
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point torch.Tensor, got "
                             f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight: expected a finite number for {name}, got {weight!r}")
        if self.reduce == "mean" and weight <= 0:
            raise ValueError(f"weight: expected > 0 for a mean ({name}), got {weight!r}")
        if self._total is not None and (x.shape != self._total.shape or x.device != self._total.device):
            raise ValueError(f"{name}: expected shape {list(self._total.shape)} on {self._total.device} (that of "
                             f"member 0), got {list(x.shape)} on {x.device}")
        check_finite(name, x)
        term = x.detach().to(self.dtype) * weight
        self._total = term if self._total is None else self._total.add_(term)
        self.count += 1
        self.total_weight += float(weight)
        return self

    def result(self) -> torch.Tensor:
        """The weighted mean or sum so far (a new tensor). Raises ValueError before any member."""
        if self._total is None:
            raise ValueError("members: expected at least one member, got none")
        return self._total / self.total_weight if self.reduce == "mean" else self._total.clone()


def combine(members: Iterable[torch.Tensor | Callable[[], torch.Tensor]], weights=None, *, reduce: str = "mean",
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Weighted mean (or sum) of per-model tensors, streaming: `members` may be a generator or zero-argument
    callables (each called when its turn comes), so only one member's tensor exists at a time.

    Equivalent to `EnsembleAccumulator(reduce, dtype)` fed every member with its weight (default 1).
    """
    acc = EnsembleAccumulator(reduce, dtype)
    weights = list(weights) if weights is not None else None
    for i, member in enumerate(members):
        if weights is not None and i >= len(weights):
            raise ValueError(f"weights: expected one weight per member, got {len(weights)} for more members")
        acc.add(member() if callable(member) else member, weights[i] if weights is not None else 1.0)
    if weights is not None and acc.count != len(weights):
        raise ValueError(f"weights: expected one weight per member, got {len(weights)} for {acc.count} members")
    return acc.result()


def tracin_weights(learning_rates) -> list[float]:
    """TracInCP's checkpoint weights: the learning rate in effect at each checkpoint (finite, > 0)."""
    rates = [float(r) for r in learning_rates]
    bad = [(i, r) for i, r in enumerate(rates) if not math.isfinite(r) or r <= 0]
    if not rates or bad:
        raise ValueError(f"learning_rates: expected one finite rate > 0 per checkpoint, got {rates!r}")
    return rates


def trak_combine(scores_per_model: Iterable, out_to_loss_per_model: Iterable) -> torch.Tensor:
    """TRAK's ensemble: mean_m(scores_m) ⊙ mean_m(Q_m), scores [m_test, n_train] (rows are targets), Q [n_train].

    Equivalent to `torch.stack(scores).mean(0) * torch.stack(Q).mean(0)[None, :]`, streamed like `combine`.
    """
    scores = combine(scores_per_model)
    q = combine(out_to_loss_per_model)
    if q.dim() != 1 or scores.dim() != 2 or q.shape[0] != scores.shape[1]:
        raise ValueError(f"out_to_loss_per_model: expected [n_train] with n_train == {scores.shape[-1]} (from "
                         f"scores_per_model {list(scores.shape)}), got {list(q.shape)}")
    return scores * q.to(scores.device)[None, :]
