"""TRAK (Park et al., ICML 2023), composed from the primitives: projected gradients, Gram, ensemble, scoring.

Per model m (an independently trained model or a checkpoint): Φ_m [n, k] are the projected per-example gradients
of the task's output function f on the training set, K_m = (Φ_mᵀΦ_m + λI)⁻¹ (GramAccumulator), and Q_m [n] the
out-to-loss terms. The score of training example i for target z is

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
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .._batches import batch_size, model_args
from ..factored_projector import FactoredProjector
from ..gram import GramAccumulator
from ..param_layout import param_layout
from ..per_sample_grads import project_grads
from .._kernel_args import KIND_NAMES
from .._progress import Progress
from ..projection import Projector
from ..scoring import score
from ..store import FeatureStore
from ..tasks import Task

AUTO_DAMPING = 0.5  # "auto": λ = AUTO_DAMPING · trace(ΦᵀΦ)/n, see the module docstring


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


def _load(checkpoint, device):
    """A state_dict from a dict or a path (torch.load with weights_only)."""
    if isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return torch.load(checkpoint, map_location=device, weights_only=True)
    raise TypeError(f"checkpoints: expected state_dicts or paths, got {type(checkpoint).__name__}")


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
        if not isinstance(task, Task):
            raise TypeError(f"task: expected an attrprims.tasks.Task, got {type(task).__name__}")
        if kind not in (*KIND_NAMES, "factored"):
            raise ValueError(f"kind: expected one of {(*KIND_NAMES, 'factored')}, got {kind!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress: expected True or False, got {type(progress).__name__}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.task, self.path, self.progress = task, path, progress
        names = None if params is None else [p if isinstance(p, str) else _name_of(model, p) for p in params]
        self.params = names
        self.layout = param_layout(self.model, names)
        self.k = proj_dim
        if kind == "factored":
            k_out, k_in = _factors(proj_dim, factors)
            self.projector = FactoredProjector(self.layout.p, k_out, k_in, seed)
        else:
            self.projector = Projector(self.layout.p, proj_dim, seed, kind)
        self.damping, self.relative = damping, relative
        self.store_path = store
        self._models: list[dict] = []  # per checkpoint: features [n, k], out_to_loss [n], gram, state
        self._loaded = None  # the state_dict in self.model

    # ---- featurize ----------------------------------------------------------------------------------

    def featurize(self, train_loader: Iterable, checkpoints: Sequence) -> "TRAK":
        """Project the training set's gradients under every checkpoint; then each one's Gram matrix and Q.

        train_loader: re-iterable batches in a fixed order (not shuffled: rows are training example indices). It
            is read once for all checkpoints (a task whose `prepare` reads data, like CLIP's, reads it once more
            per checkpoint), each batch going through every checkpoint's weights in turn.
        checkpoints: state_dicts or paths, one per independently trained model (or training checkpoint); all
            are held in memory.
        """
        if not checkpoints:
            raise ValueError("checkpoints: expected at least one state_dict or path, got none")
        states = [_load(checkpoint, self.device) for checkpoint in checkpoints]
        tasks = []
        self._loaded = None
        for state in states:
            self._use(state)
            task = copy.deepcopy(self.task)  # per checkpoint: prepare may fit state (CLIP's reference embeddings)
            task.prepare(self.model, train_loader)
            tasks.append(task)
        if self.store_path is None:
            columns = self._featurize_memory(states, tasks, train_loader, "featurize", leave=True)
        else:
            columns = self._featurize_store(states, tasks, train_loader)
        self._models = []
        for state, task, (features, q) in zip(states, tasks, columns):
            gram = GramAccumulator(self.k, device=self.device)
            for start in range(0, features.shape[0], 4096):
                gram.update(features[start:start + 4096].to(self.device))
            self._models.append({"features": features, "out_to_loss": q, "gram": gram, "state": state, "task": task})
        return self

    def _use(self, state):
        """Load `state` into the private model unless it is the one loaded last."""
        if self._loaded is not state:
            self.model.load_state_dict(state)
            self.model.eval()
            self._loaded = state

    def _project_batch(self, task, batch):
        """Projected gradients [b, k] and out-to-loss terms [b] of one batch (on the device) under the loaded model."""
        phi = project_grads(self.model, task.output, batch, self.projector, params=self.params, inputs=task.inputs,
                            path=self.path)
        args, kwargs = model_args(task.inputs, batch)
        with torch.no_grad():
            q = task.out_to_loss(self.model(*args, **kwargs), batch)
        return phi, q.float()

    def _featurize_memory(self, states, tasks, loader, desc, leave=False):
        """[(features [n, k], out_to_loss [n])] per checkpoint, in one pass over `loader`."""
        phis, qs = [[] for _ in states], [[] for _ in states]
        with Progress(self.progress, _len(loader), desc, "batch", leave=leave) as bar:
            for batch in loader:
                batch = _to(batch, self.device)
                for m, (state, task) in enumerate(zip(states, tasks)):
                    self._use(state)
                    phi, q = self._project_batch(task, batch)
                    phis[m].append(phi.cpu())
                    qs[m].append(q.cpu())
                bar.update()
        if not phis[0]:
            raise ValueError(f"{'train_loader' if desc == 'featurize' else 'test_loader'}: expected at least one "
                             f"batch, got none")
        return [(torch.cat(p), torch.cat(q)) for p, q in zip(phis, qs)]

    def _featurize_store(self, states, tasks, loader):
        """Featurize the batches the store lacks for each checkpoint (batches are its blocks), then read all back."""
        n = _rows(loader)
        store = FeatureStore.open(self.store_path, n=n, arrays={"features": ([self.k], torch.float32),
                                                                "out_to_loss": ([], torch.float32)},
                                  projector=self.projector, layout=self.layout, output=self.task.name,
                                  extra={"task": self.task.config(), "params": self.params})
        ids = [f"model-{m}-{_digest(state)}" for m, state in enumerate(states)]
        done = [store.completed(model_id) for model_id in ids]
        start = 0
        with Progress(self.progress, _len(loader), "featurize", "batch") as bar:
            for batch in loader:
                stop = start + batch_size(batch)
                if stop > n:
                    raise ValueError(f"train_loader: yielded more than the {n} rows it had when the store was opened")
                todo = [m for m in range(len(states)) if stop > start and not any(a <= start and stop <= b
                                                                                  for a, b in done[m])]
                if todo:
                    batch = _to(batch, self.device)
                for m in todo:
                    self._use(states[m])
                    phi, q = self._project_batch(tasks[m], batch)
                    store.write(ids[m], start, {"features": phi, "out_to_loss": q})
                start = stop
                bar.update()
        if start != n:
            raise ValueError(f"train_loader: yielded {start} rows, expected {n} (its length when the store was opened)")
        return [(store.read(model_id, "features"), store.read(model_id, "out_to_loss")) for model_id in ids]

    # ---- score ----------------------------------------------------------------------------------------

    def target_features(self, test_loader: Iterable) -> list[torch.Tensor]:
        """φ_m(z) [m_test, k] for each model m: the targets' projected gradients of f."""
        models = self._checked_models()
        self._loaded = None
        columns = self._featurize_memory([e["state"] for e in models], [e["task"] for e in models], test_loader,
                                         "targets")
        return [features for features, _ in columns]

    def score(self, test_loader: Iterable, *, topk=None, bottomk=None, damping=None, targets=None):
        """Scores [m_test, n_train] (rows are targets), or a Ranked top/bottom-k per target.

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
        if torch.as_tensor(damping).numel() > 1:
            gram.eigh()  # a sweep: one eigendecomposition, then every λ costs two products
        return gram.solve(rows, damping, relative=self.relative)

    def _checked_models(self):
        if not self._models:
            raise ValueError("featurize: call featurize(train_loader, checkpoints) before scoring")
        return self._models


def _digest(state: dict) -> str:
    """16 hex digits of sha256 over a state_dict's names and bytes: a store never mixes two checkpoints' rows."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _name_of(model, tensor) -> str:
    for name, t in model.named_parameters():
        if t is tensor:
            return name
    raise ValueError("params: a tensor given is not a parameter of model")


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _rows(loader) -> int:
    """Rows a loader yields: its dataset's length for a plain sequential DataLoader, else counted in one pass."""
    batches = loader.batch_sampler if isinstance(loader, DataLoader) else None
    if isinstance(batches, BatchSampler) and isinstance(batches.sampler, SequentialSampler) and not batches.drop_last:
        return len(batches.sampler)
    return sum(batch_size(batch) for batch in loader)


def _len(loader):
    try:
        return len(loader)
    except TypeError:
        return None

