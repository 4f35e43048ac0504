"""Per-example gradient features shared by the methods: flat, or projected to k dimensions."""

from __future__ import annotations

import torch

from .._kernel_args import KIND_NAMES
from ..factored_projector import FactoredProjector
from ..param_layout import param_layout
from ..per_sample_grads import per_sample_grads, project_grads
from ..projection import Projector

PROJECTION_KINDS = (*KIND_NAMES, "factored")
# Most float32 elements of unprojected group sums (checkpoints × G × p) held to project once at the end: 512 MiB;
# and the most parameters p for which a batch's unprojected group sums ([groups in the batch, p]) are formed.
_DEFER_BUDGET = 2**27
_DEFER_MAX_P = 2**18


class GradientFeatures:
    """Per-example gradients of a task function ([b] per batch) w.r.t. the selected parameters: [b, p] or [b, k].

    Equivalent to `per_sample_grads(model, fn, batch, params=..., flat=True)`, times the projection P [p, k] when
    proj_dim is given (then computed by `project_grads`, never holding the [b, p] gradients).

    Args:
        model: the nn.Module whose parameters are selected (names are resolved against it).
        params: names or tensors of `model` (default: every parameter requiring grad).
        proj_dim: k, or None for the flat gradients. seed, kind ("rademacher", "gaussian", "sjlt", "factored"),
            factors ((k_out, k_in) for "factored"): the projection. path: "layer" or "generic" gradients.
    Attributes: names, layout, projector (None when flat), dim (k or p).

    Groups: `plan(groups, checkpoints)` before a pass with group ids decides where a dense projection is applied.
    Random groups spread over every batch, so projecting each batch's group sums would cost nearly one row per
    example; instead the sums stay unprojected ([G, p] per checkpoint, when that fits _DEFER_BUDGET and p is at
    most _DEFER_MAX_P) and `finish` projects each group once: G rows in all. A FactoredProjector's cost is per token,
    so it projects per batch.
    """

    def __init__(self, model, *, params=None, proj_dim=None, seed=0, kind="rademacher", factors=None, path="layer"):
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"kind: expected one of {PROJECTION_KINDS}, got {kind!r}")
        self.names = None if params is None else [p if isinstance(p, str) else _name_of(model, p) for p in params]
        self.layout = param_layout(model, self.names)
        self.path = path
        if proj_dim is None:
            self.projector, self.dim = None, self.layout.p
        elif kind == "factored":
            k_out, k_in = _factors(proj_dim, factors)
            self.projector, self.dim = FactoredProjector(self.layout.p, k_out, k_in, seed), proj_dim
        else:
            self.projector, self.dim = Projector(self.layout.p, proj_dim, seed, kind), proj_dim
        self.deferred = False

    def plan(self, groups, checkpoints: int) -> None:
        """Whether the coming pass with `groups` (a Groups, or None) over `checkpoints` defers its projection."""
        self.deferred = (groups is not None and isinstance(self.projector, Projector) and self.layout.p <= _DEFER_MAX_P
                         and checkpoints * groups.count * self.layout.p <= _DEFER_BUDGET)

    def finish(self, sums: torch.Tensor, device) -> torch.Tensor:
        """[G, dim]: a planned pass's group sums, projected now (on `device`, in blocks) if that was deferred."""
        if not self.deferred:
            return sums
        rows = max(1, _DEFER_BUDGET // (8 * self.layout.p))
        return torch.cat([self.projector(sums[i:i + rows].to(device)).cpu() for i in range(0, sums.shape[0], rows)])

    def __call__(self, model, fn, batch, inputs, groups=None) -> torch.Tensor:
        """[b, dim] float32: gradients of fn(outputs, batch) [b] per example, projected when a projector is set;
        with groups (ids [b] 0..s-1), [s, dim]: each group's summed gradient ([s, p] when `plan` deferred)."""
        if self.projector is None or (groups is not None and self.deferred):
            return per_sample_grads(model, fn, batch, params=self.names, inputs=inputs, path=self.path, flat=True,
                                    groups=groups).float()
        return project_grads(model, fn, batch, self.projector, params=self.names, inputs=inputs, path=self.path,
                             groups=groups)


def _factors(k: int, factors) -> tuple[int, int]:
    """(k_out, k_in) with k_out·k_in == k for kind="factored": given, or the most square split of a power of 2."""
    if factors is not None:
        k_out, k_in = factors
        if k_out * k_in != k:
            raise ValueError(f"factors: expected k_out·k_in == proj_dim == {k}, got {factors!r}")
        return k_out, k_in
    if k & (k - 1):
        raise ValueError(f"proj_dim: kind='factored' splits a power of 2 into k_out·k_in; got {k}, pass factors=")
    k_in = 1 << (k.bit_length() - 1) // 2
    return k // k_in, k_in


def _name_of(model, tensor) -> str:
    for name, t in model.named_parameters():
        if t is tensor:
            return name
    raise ValueError("params: a tensor given is not a parameter of model")
