"""Combine per-model quantities over an ensemble or over training checkpoints, one model in memory at a time.

TRAK averages scores and out-to-loss terms over independently trained models; TracIn sums gradient products
over checkpoints weighted by their learning rates. Both are streaming weighted sums: `EnsembleAccumulator`
keeps only the running total, so members can be produced (loaded, featurized, scored) one after another.

An ensemble's mean score Σ_m φ_m K_m Φ_mᵀ / M is also a single scoring pass over features concatenated along
k: [φ_1 K_1, …, φ_M K_M] / M against [Φ_1, …, Φ_M]. That is how `attrprims.score` gives a fused top-k over a
whole ensemble without any [m, n] matrix per model.

Determinism: for a given member order the result is bitwise reproducible (one add per member, in order, in the
accumulation dtype); another order changes it only by that dtype's rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ._checks import check_finite, dtype_name

REDUCTIONS = ("mean", "sum")


class EnsembleAccumulator:
    """Running weighted mean or sum of same-shaped tensors, one member at a time.

    Equivalent to `(torch.stack(xs) * w[:, None, ...]).sum(0)` (reduce="sum"), or that divided by `w.sum()`
    (reduce="mean"), computed in `dtype`.

    Args:
        reduce: "mean" (weighted mean) or "sum" (weighted sum). dtype: accumulation and result dtype (floating).
    Members must share shape, dtype and device (those of member 0); the total lives on that device.
    """

    def __init__(self, reduce: str = "mean", dtype: torch.dtype = torch.float64):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch dtype, got {dtype}")
        self.reduce, self.dtype = reduce, dtype
        self.count, self.total_weight = 0, 0.0
        self._total: torch.Tensor | None = None
        self._member_dtype: torch.dtype | None = None

    def add(self, x: torch.Tensor, weight: float = 1.0) -> "EnsembleAccumulator":
        """Add one member's tensor times `weight`.

        Args:
            x: a floating tensor, finite, of member 0's shape, dtype and device. weight: a finite number (> 0 for
                a mean); a 0-d tensor is accepted.
        Returns: self.
        Raises: TypeError/ValueError naming the member ("member 3") or weight.
        """
        name = f"member {self.count}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {dtype_name(x.dtype)}")
        weight = _weight(weight, name)
        if self.reduce == "mean" and weight <= 0:
            raise ValueError(f"weight: expected > 0 for a mean ({name}), got {weight!r}")
        if self._total is not None and (x.shape != self._total.shape or x.dtype != self._member_dtype
                                        or x.device != self._total.device):
            raise ValueError(f"{name}: expected shape {list(self._total.shape)}, dtype "
                             f"{dtype_name(self._member_dtype)} on {self._total.device} (those of member 0), got "
                             f"{list(x.shape)}, dtype {dtype_name(x.dtype)} on {x.device}")
        check_finite(name, x)
        x = x.detach()
        if self._total is None:
            self._total = x.to(self.dtype, copy=True).mul_(weight)
            self._member_dtype = x.dtype
        else:
            self._total.add_(x.to(self.dtype), alpha=weight)
        self.count += 1
        self.total_weight += weight
        return self

    def result(self) -> torch.Tensor:
        """The weighted mean or sum so far, as a new tensor of `dtype`. Raises ValueError before any member."""
        if self._total is None:
            raise ValueError("members: expected at least one member, got none")
        return self._total / self.total_weight if self.reduce == "mean" else self._total.clone()


def _weight(weight, name: str) -> float:
    """A finite Python float from a number or 0-d tensor; raises naming the member."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 0 and not weight.dtype.is_complex:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight: expected a finite number for {name}, got {weight!r}")
    return float(weight)


def combine(members: Iterable[torch.Tensor | Callable[[], torch.Tensor]], weights=None, *, reduce: str = "mean",
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Weighted mean (or sum) of per-model tensors, streaming.

    Equivalent to `EnsembleAccumulator(reduce, dtype)` fed each member with its weight, i.e. for tensors
    `(torch.stack(members) * w[:, None, ...]).sum(0) / w.sum()` (without the division for reduce="sum").

    Args:
        members: tensors, or zero-argument callables returning them (each called when its turn comes), from any
            iterable; with a generator or callables only one member's tensor is referenced here at a time.
        weights: one finite number per member (a sequence or 1-d tensor; TracIn: `tracin_weights(...)`), or None
            for equal weights. reduce: "mean" or "sum". dtype: accumulation and result dtype.
    Returns: a tensor of the members' shape in `dtype`, on their device.
    Raises: ValueError naming the member, weights (count differs from the members') or reduce/dtype.
    """
    acc = EnsembleAccumulator(reduce, dtype)
    if weights is not None:
        weights = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    # A plain loop with an explicit counter: enumerate() would keep the previous member alive in its cached tuple
    # while the generator produces the next one.
    index = 0
    for member in members:
        if weights is not None and index >= len(weights):
            raise ValueError(f"weights: expected one weight per member, got {len(weights)} for more members")
        x = member() if callable(member) else member
        del member
        acc.add(x, weights[index] if weights is not None else 1.0)
        del x
        index += 1
    if weights is not None and acc.count != len(weights):
        raise ValueError(f"weights: expected one weight per member, got {len(weights)} for {acc.count} members")
    return acc.result()


def tracin_weights(learning_rates) -> list[float]:
    """TracInCP's checkpoint weights: the learning rate in effect at each checkpoint.

    Equivalent to `[float(r) for r in learning_rates]`, each checked finite and > 0.

    Raises: ValueError naming learning_rates and the first bad entry's index (or an empty sequence).
    """
    rates = [float(r) for r in learning_rates]
    if not rates:
        raise ValueError("learning_rates: expected one finite rate > 0 per checkpoint, got none")
    for i, rate in enumerate(rates):
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"learning_rates: expected finite rates > 0, got {rate!r} at [{i}]")
    return rates


def trak_combine(scores_per_model: Iterable, out_to_loss_per_model: Iterable) -> torch.Tensor:
    """TRAK's ensemble combination: the mean score times the mean out-to-loss term of each training example.

    Equivalent to `torch.stack(scores).mean(0) * torch.stack(Q).mean(0)[None, :]`, streamed like `combine`.

    Args:
        scores_per_model: per model, scores [m_test, n_train] (rows are targets, columns training examples), as
            tensors or callables. out_to_loss_per_model: per model, Q [n_train] (1 - p_y for classification).
    Returns: [m_test, n_train] float64 on the scores' device.
    Raises: ValueError naming the argument whose members have the wrong shape (or as `combine`).
    """
    scores = combine(scores_per_model)
    if scores.dim() != 2:
        raise ValueError(f"scores_per_model: expected members of shape [m_test, n_train], got {list(scores.shape)}")
    q = combine(out_to_loss_per_model)
    if q.dim() != 1 or q.shape[0] != scores.shape[1]:
        raise ValueError(f"out_to_loss_per_model: expected members of shape [n_train] with n_train == "
                         f"{scores.shape[1]} (from scores_per_model), got {list(q.shape)}")
    return scores * q.to(scores.device)[None, :]
