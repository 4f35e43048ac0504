"""TracInCP, Grad-Dot and Grad-Cos: attribution by similarity of loss gradients, summed over checkpoints.

For checkpoints m with weights w_m, the score of training example i for target z is

    τ(z)_i = Σ_m w_m · sim(∇L_m(z), ∇L_m(x_i)),    sim = dot product, or cosine for Grad-Cos,

with L the task's per-example training loss (`Task.loss`). TracInCP (Pruthi et al., NeurIPS 2020) takes w_m = the
learning rate in force at checkpoint m; Grad-Dot and Grad-Cos average over checkpoints (w_m = 1/M), which is the
plain inner product or cosine for one checkpoint. Positive scores mean x_i helps z: a gradient step on x_i lowers
z's loss to first order. Gradients are flat ([n, p]) or projected to k dimensions (`proj_dim`), which preserves
inner products in expectation (the TRAK/TracIn-projected approximation).

Groups (GGDA, `featurize(..., groups=ids)`): a group's gradient is the sum of its members' loss gradients, so its
dot-product score is the sum of theirs (Grad-Cos takes the cosine with the summed gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._group_rows import Groups
from ..scoring import score
from ..tasks import Task
from ._checkpoints import CheckpointRunner
from ._gradients import GradientFeatures

SIMILARITIES = ("dot", "cos")


class GradientSimilarity:
    """Σ_m w_m · sim(∇L_m(z), ∇L_m(x_i)) behind featurize / score / self_score (see the module docstring).

    Args:
        model: nn.Module (its architecture; each checkpoint's weights are loaded into a private copy).
        task: a Task; its `loss` is differentiated.
        similarity: "dot" or "cos". weights: w_m per checkpoint (default 1/M each), checked against the number of
            checkpoints at featurize.
        proj_dim: k to project the gradients to (default None: flat, p per example). seed, kind, factors: the
            projection (as TRAK's). params: the parameters attributed (names or tensors; default all that require
            grad). device: where gradients are computed (default: the model's). path: "layer" or "generic".
        progress: tqdm bars over the batches when stderr is a terminal.
    Memory: the training gradients of every checkpoint, n × (k or p) float32 each, stay on the CPU.
    """

    def __init__(self, model, task: Task, *, similarity="dot", weights=None, proj_dim=None, seed=0,
                 kind="rademacher", factors=None, params=None, device=None, path="layer", progress=True):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
        self.runner = CheckpointRunner(model, task, device, progress)
        self.grads = GradientFeatures(model, params=params, proj_dim=proj_dim, seed=seed, kind=kind, factors=factors,
                                      path=path)
        self.similarity, self.weights = similarity, None if weights is None else _weights(weights)
        self._train: list[torch.Tensor] = []  # per checkpoint: [n, d] (unit rows for "cos")

    def featurize(self, train_loader: Iterable, checkpoints: Sequence, *, groups=None):
        """Loss gradients of the training set under every checkpoint (one pass over the data).

        groups: ids [n_train] of a partition into G groups (attrprims.groups): score groups, by summed gradients.
        """
        if self.weights is not None and len(self.weights) != len(checkpoints):
            raise ValueError(f"weights: expected one per checkpoint ({len(checkpoints)}), got {len(self.weights)}")
        groups = None if groups is None else Groups(groups)
        self.runner.load(checkpoints, train_loader)
        self.grads.plan(groups, len(checkpoints))
        columns = self.runner.collect(train_loader, self._gradients, desc="featurize", argument="train_loader",
                                      leave=True, groups=groups)
        self._train = [self._normalized(self.grads.finish(column["grads"], self.runner.device)) for column in columns]
        return self

    def score(self, test_loader: Iterable, *, topk=None, bottomk=None):
        """Scores [m_test, n_train] ([m_test, G] with groups; rows are targets), or a Ranked top/bottom-k per target
        (one fused pass)."""
        targets = self._targets(test_loader)
        a = torch.cat([w * t for w, t in zip(self._checkpoint_weights(), targets)], dim=1)
        b = torch.cat(self._train, dim=1)
        device = self.runner.device
        return score(a.to(device), None, b.to(device), topk=topk, bottomk=bottomk)

    def self_score(self) -> torch.Tensor:
        """τ(x_i)_i [n_train]: Σ_m w_m ‖∇L_m(x_i)‖² for "dot" (TracIn's self-influence); Σ_m w_m for "cos"."""
        self._checked()
        return sum(w * (g.double() ** 2).sum(-1) for w, g in zip(self._checkpoint_weights(), self._train)).float()

    def _gradients(self, task, batch, local=None):
        return {"grads": self.grads(self.runner.model, task.loss, batch, task.inputs, groups=local)}

    def _normalized(self, g):
        """Unit rows for "cos" (after any group sums), else g."""
        if self.similarity == "cos":
            return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        return g

    def _targets(self, test_loader) -> list[torch.Tensor]:
        self._checked()
        columns = self.runner.collect(test_loader, self._gradients, desc="targets", argument="test_loader")
        return [self._normalized(column["grads"]) for column in columns]

    def _checkpoint_weights(self) -> list[float]:
        return self.weights if self.weights is not None else [1.0 / len(self._train)] * len(self._train)

    def _checked(self):
        if not self._train:
            raise ValueError("featurize: call featurize(train_loader, checkpoints) before scoring")


class TracInCP(GradientSimilarity):
    """TracInCP: Σ_m η_m ∇L_m(z) · ∇L_m(x_i) over checkpoints m saved during training, η_m the learning rate then.

    Args: as GradientSimilarity, with learning_rates (one per checkpoint) as the weights; similarity is "dot".
    """

    def __init__(self, model, task: Task, *, learning_rates, **options):
        super().__init__(model, task, similarity="dot", weights=learning_rates, **options)


class GradDot(GradientSimilarity):
    """Grad-Dot: ∇L(z) · ∇L(x_i), averaged over checkpoints. Args: as GradientSimilarity, without similarity."""

    def __init__(self, model, task: Task, **options):
        super().__init__(model, task, similarity="dot", **options)


class GradCos(GradientSimilarity):
    """Grad-Cos: cos(∇L(z), ∇L(x_i)), averaged over checkpoints. Args: as GradientSimilarity, without similarity."""

    def __init__(self, model, task: Task, **options):
        super().__init__(model, task, similarity="cos", **options)


def _weights(weights) -> list[float]:
    values = [float(w) for w in weights]
    if not values or not all(torch.isfinite(torch.tensor(values))):
        raise ValueError(f"weights: expected finite numbers, one per checkpoint, got {list(weights)!r}")
    return values
