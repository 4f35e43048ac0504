"""TRAK (Park et al., ICML 2023), composed from the primitives: projected gradients, Gram, ensemble, scoring.

Per model m (an independently trained model or a checkpoint): Φ_m [n, k] are the projected per-example gradients
of the task's output function f on the training set, K_m = (Φ_mᵀΦ_m + λI)⁻¹ (GramAccumulator; FeatureGram, through
the n×n kernel, when n < k), and Q_m [n] the out-to-loss terms. The score of training example i for target z is

    τ(z)_i = mean_m[φ_m(z) K_m Φ_mᵀ]_i · mean_m[Q_m]_i,

exactly traker's estimator (its scores are this matrix transposed: there columns are targets, here rows are).

Where this differs from traker, and why:
- Damping. traker's default λ is 0, and (Φᵀ Φ)⁻¹ breaks once k nears the number of training examples or the
  gradients' rank (its LDS on logistic regression falls from 0.69 at k=256 to 0.35 at k=512). The default
  "auto" is λ = 0.5 · trace(ΦᵀΦ)/n, half the mean squared norm of a training example's features: one
  example's worth of curvature in every direction. On digits with an MLP (1500 training examples, 5 models,
  50 subsets at α = 0.5) it gave LDS 0.61–0.63 for every k from 256 to 2048, within 0.02 of the best λ found by
  a sweep at each k, while λ = 1e-4·trace/k gave 0.27 at k = 2048. A number is relative to the mean eigenvalue
  trace/k (or absolute with relative=False; `damping=0, relative=False` is traker's estimator), and
  `score(..., damping=[...])` sweeps several values from one eigendecomposition per model.
- The projection is ours: seeded Philox, the same matrix on CPU and GPU and under any chunking (traker's
  fast_jl matrix depends on the GPU model); `kind="factored"` uses P_out ⊗ P_in (LoGra) on weight matrices.
- K_m is applied through an eigendecomposition in float64 instead of traker's fp32 inverse.

Groups (GGDA, `featurize(..., groups=ids)`): a group G of training examples is attributed as one, with feature
Φ_G = Σ_{i∈G} Q_i φ_i / Q_G and Q_G = mean_{i∈G} Q_i, so that its score φ(z) K Φ_Gᵀ Q_G = φ(z) K Σ_{i∈G} Q_i φ_iᵀ is
the sum of its members' TRAK scores under the kernel K = (Σ_G Φ_GᵀΦ_G + λI)⁻¹ of the groups (the loss gradient of
the group is the sum of its members', Q_i φ_i each). One backward pass of Σ_i Q_i f_i per batch gives the sums, and
featurization, Gram and scoring cost scale with the number of groups. Groups of one example are plain TRAK. With
`store=`, each batch's group sums are projected and stored as they come (resumable), instead of once per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._batches import model_args
from .._checks import check_int
from .._group_rows import Groups
from ..gram import FeatureGram, GramAccumulator
from ..scoring import score
from ..store import FeatureStore
from ..tasks import Task
from ._checkpoints import CheckpointRunner
from ._gradients import GradientFeatures

AUTO_DAMPING = 0.5  # "auto": λ = AUTO_DAMPING · trace(ΦᵀΦ)/n, see the module docstring


class TRAK:
    """TRAK attribution for a model and a task, featurized over checkpoints, scored for targets.

    Equivalent to traker's TRAKer(model, task, train_set_size, proj_dim).featurize(...)/finalize_features/
    score/finalize_scores, with rows as targets and explicit damping (see the module docstring).

    Args:
        model: nn.Module (its architecture; each checkpoint's weights are loaded into a private copy).
        task: a Task (attrprims.tasks): how batches feed the model, f, and Q.
        proj_dim: k. seed: the projection's seed. kind: "rademacher", "gaussian", "sjlt" or "factored"
            (with factors=(k_out, k_in), default the most square split).
        damping: "auto" (λ = 0.5·trace(ΦᵀΦ)/n per model), or λ relative to trace(ΦᵀΦ)/k, or absolute with
            relative=False; one value or a sequence (then scores gain a leading dimension per value).
        store: a directory for a FeatureStore: features persist and featurize resumes after a crash. Each
            checkpoint's rows are kept under its position and a hash of its weights.
        device: where gradients are computed (default: the model's). path: "layer" or "generic" gradients.
        params: the parameters attributed (names or tensors of `model`; default all that require grad).
        progress: tqdm bars over the batches when stderr is a terminal.
    Determinism: features are a deterministic function of (checkpoint, data, seed) on a device; scores follow.
    """

    def __init__(self, model, task: Task, *, proj_dim=2048, seed=0, kind="rademacher", factors=None,
                 damping="auto", relative=True, store=None, device=None, path="layer", params=None, progress=True):
        check_int("proj_dim", proj_dim, 1)
        self.runner = CheckpointRunner(model, task, device, progress)
        self.model, self.device, self.task, self.path = self.runner.model, self.runner.device, task, path
        self.grads = GradientFeatures(model, params=params, proj_dim=proj_dim, seed=seed, kind=kind, factors=factors,
                                      path=path)
        self.params, self.layout, self.projector, self.k = (self.grads.names, self.grads.layout,
                                                            self.grads.projector, proj_dim)
        self.damping, self.relative = damping, relative
        self.store_path = store
        self._models: list[dict] = []  # per checkpoint: features [n, k], out_to_loss [n], gram
        self.groups = None  # the Groups featurize was given

    # ---- featurize ----------------------------------------------------------------------------------

    def featurize(self, train_loader: Iterable, checkpoints: Sequence, *, groups=None) -> "TRAK":
        """Project the training set's gradients under every checkpoint; then each one's Gram matrix and Q.

        train_loader: re-iterable batches in a fixed order (not shuffled: rows are training example indices). It
            is read once for all checkpoints (a task whose `prepare` reads data, like CLIP's, reads it once more
            per checkpoint), each batch going through every checkpoint's weights in turn.
        checkpoints: state_dicts or paths, one per independently trained model (or training checkpoint); all
            are held in memory.
        groups: ids [n_train] of a partition into G groups (attrprims.groups): attribute to groups (see the module
            docstring); scores are then [m_test, G].
        """
        self.groups = None if groups is None else Groups(groups)
        self.runner.load(checkpoints, train_loader)
        self.grads.plan(self.groups if self.store_path is None else None, len(checkpoints))
        if self.store_path is None:
            columns = self.runner.collect(train_loader, self._features, desc="featurize", argument="train_loader",
                                          leave=True, groups=self.groups)
        else:
            columns = self.runner.fill_store(train_loader, self._features, self._open_store, self.groups)
        self._models = []
        for column in columns:
            features = self.grads.finish(column["features"], self.device)
            if self.groups is not None:  # Σ Q_i φ_i and Σ Q_i per group → Φ_G and Q_G
                column["out_to_loss"] = column["out_to_loss"] / self.groups.sizes
                scale = column["out_to_loss"].clamp_min(torch.finfo(torch.float32).tiny)
                features = features / scale.unsqueeze(1)
            if features.shape[0] < self.k:  # fewer rows than k (groups, small sets): solve through ΦΦᵀ
                gram = FeatureGram(features.to(self.device))
            else:
                gram = GramAccumulator(self.k, device=self.device)
                for start in range(0, features.shape[0], 4096):
                    gram.update(features[start:start + 4096].to(self.device))
            self._models.append({"features": features, "out_to_loss": column["out_to_loss"], "gram": gram})
        return self

    def _features(self, task, batch, local=None):
        """{"features": projected gradients of f [b, k], "out_to_loss": Q [b]} of a batch under the loaded weights;
        with local group ids [b] (0..s-1), the group sums Σ Q_i φ_i [s, k] and Σ Q_i [s]."""
        args, kwargs = model_args(task.inputs, batch)
        with torch.no_grad():
            q = task.out_to_loss(self.model(*args, **kwargs), batch).float()
        if local is None:
            return {"features": self.grads(self.model, task.output, batch, task.inputs), "out_to_loss": q}

        def weighted(outputs, batch):  # Σ_i Q_i f_i has gradient Σ_i Q_i φ_i
            return task.output(outputs, batch) * task.out_to_loss(outputs, batch).detach()

        count = int(local.max()) + 1
        return {"features": self.grads(self.model, weighted, batch, task.inputs, groups=local),
                "out_to_loss": q.new_zeros(count).index_add_(0, local, q)}

    def _open_store(self, n, groups=None):
        extra = {"task": self.task.config(), "params": self.params}
        if groups is not None:
            extra["groups"] = groups.digest  # rows are partial group sums: another grouping cannot reuse them
        return FeatureStore.open(self.store_path, n=n, arrays={"features": ([self.k], torch.float32),
                                                               "out_to_loss": ([], torch.float32)},
                                 projector=self.projector, layout=self.layout, output=self.task.name, extra=extra)

    # ---- score ----------------------------------------------------------------------------------------

    def target_features(self, test_loader: Iterable) -> list[torch.Tensor]:
        """φ_m(z) [m_test, k] for each model m: the targets' projected gradients of f."""
        self._checked_models()
        columns = self.runner.collect(test_loader, lambda task, batch: {"features": self.grads(
            self.model, task.output, batch, task.inputs)}, desc="targets", argument="test_loader")
        return [column["features"] for column in columns]

    def score(self, test_loader: Iterable, *, topk=None, bottomk=None, damping=None, targets=None):
        """Scores [m_test, n_train] (rows are targets; [m_test, G] after featurize with groups), or a Ranked
        top/bottom-k per target.

        damping: overrides the constructor's (a sequence gives [d, m_test, n_train]; not with topk).
        targets: precomputed `target_features(test_loader)` to reuse (test_loader may then be None).
        """
        models = self._checked_models()
        phis = targets if targets is not None else self.target_features(test_loader)
        lam = self.damping if damping is None else damping
        q = torch.stack([e["out_to_loss"] for e in models]).double().mean(0)
        solved = [self._solve(e, phi.to(self.device), lam) for e, phi in zip(models, phis)]
        if topk is not None or bottomk is not None:
            if solved[0].dim() == 3:
                raise ValueError("damping: one value with topk/bottomk (sweep with dense scores)")
            # The ensemble mean is one pass over features concatenated along k (see attrprims.ensemble).
            a = torch.cat([s / len(models) for s in solved], dim=1)
            b = torch.cat([e["features"].to(self.device) for e in models], dim=1)
            return score(a, None, b, train_weights=q.to(self.device), topk=topk, bottomk=bottomk)
        total = None
        for s, entry in zip(solved, models):  # one model's features at a time; fp32 products like `score`
            part = s.float() @ entry["features"].to(self.device).T
            total = part if total is None else total.add_(part)
        return total / len(models) * q.to(self.device, torch.float32)

    def self_score(self, *, damping=None) -> torch.Tensor:
        """τ(z_i)_i for every training example: its own score [n_train] (memorisation / noisy-label signal)."""
        models = self._checked_models()
        lam = self.damping if damping is None else damping
        total = 0
        for entry in models:
            phi = entry["features"].to(self.device)
            total = total + (self._solve(entry, phi, lam) * phi.double()).sum(-1)
        q = torch.stack([e["out_to_loss"] for e in models]).double().mean(0).to(self.device)
        return (total / len(models) * q).float()

    def _solve(self, entry, rows, damping):
        """(Φ_mᵀΦ_m + λI)⁻¹ applied to rows, for λ as `damping` says (see the constructor)."""
        gram = entry["gram"]
        if isinstance(damping, str):
            if damping != "auto":
                raise ValueError(f"damping: expected 'auto' or numbers, got {damping!r}")
            return gram.solve(rows, AUTO_DAMPING * gram.trace() / gram.count, relative=False)
        if torch.as_tensor(damping).numel() > 1 and isinstance(gram, GramAccumulator):
            gram.eigh()  # a sweep: one eigendecomposition, then every λ costs two products
        return gram.solve(rows, damping, relative=self.relative)

    def _checked_models(self):
        if not self._models:
            raise ValueError("featurize: call featurize(train_loader, checkpoints) before scoring")
        return self._models
