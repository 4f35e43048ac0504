"""Inverse-Hessian-vector products x = (H + λI)⁻¹v behind one interface, for a batch of vectors v [b, p].

`ihvp_solver(solver, operator, **options)` builds a solver by name; `.solve(v)` returns an `IHVPResult`.
The operator is a `HessianOperator` (attrprims.hvp), any object with `p`, `dtype`, `device` and a symmetric
`matvec([b, p]) -> [b, p]`, or a symmetric tensor [p, p]. Every solver takes `damping` λ >= 0 (default 0;
datainf picks one per parameter).

- "explicit": materialise H (p HVPs) or take the matrix; Cholesky of H + λI in float64.
- "cg": conjugate gradients on all b columns at once, each with its own step sizes; optional preconditioner.
- "lissa": the truncated Neumann recursion of Agarwal et al. (2017), one batch's HVP per step.
- "arnoldi": top-r eigenpairs of H from an Arnoldi iteration (Schioppa et al. 2022), inverted on their span.
- "ekfac": eigenvalue-corrected K-FAC (George et al. 2018) of the empirical Fisher, nn.Linear layers only.
- "datainf": DataInf (Kwon et al. 2024), a per-parameter Sherman–Morrison approximation of the empirical Fisher.

explicit, arnoldi, ekfac and datainf fit once, when built, and reuse the fit for every `solve`; cg and lissa
apply the operator on every solve. ekfac and datainf approximate the empirical Fisher w Σ_i g_i g_iᵀ of the
per-example loss gradients (w = 1/N or 1, as the operator's reduction), whatever the operator's kind.
If H + λI is not positive definite, explicit and arnoldi replace H's eigenvalues by their absolute values
(the saddle-free Newton choice of Dauphin et al. 2014) and warn; cg warns and stops the affected columns;
lissa raises when its iterates grow. Eigenvalues of (a modified) H + λI at or below size·eps·max are
pseudo-inverted (mapped to 0) rather than divided by, so a singular H with λ = 0 gives finite x.
Every solve runs as if under torch.no_grad(); x has the operator's dtype.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_finite, check_int, check_matrix
from .hvp import HessianOperator, check_losses, check_vectors
from ._batches import batch_size, model_args, requiring_grad
from .per_sample_grads import per_sample_grads

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class IHVPResult(NamedTuple):
    """A solve's output: x [b, p] (or [p] for v [p]); iterations, the batched operator applications this solve
    made (0 for the fit-once solvers); residual [b] (or []) float64, ‖(H + λI)x − v‖ / ‖v‖ (‖·‖ alone where
    v = 0), or None for solvers of an approximation of H (arnoldi, ekfac, datainf); converged [b] (or []) bool:
    residual <= tol for cg and lissa, x finite for the others."""

    x: torch.Tensor
    iterations: int
    residual: torch.Tensor | None
    converged: torch.Tensor


class IHVPSolver:
    """Base of the solvers: checks the operator, damping and v; subclasses implement `_solve(rows)`."""

    reports_residual = False

    def __init__(self, operator, damping):
        self.operator = _as_operator(operator)
        self.p, self.dtype, self.device = self.operator.p, self.operator.dtype, self.operator.device
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping < 0:
            raise ValueError(f"damping: expected a finite number >= 0, got {damping!r}")
        self.damping = float(damping)

    def solve(self, v) -> IHVPResult:
        """(H + λI)⁻¹v for v [b, p] or [p] (finite, on the operator's device); see IHVPResult."""
        rows, squeeze = check_vectors(v, self.p, self.dtype, self.device, "from the operator")
        if rows.shape[0] == 0:
            residual = rows.new_zeros(0, dtype=torch.float64) if self.reports_residual else None
            return IHVPResult(rows.clone(), 0, residual, torch.ones(0, dtype=torch.bool, device=self.device))
        with torch.no_grad():
            x, iterations, residual, converged = self._solve(rows)
        if squeeze:
            return IHVPResult(x[0], iterations, None if residual is None else residual[0], converged[0])
        return IHVPResult(x, iterations, residual, converged)

    def _solve(self, rows):
        raise NotImplementedError

    def _apply(self, rows: torch.Tensor, batch=None) -> torch.Tensor:
        """(H + λI) rows, or one batch's estimate of it."""
        hv = self.operator.matvec(rows) if batch is None else self.operator.matvec(rows, batch=batch)
        return hv + self.damping * rows

    def _relative(self, r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """‖r‖ / ‖v‖ per row in float64, ‖r‖ where v = 0."""
        v_norm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
        return torch.linalg.vector_norm(r, dim=1, dtype=torch.float64) / torch.where(v_norm > 0, v_norm, 1.0)


class ExplicitSolver(IHVPSolver):
    """Solve with H materialised [p, p] and factored once: Cholesky of H + λI in float64.

    Equivalent to `torch.linalg.solve(H + λI, v.T).T`.

    Args:
        operator: as `ihvp_solver`; a tensor is used as H, otherwise H's rows are p matvecs of the identity, `chunk`
            vectors at a time, symmetrised as (H + Hᵀ)/2. damping: λ >= 0.
    If H + λI is not positive definite, solves with Q(|Λ| + λI)⁺Qᵀ for H = QΛQᵀ instead and warns.
    Attributes: matrix, H as float64 [p, p]. Result: residual against H + λI; converged where x is finite.
    """

    reports_residual = True

    def __init__(self, operator, damping=0.0, chunk=256):
        super().__init__(operator, damping)
        chunk = check_int("chunk", chunk, 1)
        if isinstance(self.operator, _MatrixOperator):
            h = self.operator.matrix.double()
        else:
            eye = torch.eye(self.p, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                h = torch.cat([self.operator.matvec(eye[i:i + chunk]) for i in range(0, self.p, chunk)]).double()
        self.matrix = (h + h.T) / 2
        shifted = self.matrix + self.damping * torch.eye(self.p, dtype=torch.float64, device=self.device)
        self._factor, info = torch.linalg.cholesky_ex(shifted)
        self._eigen = None
        if int(info) != 0:
            values, vectors = torch.linalg.eigh(self.matrix)
            inverse, dropped = _inverse_values(values.abs(), self.damping, self.dtype)
            self._eigen = (inverse, vectors)
            warnings.warn(f"operator: H + λI is not positive definite (smallest eigenvalue "
                          f"{float(values[0]) + self.damping:.3g} with damping {self.damping:g}); solving with "
                          f"Q(|Λ| + λI)⁻¹Qᵀ, the absolute values of H's eigenvalues, instead"
                          f"{_dropped_note(dropped)}", UserWarning, stacklevel=3)

    def _solve(self, rows):
        v = rows.double()
        if self._eigen is None:
            x = torch.cholesky_solve(v.T, self._factor).T
        else:
            inverse, vectors = self._eigen
            x = ((v @ vectors) * inverse) @ vectors.T
        residual = self._relative(x @ self.matrix + self.damping * x - v, v)
        x = x.to(self.dtype)
        return x, 0, residual, torch.isfinite(x).all(1)


class CGSolver(IHVPSolver):
    """Solve by conjugate gradients, all columns of v at once, each with its own step sizes and stopping.

    Equivalent to `torch.linalg.solve(H + λI, v.T).T` for SPD H + λI, to `tol`.

    Args:
        operator: as `ihvp_solver`. damping: λ >= 0. tol: stop a column when ‖r‖ <= tol ‖v‖ (r = v − (H + λI)x).
        max_iter: most iterations (one batched matvec of the unfinished columns each).
        preconditioner: None, or a callable M [b, p] -> [b, p] approximating (H + λI)⁻¹, symmetric positive
            definite (e.g. `lambda r: ekfac.solve(r).x`).
    A column whose search direction d has dᵀ(H + λI)d <= 0 (H + λI not positive definite) stops, unconverged,
    with a warning. Result: residual is CG's recurrence residual (equal to the true one in exact arithmetic).
    """

    reports_residual = True

    def __init__(self, operator, damping=0.0, tol=1e-6, max_iter=100, preconditioner=None):
        super().__init__(operator, damping)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
        self.tol, self.max_iter = float(tol), check_int("max_iter", max_iter, 0)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(f"preconditioner: expected None or a callable [b, p] -> [b, p], got "
                            f"{type(preconditioner).__name__}")
        self.preconditioner = preconditioner

    def _precondition(self, r):
        return r if self.preconditioner is None else self.preconditioner(r).to(r.dtype)

    def _solve(self, rows):
        x, r = torch.zeros_like(rows), rows.clone()
        z = self._precondition(r)
        d, rz = z.clone(), (r * z).sum(1)
        residual = self._relative(r, rows)
        active = residual > self.tol
        curved = torch.zeros_like(active)
        iterations = 0
        while iterations < self.max_iter and bool(active.any()):
            idx = active.nonzero()[:, 0]
            ad = self._apply(d[idx])
            dad = (d[idx] * ad).sum(1)
            bad = dad <= 0
            alpha = torch.where(bad, 0.0, rz[idx] / torch.where(bad, 1.0, dad))
            x[idx] += alpha[:, None] * d[idx]
            r[idx] -= alpha[:, None] * ad
            residual[idx] = self._relative(r[idx], rows[idx])
            z = self._precondition(r[idx])
            rz_new = (r[idx] * z).sum(1)
            d[idx] = z + (rz_new / torch.where(rz[idx] != 0, rz[idx], 1.0))[:, None] * d[idx]
            rz[idx] = rz_new
            curved[idx] |= bad
            active[idx] = (residual[idx] > self.tol) & ~bad
            iterations += 1
        if bool(curved.any()):
            warnings.warn(f"operator: H + λI is not positive definite along a CG direction (dᵀ(H + λI)d <= 0) for "
                          f"rows {curved.nonzero()[:, 0].tolist()[:10]} of v; CG stopped there (add damping)",
                          UserWarning, stacklevel=3)
        return x, iterations, residual, residual <= self.tol


class LiSSASolver(IHVPSolver):
    """Solve by the LiSSA recursion h_j = v + h_{j-1} − (H + λI)h_{j-1}/scale, x = h_depth/scale, averaged over
    `repeats` runs.

    Equivalent to `(H + λI)⁻¹v` as depth -> ∞, when the eigenvalues of (H + λI)/scale lie in (0, 2).

    Args:
        operator: as `ihvp_solver`. damping: λ >= 0. depth: steps per repeat. repeats: runs averaged.
        scale: > λ_max(H + λI)/2 (convergence) and ≈ λ_max (speed); None estimates 1.1 λ_max by 20 power iterations
            on the full operator. tol: the residual under which a column counts as converged.
        sample_batches: for a HessianOperator with several batches, step j uses one batch's estimate of H
            (`matvec(v, batch)`), cycling through its batches (shuffle them in a DataLoader for random order);
            else every step uses the full H.
        seed: of the power iteration's start vector.
    Raises: ValueError naming scale when an iterate is not finite or ‖h_j‖ > 2(j + 1)‖v‖, which a convergent
    recursion never reaches (its steps shrink): (H + λI)/scale has an eigenvalue outside [0, 2].
    Result: iterations = depth·repeats; residual measured with one more full matvec.
    """

    reports_residual = True

    def __init__(self, operator, damping=0.0, depth=1000, scale=None, repeats=1, tol=1e-3, sample_batches=True,
                 seed=0):
        super().__init__(operator, damping)
        self.depth, self.repeats = check_int("depth", depth, 1), check_int("repeats", repeats, 1)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
        self.tol = float(tol)
        self.stochastic = bool(sample_batches) and isinstance(self.operator, HessianOperator) \
            and self.operator.num_batches > 1
        if scale is None:
            with torch.no_grad():
                scale = 1.1 * _largest_eigenvalue(self._apply, self.p, self.dtype, self.device, 20, seed)
            scale = scale if scale > 0 else 1.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def _solve(self, rows):
        batches = _cycle(self.operator.batches) if self.stochastic else itertools.repeat(None)
        v_norm = torch.linalg.vector_norm(rows, dim=1)
        total = torch.zeros_like(rows)
        for repeat in range(self.repeats):
            h = rows.clone()
            for j in range(1, self.depth + 1):
                h = rows + h - self._apply(h, next(batches)) / self.scale
                norm = torch.linalg.vector_norm(h, dim=1)
                if not bool(torch.isfinite(norm).all()) or bool((norm > 2 * (j + 1) * v_norm).any()):
                    raise ValueError(f"scale: LiSSA diverged at step {j} of repeat {repeat}: ‖h_j‖ grew past "
                                     f"2(j + 1)‖v‖, so (H + λI)/scale has eigenvalues outside (0, 2); raise scale "
                                     f"(got {self.scale:g}) above the largest eigenvalue of H + λI, or raise damping "
                                     f"(got {self.damping:g}) if H is indefinite")
            total += h
        x = total / (self.repeats * self.scale)
        residual = self._relative(self._apply(x) - rows, rows)
        return x, self.depth * self.repeats, residual, residual <= self.tol


class ArnoldiSolver(IHVPSolver):
    """Solve with H's top-`rank` eigenpairs (by |eigenvalue|), found once by Arnoldi iteration on the HVP.

    Equivalent to `U diag(1/(|μ| + λ)) Uᵀv` for the eigenpairs (μ [r], U [p, r]) of H (Schioppa et al. 2022); with
    subspace_only=False, plus (v − UUᵀv)/λ, which is exactly (U diag(|μ|)Uᵀ + λI)⁻¹v.

    Args:
        operator: as `ihvp_solver`. rank: r eigenpairs kept, 1 <= r <= p. damping: λ >= 0.
        max_iter: Arnoldi steps (one single-vector matvec each, with full reorthogonalisation), rank <= max_iter
            <= p; default min(p, 2·rank + 10). A Krylov space that closes early restarts from a fresh random
            direction orthogonal to it, so repeated eigenvalues are found too.
        subspace_only: drop v's part outside the span of U (Schioppa et al.), or scale it by 1/λ (needs λ > 0).
        seed: of the start vector.
    Negative eigenvalues among the kept ones are replaced by their absolute values (with a warning, unless
    they are rounding-sized: above -p·eps·max|μ|).
    Attributes: eigenvalues [r] float64 (descending |μ|), eigenvectors [r, p] (rows, the operator's dtype).
    """

    def __init__(self, operator, rank, damping=0.0, max_iter=None, subspace_only=True, seed=0):
        super().__init__(operator, damping)
        rank = check_int("rank", rank, 1, self.p)
        steps = check_int("max_iter", min(self.p, 2 * rank + 10) if max_iter is None else max_iter, rank, self.p)
        if not subspace_only and self.damping == 0:
            raise ValueError("damping: subspace_only=False scales v's part outside the eigenvectors' span by 1/λ, so "
                             "it needs damping > 0 (or pass subspace_only=True)")
        self.subspace_only = bool(subspace_only)
        with torch.no_grad():
            values, vectors = _arnoldi(self.operator.matvec, self.p, steps, seed, self.dtype, self.device)
        order = values.abs().argsort(descending=True)[:rank]
        self.eigenvalues, self.eigenvectors = values[order], vectors[order]
        rounding = self.p * torch.finfo(self.dtype).eps * float(self.eigenvalues.abs().max())
        if bool((self.eigenvalues < -rounding).any()):
            warnings.warn(f"operator: H has negative eigenvalues among its top {rank} "
                          f"(down to {float(self.eigenvalues.min()):.3g}); using their absolute values",
                          UserWarning, stacklevel=3)
        inverse, dropped = _inverse_values(self.eigenvalues.abs(), self.damping, self.dtype)
        self._inverse = inverse.to(self.dtype)
        if dropped:
            warnings.warn(f"operator: H + λI is singular on the top-{rank} eigenvectors' span{_dropped_note(dropped)}",
                          UserWarning, stacklevel=3)

    def _solve(self, rows):
        coefficients = rows @ self.eigenvectors.T
        x = (coefficients * self._inverse) @ self.eigenvectors
        if not self.subspace_only:
            x += (rows - coefficients @ self.eigenvectors) / self.damping
        return x, 0, None, torch.isfinite(x).all(1)


class EKFACSolver(IHVPSolver):
    """Solve with the eigenvalue-corrected Kronecker factors (EK-FAC) of each selected nn.Linear layer.

    Equivalent to `(F_l + λI)⁻¹v_l` per layer l with F_l = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ, where Q_A, Q_S are the
    eigenvectors of A = Σ ã ãᵀ and S = Σ δ δᵀ (ã the layer's input with a 1 appended when its bias is
    selected, δ its output gradient, summed over examples and tokens) and Λ = w Σ_i (Q_Sᵀ G_i Q_A)² with G_i
    = Σ_t δ_t ã_tᵀ example i's gradient of [weight | bias] (George et al. 2018; w as the reduction).

    Args:
        operator: a HessianOperator whose parameters are all weights/biases of nn.Linear layers (stock forward,
            batch-first inputs, any token dimensions; a layer may run several times per forward). damping: λ >= 0.
    Two passes over the batches when built (one for A and S, one for Λ); factors in float64.
    Raises: TypeError naming operator (not a HessianOperator); ValueError naming params (a selected parameter of
    another layer, or shared by several) or model (a selected layer never called, or non-batch-first input).
    """

    def __init__(self, operator, damping=0.0):
        super().__init__(operator, damping)
        op = _model_operator(self.operator, "ekfac")
        self._blocks = _linear_blocks(op)
        for calls in _linear_signals(op, self._blocks):
            for block, pairs in zip(self._blocks, calls):
                for a, delta in pairs:
                    block.a += torch.einsum("nti,ntj->ij", a, a)
                    block.s += torch.einsum("nti,ntj->ij", delta, delta)
        for block in self._blocks:
            block.q_a = torch.linalg.eigh(block.a)[1]
            block.q_s = torch.linalg.eigh(block.s)[1]
            block.values = block.a.new_zeros(block.s.shape[0], block.a.shape[0])
        for calls in _linear_signals(op, self._blocks):
            for block, pairs in zip(self._blocks, calls):
                if pairs:
                    rotated = sum(torch.einsum("nto,nti->noi", delta @ block.q_s, a @ block.q_a) for a, delta in pairs)
                    block.values += (rotated ** 2).sum(0)
        for block in self._blocks:
            if op.reduction == "mean":
                block.values /= op.count
            inverse, _ = _inverse_values(block.values, self.damping, self.dtype)
            block.inverse = inverse.to(self.dtype)
            block.q_a, block.q_s = block.q_a.to(self.dtype), block.q_s.to(self.dtype)

    def _solve(self, rows):
        x = torch.empty_like(rows)
        for block in self._blocks:
            v = block.gather(rows)
            rotated = block.q_s.T @ v @ block.q_a
            block.scatter(x, block.q_s @ (rotated * block.inverse) @ block.q_a.T)
        return x, 0, None, torch.isfinite(x).all(1)


class DataInfSolver(IHVPSolver):
    """Solve with DataInf's closed form: per parameter, the mean over examples of Sherman–Morrison inverses.

    Equivalent to `x_l = (v_l − (1/N) Σ_i g_il (g_ilᵀ v_l) / (λ_l/c + ‖g_il‖²)) / λ_l`, with g_il example i's
    gradient of parameter l and c = 1 (reduction "mean") or N ("sum"): Sherman–Morrison applied to each term of
    F_l = (c/N) Σ_i g_il g_ilᵀ and the inverses averaged (Kwon et al. 2024). Exact for N = 1; close to
    (F_l + λ_l I)⁻¹ when λ_l is large against ‖g_il‖²·c/N; the parameters' blocks of F are inverted separately.

    Args:
        operator: a HessianOperator. damping: λ > 0 for every parameter, or None for Kwon et al.'s 0.1 × the mean
            eigenvalue of each parameter's block, trace(F_l)/d_l. path: per_sample_grads's path.
    Keeps all N × p per-example gradients (they enter every solve). Attributes: layer_damping, name -> λ_l.
    Raises: ValueError naming damping when it is 0, or None for a parameter whose gradients are all zero.
    """

    def __init__(self, operator, damping=None, path="generic"):
        super().__init__(operator, 0.0 if damping is None else damping)
        op = _model_operator(self.operator, "datainf")
        if damping is not None and self.damping == 0:
            raise ValueError("damping: expected > 0 for datainf, whose approximation divides by it (None picks "
                             "0.1 × the mean eigenvalue of each parameter's block)")
        grads = torch.cat([per_sample_grads(op.model, op.loss_fn, batch, params=op.layout.names, inputs=op.inputs,
                                            path=path, flat=True) for batch in op.batches]).to(self.dtype)
        self._n, c = grads.shape[0], (grads.shape[0] if op.reduction == "sum" else 1)
        self._blocks, self.layer_damping = [], {}
        for name, offset in zip(op.layout.names, op.layout.offsets):
            g = grads[:, offset:offset + op.layout.numel(name)]
            squares = (g.double() ** 2).sum(1)
            lam = 0.1 * c * float(squares.mean()) / g.shape[1] if damping is None else self.damping
            if not lam > 0:
                raise ValueError(f"damping: the default is 0 for {name!r}, whose per-example gradients are all zero; "
                                 "pass damping > 0")
            self.layer_damping[name] = lam
            self._blocks.append((slice(offset, offset + g.shape[1]), g, (lam / c + squares).to(self.dtype), lam))

    def _solve(self, rows):
        x = torch.empty_like(rows)
        for where, g, denominator, lam in self._blocks:
            v = rows[:, where]
            x[:, where] = (v - ((v @ g.T) / denominator) @ g / self._n) / lam
        return x, 0, None, torch.isfinite(x).all(1)


SOLVERS = {"explicit": ExplicitSolver, "cg": CGSolver, "lissa": LiSSASolver, "arnoldi": ArnoldiSolver,
           "ekfac": EKFACSolver, "datainf": DataInfSolver}


def ihvp_solver(solver, operator, **options) -> IHVPSolver:
    """Build the IHVP solver named `solver` over `operator`; its `.solve(v)` returns (H + λI)⁻¹v as an IHVPResult.

    Equivalent to `SOLVERS[solver](operator, **options)`.

    Args:
        solver: "explicit", "cg", "lissa", "arnoldi", "ekfac" or "datainf" (module docstring; options in each class).
        operator: HessianOperator; or an object with p, dtype, device and symmetric matvec([b, p]) -> [b, p]; or
            a symmetric float tensor [p, p]. ekfac and datainf need a HessianOperator.
        options: the solver's keyword arguments, e.g. damping=λ, tol, max_iter, rank.
    Raises: ValueError naming solver (unknown; lists the valid ones), operator, or the option at fault.
    Determinism: equal inputs give equal results on a device (seeded start vectors for arnoldi and lissa's scale).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    return SOLVERS[solver](operator, **options)


class _MatrixOperator:
    """A symmetric tensor [p, p] as an operator."""

    def __init__(self, matrix: torch.Tensor):
        check_matrix("operator", matrix, "[p, p]", _FLOATS)
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"operator: expected a square matrix [p, p], got {list(matrix.shape)}")
        check_finite("operator", matrix)
        asymmetry = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
        if asymmetry > 1e3 * torch.finfo(matrix.dtype).eps * max(float(matrix.abs().max()), 1e-300):
            raise ValueError(f"operator: expected a symmetric matrix, got max |H - Hᵀ| = {asymmetry:.3g}")
        self.matrix, self.p, self.dtype, self.device = matrix.detach(), matrix.shape[0], matrix.dtype, matrix.device

    def matvec(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.matrix


def _as_operator(operator):
    if isinstance(operator, torch.Tensor):
        return _MatrixOperator(operator)
    missing = [name for name in ("p", "dtype", "device", "matvec") if not hasattr(operator, name)]
    if missing:
        raise TypeError(f"operator: expected a HessianOperator, an object with p, dtype, device and matvec, or a "
                        f"tensor [p, p]; got {type(operator).__name__} without {', '.join(missing)}")
    return operator


def _model_operator(operator, solver: str) -> HessianOperator:
    if not isinstance(operator, HessianOperator):
        raise TypeError(f"operator: {solver} needs a HessianOperator (model, loss and batches for per-example "
                        f"gradients), got {type(operator).__name__}")
    return operator


def _inverse_values(values: torch.Tensor, damping: float, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """1/(values + λ) for values >= 0, with 0 where values + λ <= size·eps(dtype)·max (pseudo-inverse); and how
    many were so dropped."""
    shifted = values.double() + damping
    cutoff = shifted.numel() * torch.finfo(dtype).eps * float(shifted.max()) if shifted.numel() else 0.0
    keep = shifted > cutoff
    return torch.where(keep, 1 / torch.where(keep, shifted, 1.0), 0.0), int((~keep).sum())


def _dropped_note(dropped: int) -> str:
    return f"; {dropped} eigenvalue(s) of H + λI at ~0 are pseudo-inverted (mapped to 0)" if dropped else ""


def _cycle(batches):
    """The batches over and over, re-iterating each time (so a shuffling DataLoader reshuffles; nothing is kept)."""
    while True:
        yield from batches


def _largest_eigenvalue(apply, p, dtype, device, steps: int, seed: int) -> float:
    """‖A u‖ after `steps` power iterations from a seeded random unit u: a lower bound on |λ|max of A."""
    u = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(device)
    estimate = 0.0
    for _ in range(steps):
        w = apply((u / torch.linalg.vector_norm(u))[None])[0]
        estimate = float(torch.linalg.vector_norm(w))
        if not estimate > 0:
            return 0.0
        u = w
    return estimate


def _arnoldi(matvec, p, steps, seed, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values [steps] float64 and vectors [steps, p] of the symmetric operator on a `steps`-dim Krylov space
    (restarted from a fresh random direction wherever it closes), with two Gram–Schmidt passes per step."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps

    def fresh(basis):
        r = torch.randn(p, generator=generator, dtype=torch.float64).to(dtype).to(device)
        for _ in range(2):
            r = r - (basis @ r) @ basis
        return r / torch.linalg.vector_norm(r)

    basis = torch.zeros(steps, p, dtype=dtype, device=device)
    hessenberg = torch.zeros(steps, steps, dtype=torch.float64)
    basis[0] = fresh(basis[:0])
    for j in range(steps):
        w = matvec(basis[j:j + 1])[0].to(dtype)
        size = torch.linalg.vector_norm(w)
        coefficients = torch.zeros(j + 1, dtype=dtype, device=device)
        for _ in range(2):
            c = basis[:j + 1] @ w
            w = w - c @ basis[:j + 1]
            coefficients += c
        hessenberg[:j + 1, j] = coefficients.double().cpu()
        if j + 1 == steps:
            break
        beta = torch.linalg.vector_norm(w)
        if float(beta) > p * eps * float(size):
            hessenberg[j + 1, j] = float(beta)
            basis[j + 1] = w / beta
        else:  # an invariant subspace: go on from a new direction
            basis[j + 1] = fresh(basis[:j + 1])
    values, vectors = torch.linalg.eigh((hessenberg + hessenberg.T) / 2)
    return values.to(device), vectors.T.to(dtype).to(device) @ basis


class _LinearBlock:
    """A Linear layer's selected [weight | bias] as a [d_out, d_in (+1)] matrix in the flat layout."""

    def __init__(self, module: nn.Linear, weight: int | None, bias: int | None, device):
        self.module, self.weight, self.bias = module, weight, bias
        # Fitted by EKFACSolver: eigenvectors of A and S, corrected eigenvalues Λ [d_out, width], 1/(Λ + λ).
        self.q_a = self.q_s = self.values = self.inverse = None
        width = (module.in_features if weight is not None else 0) + (bias is not None)
        self.a = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.s = torch.zeros(module.out_features, module.out_features, dtype=torch.float64, device=device)

    def extend(self, a: torch.Tensor) -> torch.Tensor:
        """ã [n, T, width] in float64 from the input a [n, T, d_in]."""
        parts = [a.double()] if self.weight is not None else []
        if self.bias is not None:
            parts.append(a.new_ones((*a.shape[:2], 1), dtype=torch.float64))
        return torch.cat(parts, 2)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        b, d_out, d_in = rows.shape[0], self.module.out_features, self.module.in_features
        parts = [] if self.weight is None else [rows[:, self.weight:self.weight + d_out * d_in].reshape(b, d_out, d_in)]
        if self.bias is not None:
            parts.append(rows[:, self.bias:self.bias + d_out, None])
        return torch.cat(parts, 2)

    def scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        b, d_out, d_in = x.shape[0], self.module.out_features, self.module.in_features
        if self.weight is not None:
            out[:, self.weight:self.weight + d_out * d_in] = x[:, :, :d_in].reshape(b, -1)
        if self.bias is not None:
            out[:, self.bias:self.bias + d_out] = x[:, :, -1]


def _linear_blocks(op: HessianOperator) -> list[_LinearBlock]:
    """The selected Linear layers, each owning its selected weight/bias; every selected parameter must be one."""
    offsets = dict(zip(op.layout.names, op.layout.offsets))
    name_of = {id(t): name for name, t in op.model.named_parameters()}
    blocks, owner = [], {}
    for module_name, m in op.model.named_modules():
        if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
            continue
        mine = {local: name_of[id(t)] for local, t in m.named_parameters(recurse=False) if name_of[id(t)] in offsets}
        for name in mine.values():
            if name in owner:
                raise ValueError(f"params: {name!r} is shared by layers {owner[name]!r} and {module_name!r}; ekfac "
                                 "needs one layer per parameter")
            owner[name] = module_name
        if mine:
            blocks.append(_LinearBlock(m, offsets.get(mine.get("weight")), offsets.get(mine.get("bias")), op.device))
    others = [name for name in op.layout.names if name not in owner]
    if others:
        raise ValueError(f"params: ekfac covers weights and biases of nn.Linear layers only; select none of "
                         f"{', '.join(map(repr, others[:10]))}")
    return blocks


def _linear_signals(op: HessianOperator, blocks: list[_LinearBlock]):
    """Per batch, per block: [(ã [n, T, width] float64, δ [n, T, d_out] float64) per call of the layer]."""
    tensors = dict(op.model.named_parameters())
    targets = [tensors[name] for name in op.layout.names]
    called = [False] * len(blocks)
    for batch in op.batches:
        n = batch_size(batch)
        calls = [[] for _ in blocks]

        def hook(i):
            def forward_hook(m, args, output):
                called[i] = True
                a = args[0].detach()
                if a.dim() == 0 or a.shape[0] != n:
                    raise ValueError(f"model: a Linear layer got an input of shape {list(a.shape)}, whose first "
                                     f"dimension is not the batch's n = {n}; ekfac needs batch-first activations")
                a = blocks[i].extend(a.reshape(n, -1, m.in_features))
                output.register_hook(lambda delta: calls[i].append(
                    (a, delta.detach().double().reshape(n, -1, m.out_features))))
            return forward_hook

        handles = [block.module.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
        try:
            with torch.enable_grad(), requiring_grad(targets):
                args, kwargs = model_args(op.inputs, batch)
                losses = check_losses(op.loss_fn(op.model(*args, **kwargs), batch), n)
                if losses.requires_grad:
                    torch.autograd.grad(losses.sum(), targets, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        yield calls
    silent = [name for name, m in op.model.named_modules() for block, seen in zip(blocks, called)
              if block.module is m and not seen]
    if silent:
        raise ValueError(f"model: the Linear layer(s) {', '.join(map(repr, silent))} were never called in a forward "
                         "pass (their weights are used some other way), so ekfac cannot see their inputs")
