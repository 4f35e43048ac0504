"""Influence functions (Koh & Liang, ICML 2017) with any of the IHVP solvers, flat or in a projected space.

For checkpoints m, the score of training example i for target z is

    τ(z)_i = mean_m ∇L_m(z)ᵀ (H_m + λI)⁻¹ ∇L_m(x_i),

with L the task's per-example training loss (`Task.loss`) and H_m the curvature of the mean training loss at
checkpoint m. Sign: positive means x_i helps z. Koh & Liang's influence of up-weighting x_i on z's loss,
I_up,loss(x_i, z) = −∇L(z)ᵀH⁻¹∇L(x_i), is −τ(z)_i: removing x_i changes z's loss by about +τ(z)_i / n, so a
helpful example (τ > 0) is one whose removal raises z's loss. Every method in attrprims.methods scores this way.

Curvature:
- flat gradients (proj_dim None): "hessian" or "ggn" of the mean training loss through `HessianOperator`, with
  every solver of attrprims.ihvp ("explicit", "cg", "lissa", "arnoldi", "ekfac", "datainf"); or "fisher", the
  empirical Fisher GᵀG/n of the training gradients G, as a [p, p] matrix (explicit, cg, arnoldi).
- projected gradients (proj_dim = k): the empirical Fisher of the projected gradients, ΦᵀΦ/n [k, k] (as LoGra and
  dattri's projected IF do), with "explicit", "cg" or "arnoldi": the k×k problem replaces the p×p one.
  With fewer training rows (examples or groups) n than dimensions d and damping > 0, "explicit" solves through the
  n×n kernel instead (`FeatureGram`, Woodbury): (GᵀG/n + λI)⁻¹ = n (GᵀG + nλI)⁻¹, the same values.

Groups (GGDA, `featurize(..., groups=ids)`): a group's gradient is the sum of its members' loss gradients, so under
the "hessian"/"ggn" curvature (of the whole training loss, unchanged) its score is exactly the sum of theirs; the
"fisher" curvature is then the empirical Fisher of the group gradients (groups taken as the data points, as GGDA
does), which costs G instead of n outer products.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch

from .._group_rows import Groups
from ..gram import FeatureGram
from ..hvp import HessianOperator
from ..ihvp import SOLVERS, ihvp_solver
from ..scoring import score
from ..tasks import Task
from ._checkpoints import CheckpointRunner
from ._gradients import GradientFeatures

CURVATURES = ("hessian", "ggn", "fisher")
_MATRIX_SOLVERS = ("explicit", "cg", "arnoldi")  # the solvers that take a [d, d] matrix as their operator


class InfluenceFunction:
    """Influence functions behind featurize / score / self_score (see the module docstring for the estimator).

    Args:
        model: nn.Module (its architecture; each checkpoint's weights are loaded into a private copy).
        task: a Task; its `loss` is differentiated.
        solver: an attrprims.ihvp solver name. damping: λ >= 0 added to the curvature (absolute).
        curvature: "hessian", "ggn" or "fisher" (default "hessian" for flat gradients, "fisher" when projected).
        solver_options: further keyword arguments of the solver (tol, max_iter, rank, depth, ...).
        proj_dim, seed, kind, factors: project the gradients to k dimensions (default None: flat).
        params: the parameters attributed (names or tensors; default all that require grad; e.g. the last layer).
        device: where gradients are computed (default: the model's). path: "layer" or "generic" gradients.
        progress: tqdm bars over the batches when stderr is a terminal.
    The training loader must be re-iterable and already on the device for the flat "hessian"/"ggn" curvature
    (HessianOperator reads it on every matvec). Memory: the training gradients, n × (p or k) float32 per checkpoint;
    "explicit" and "fisher" hold a [d, d] float64 matrix per checkpoint.
    """

    def __init__(self, model, task: Task, *, solver="explicit", damping=1e-3, curvature=None, solver_options=None,
                 proj_dim=None, seed=0, kind="rademacher", factors=None, params=None, device=None, path="layer",
                 progress=True):
        curvature = curvature or ("hessian" if proj_dim is None else "fisher")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature: expected one of {CURVATURES}, got {curvature!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {tuple(SOLVERS)}, got {solver!r}")
        if proj_dim is not None and curvature != "fisher":
            raise ValueError(f"curvature: projected gradients use the empirical Fisher of the projection ('fisher'), "
                             f"got {curvature!r}")
        if curvature == "fisher" and solver not in _MATRIX_SOLVERS:
            raise ValueError(f"solver: the 'fisher' curvature is a matrix; expected one of {_MATRIX_SOLVERS}, got "
                             f"{solver!r}")
        self.runner = CheckpointRunner(model, task, device, progress)
        self.grads = GradientFeatures(model, params=params, proj_dim=proj_dim, seed=seed, kind=kind, factors=factors,
                                      path=path)
        self.solver, self.damping, self.curvature = solver, damping, curvature
        self.solver_options = dict(solver_options or {})
        self._train: list[torch.Tensor] = []  # per checkpoint: training loss gradients [n, d]
        self._solvers: list = []

    def featurize(self, train_loader: Iterable, checkpoints: Sequence, *, groups=None):
        """Training loss gradients under every checkpoint (one pass over the data), then each one's solver fit.

        groups: ids [n_train] of a partition into G groups (attrprims.groups): score groups, by summed gradients.
        """
        groups = None if groups is None else Groups(groups)
        self.runner.load(checkpoints, train_loader)
        self.grads.plan(groups, len(checkpoints))
        columns = self.runner.collect(train_loader, self._gradients, desc="featurize", argument="train_loader",
                                      leave=True, groups=groups)
        self._train = [self.grads.finish(column["grads"], self.runner.device) for column in columns]
        self._solvers = [self._fit(m, train_loader) for m in range(len(self._train))]
        return self

    def score(self, test_loader: Iterable, *, topk=None, bottomk=None):
        """Scores [m_test, n_train] ([m_test, G] with groups; rows are targets), or a Ranked top/bottom-k per target
        (one fused pass)."""
        self._checked()
        columns = self.runner.collect(test_loader, self._gradients, desc="targets", argument="test_loader")
        device = self.runner.device
        solved = [self._solve(m, column["grads"]) / len(columns) for m, column in enumerate(columns)]
        a = torch.cat(solved, dim=1).to(device, torch.float32)
        b = torch.cat(self._train, dim=1).to(device)
        return score(a, None, b, topk=topk, bottomk=bottomk)

    def self_score(self) -> torch.Tensor:
        """τ(x_i)_i = mean_m ∇L_m(x_i)ᵀ(H_m + λI)⁻¹∇L_m(x_i) [n_train]: one solve per training example."""
        self._checked()
        total = 0
        for m, g in enumerate(self._train):
            total = total + (self._solve(m, g).double() * g.to(self.runner.device).double()).sum(-1)
        return (total / len(self._train)).float()

    def _gradients(self, task, batch, local=None):
        return {"grads": self.grads(self.runner.model, task.loss, batch, task.inputs, groups=local)}

    def _fit(self, m, train_loader):
        """The IHVP solver of checkpoint m: on a matrix (empirical Fisher), through the kernel of its rows (see the
        module docstring), or on a model copy's HessianOperator."""
        if self.curvature == "fisher":
            g = self._train[m].to(self.runner.device).double()
            if self.solver == "explicit" and g.shape[0] < g.shape[1] and self.damping > 0:
                return FeatureGram(g)
            operator = g.T @ g / g.shape[0]
        else:
            self.runner.use(m)
            model = copy.deepcopy(self.runner.model)  # the operator keeps its model for every later matvec
            task = self.runner.tasks[m]
            operator = HessianOperator(model, task.loss, train_loader, params=self.grads.names, kind=self.curvature,
                                       inputs=task.inputs)
        return ihvp_solver(self.solver, operator, damping=self.damping, **self.solver_options)

    def _solve(self, m, rows):
        solver = self._solvers[m]
        if isinstance(solver, FeatureGram):
            n = solver.count
            return n * solver.solve(rows.to(solver.device, torch.float64), n * self.damping)
        return solver.solve(rows.to(solver.device, solver.dtype)).x

    def _checked(self):
        if not self._train:
            raise ValueError("featurize: call featurize(train_loader, checkpoints) before scoring")
