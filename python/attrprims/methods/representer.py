"""Representer points (RPS-L2; Yeh et al., NeurIPS 2018): attribution through the last layer's representer theorem.

Let f_i be the input of the model's last nn.Linear for training example i, extended by a constant 1 when the layer
has a bias, and Θ = [W b] that layer's weights. Fine-tuned alone to a stationary point of

    (1/n) Σ_i L(Θ f_i, t_i) + λ‖Θ‖²        (the bias is regularised with W, as a weight on the constant feature),

Θ* = Σ_i α_i f_iᵀ with representer values α_i = −∂L(Θ* f_i, t_i)/∂Φ / (2λn) ∈ R^C, so the fine-tuned layer's
pre-activation output on any z is exactly Φ(z) = Θ* f_z = Σ_i α_i (f_iᵀ f_z). The score of training example i for
target z is its term for the target's class c: α_{i,c} · f_iᵀ f_z, positive when x_i raises z's logit of class c
(for one-logit binary models, the logit times ±1 for c = 1/0). c is z's label when its batch has one (which training
examples push z toward its true class, Yeh et al.'s explanation), else the class the checkpoints predict, the argmax
of their mean probabilities (an unlabelled target is explained for the prediction it gets). Scores average over
checkpoints.
The fine-tuning targets t_i are, by default, the checkpoint's own predicted probabilities (cross-entropy against
soft labels), as in Yeh et al.'s implementation and dattri's, so that the fine-tuned layer stays the model's;
targets="labels" uses the training labels instead.

Groups (GGDA, `featurize(..., groups=ids)`): the decomposition is additive, so a group G scores
Σ_{i∈G} α_{i,c} f_iᵀ f_z, the sum of its members' scores, through the sums Σ_{i∈G} α_{i,c} f_i [G, d'] per logit
column c. The fine-tuning itself needs every training example. A group's self-score is its score summed over its own
members.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .._batches import model_args
from .._checks import check_int
from .._group_rows import Groups
from .._layers import last_linear
from ..scoring import Ranked, score
from ..tasks import BinaryClassification, MultiClassClassification, Task
from ._checkpoints import CheckpointRunner


class RepresenterPoints:
    """RPS-L2 behind featurize / score / self_score (see the module docstring for the estimator).

    Args:
        model: nn.Module whose output is the output of its last nn.Linear (the logits).
        task: MultiClassClassification (or TextClassification) or BinaryClassification: integer labels.
        last_layer: the name of that nn.Linear in model.named_modules() (default: the last nn.Linear found).
        l2: λ > 0. targets: "predicted" (the checkpoint's probabilities) or "labels": what the fine-tuning fits.
        max_iter: L-BFGS iterations of the fine-tuning; tol: its gradient-norm target (a warning says when it is
            not reached: the decomposition is then only approximate).
        device: where the model runs (default: the model's). progress: tqdm bars when stderr is a terminal.
    """

    def __init__(self, model, task: Task, *, last_layer=None, l2=1e-3, targets="predicted", max_iter=1000, tol=1e-9,
                 device=None, progress=True):
        if not isinstance(task, (MultiClassClassification, BinaryClassification)):
            raise TypeError(f"task: expected a classification task with integer labels (MultiClassClassification, "
                            f"TextClassification, BinaryClassification), got {type(task).__name__}")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
            raise ValueError(f"l2: expected a positive number, got {l2!r}")
        if targets not in ("predicted", "labels"):
            raise ValueError(f"targets: expected 'predicted' or 'labels', got {targets!r}")
        max_iter = check_int("max_iter", max_iter, 1)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
        modules = dict(model.named_modules())
        if last_layer is None:
            last_layer = last_linear(model, "last_layer")
        if not isinstance(modules.get(last_layer), nn.Linear):
            raise ValueError(f"last_layer: expected the name of an nn.Linear of model, got {last_layer!r}")
        self.runner = CheckpointRunner(model, task, device, progress)
        self.last_layer, self.l2, self.targets, self.max_iter, self.tol = last_layer, float(l2), targets, max_iter, tol
        self.binary = isinstance(task, BinaryClassification)
        self._fits: list[dict] = []  # per checkpoint: features [n, d'], labels [n], alpha [n, C], theta [C, d']
        self.groups = None  # the Groups featurize was given

    def featurize(self, train_loader: Iterable, checkpoints: Sequence, *, groups=None):
        """Last-layer inputs of the training set under every checkpoint, then each one's fine-tuning and α.

        groups: ids [n_train] of a partition into G groups (attrprims.groups): score groups (module docstring).
        """
        self.groups = None if groups is None else Groups(groups)
        self.runner.load(checkpoints, train_loader)
        columns = self.runner.collect(train_loader, self._features, desc="featurize", argument="train_loader",
                                      leave=True)
        if not columns[0]["labelled"].all():
            raise ValueError("train_loader: expected labelled batches ((inputs, labels), or TextClassification's "
                             "layouts), got batches without labels")
        if self.groups is not None:
            self.groups.check_end(columns[0]["labels"].shape[0], "train_loader")
        self._fits = []
        for m, column in enumerate(columns):
            layer = self.runner.model.get_submodule(self.last_layer)
            self.runner.use(m)
            start = layer.weight.detach().double()
            if layer.bias is not None:
                start = torch.cat([start, layer.bias.detach().double().unsqueeze(1)], dim=1)
            targets = column["predicted"] if self.targets == "predicted" else column["labels"]
            self._fits.append(self._fit(column["features"], column["labels"], targets, start.cpu()))
        return self

    def score(self, test_loader: Iterable, *, topk=None, bottomk=None):
        """Scores [m_test, n_train] ([m_test, G] with groups; rows are targets), or a Ranked top/bottom-k per target.

        Equivalent to mean over checkpoints of α[:, c_z] · (F_train f_z) (times ±1 for binary), c_z the label of
        target z when its batch has one (batches (inputs, labels)), else the checkpoints' predicted class.
        """
        self._checked()
        targets = self.runner.collect(test_loader, self._features, desc="targets", argument="test_loader")
        classes = self._target_classes(targets)
        if topk is None and bottomk is None:
            return sum(self._dense(fit, t, classes) for fit, t in zip(self._fits, targets)) / len(self._fits)
        # Concatenating the checkpoints' features along d makes the mean one product per class of targets, whose
        # representer values are a weight per training example: the fused top-k of `score` applies.
        columns = self._columns(classes)
        m = columns.shape[0]
        parts = {"top_values": [], "top_indices": [], "bottom_values": [], "bottom_indices": []}
        order = []
        for c in columns.unique().tolist():
            rows = (columns == c).nonzero().flatten()
            a = torch.cat([t["features"][rows] * self._sign(classes[rows]).unsqueeze(1) for t in targets], 1)
            b = torch.cat([self._train_side(fit, c) / len(self._fits) for fit in self._fits], 1)
            ranked = score(a.float(), None, b.float(), topk=topk, bottomk=bottomk)
            for name in parts:
                if getattr(ranked, name) is not None:
                    parts[name].append(getattr(ranked, name))
            order.append(rows)
        inverse = torch.empty(m, dtype=torch.long)
        inverse[torch.cat(order)] = torch.arange(m)
        return Ranked(**{name: torch.cat(v)[inverse] if v else None for name, v in parts.items()})

    def self_score(self) -> torch.Tensor:
        """τ(x_i)_i [n_train]: α_{i,y_i} ‖f_i‖², averaged over checkpoints; with groups [G], each group's score
        summed over its own members as targets (labelled y_i)."""
        self._checked()
        total = 0
        for fit in self._fits:
            labels, features = fit["labels"], fit["features"]
            columns, sign = self._columns(labels), self._sign(labels)
            values = torch.zeros(labels.shape[0], dtype=torch.float64)
            for c in columns.unique().tolist():
                rows = (columns == c).nonzero().flatten()
                side = self._train_side(fit, c)[rows if self.groups is None else self.groups.ids[rows]]
                values[rows] = sign[rows] * (features[rows] * side).sum(1)
            if self.groups is not None:
                values = values.new_zeros(self.groups.count).index_add_(0, self.groups.ids, values)
            total = total + values
        return (total / len(self._fits)).float()

    def decompose(self, m: int, features: torch.Tensor) -> torch.Tensor:
        """Σ_i α_i (f_iᵀ f) [b, C] for last-layer inputs `features` [b, d'] (1 appended when the layer has a bias),
        under checkpoint m: the fine-tuned layer's output, exactly, at a stationary point."""
        fit = self._fits[m]
        return (features.double() @ fit["features"].T) @ fit["alpha"]

    def _features(self, task, batch):
        """{"features": the last layer's inputs [b, d'] float64, "labels": [b] int64 (0 when unlabelled), "labelled":
        [b] bool, "predicted": the model's probabilities [b, C] float64} of a batch under the loaded weights."""
        captured, outputs = [], []

        def keep(module, args, output):
            captured.append(args[0].detach())
            outputs.append(output.detach())

        layer = self.runner.model.get_submodule(self.last_layer)
        handle = layer.register_forward_hook(keep)
        try:
            args, kwargs = model_args(task.inputs, batch)
            with torch.no_grad():
                self.runner.model(*args, **kwargs)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].dim() != 2:
            raise ValueError(f"last_layer: expected one call per forward with inputs [b, d], got "
                             f"{[list(t.shape) for t in captured]}")
        features = captured[0].double()
        if layer.bias is not None:
            features = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
        logits = outputs[0].double()
        predicted = torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)
        labels = _labels(task, batch)
        labelled = torch.full((features.shape[0],), labels is not None)
        labels = labels.long() if labels is not None else torch.zeros(features.shape[0], dtype=torch.long)
        return {"features": features, "labels": labels, "labelled": labelled, "predicted": predicted}

    def _fit(self, features, labels, targets, start):
        """Θ* by L-BFGS in float64 from the checkpoint's Θ, and α = −∂L/∂Φ / (2λn) there."""
        n = features.shape[0]
        theta = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            value = self._losses(features @ theta.T, targets).mean() + self.l2 * (theta ** 2).sum()
            value.backward()
            return value

        optimizer.step(objective)
        objective()
        residual = float(theta.grad.abs().max())
        if residual > 1e3 * self.tol:
            warnings.warn(f"max_iter: the last-layer fine-tuning stopped at gradient max-norm {residual:.3g} (tol "
                          f"{self.tol:g}); the representer decomposition is approximate", UserWarning, stacklevel=3)
        logits = (features @ theta.detach().T).requires_grad_(True)
        self._losses(logits, targets).sum().backward()
        alpha = -logits.grad / (2 * self.l2 * n)
        return {"features": features, "labels": labels, "targets": targets, "alpha": alpha, "theta": theta.detach()}

    def _losses(self, logits, targets):
        """Per-example loss [n] of the last layer's outputs [n, C] against labels [n] or probabilities [n, C]."""
        if self.targets == "predicted":  # cross-entropy against soft labels
            if self.binary:
                return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").squeeze(1)
            return -(targets * torch.log_softmax(logits, dim=1)).sum(1)
        if self.binary:
            return BinaryClassification.loss(self.runner.task, logits.squeeze(1), (None, targets))
        return MultiClassClassification.loss(self.runner.task, logits, (None, targets))

    def _dense(self, fit, target, classes):
        """[m, n] (or [m, G]) float32 scores of one checkpoint: per logit column c, its targets times its train side."""
        columns = self._columns(classes)
        signed = target["features"] * self._sign(classes).unsqueeze(1)
        out = torch.zeros(columns.shape[0], fit["features"].shape[0] if self.groups is None else self.groups.count)
        for c in columns.unique().tolist():
            rows = (columns == c).nonzero().flatten()
            out[rows] = (signed[rows] @ self._train_side(fit, c).T).float()
        return out

    def _train_side(self, fit, c):
        """α_{i,c} f_i [n, d'] of logit column c, or with groups its sums Σ_{i∈G} α_{i,c} f_i [G, d'] (float64)."""
        side = fit["features"] * fit["alpha"][:, c:c + 1]
        if self.groups is None:
            return side
        return side.new_zeros((self.groups.count, side.shape[1])).index_add_(0, self.groups.ids, side)

    def _target_classes(self, targets):
        """c [m]: each target's label, or for unlabelled ones the argmax of the checkpoints' mean probabilities."""
        mean = sum(t["predicted"] for t in targets) / len(targets)
        predicted = (mean[:, 0] > 0.5).long() if self.binary else mean.argmax(1)
        return torch.where(targets[0]["labelled"], targets[0]["labels"], predicted)

    def _columns(self, classes):
        """The logit (column of α) of each class: binary models have one, for class 1."""
        return torch.zeros_like(classes) if self.binary else classes

    def _sign(self, classes):
        """±1 per class: binary models' one logit counts for class 1 and against class 0."""
        return (2.0 * classes.double() - 1.0) if self.binary else torch.ones(classes.shape[0], dtype=torch.float64)

    def _checked(self):
        if not self._fits:
            raise ValueError("featurize: call featurize(train_loader, checkpoints) before scoring")


def _labels(task, batch):
    """Labels [b] of a classification batch ((inputs, labels) tuples, or TextClassification's layouts), or None for
    unlabelled ones (an inputs tensor, or a 1-tuple)."""
    split = getattr(task, "_split", None)
    if split is not None:
        return split(batch)[1]
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
