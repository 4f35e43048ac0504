"""Streaming Gram accumulation G = Σ_i φ_i φ_iᵀ over batches of features, and damped solves with G.

TRAK and the Gauss-Newton influence estimates need (ΦᵀΦ + λI)⁻¹ for features Φ [n, k] that arrive in batches
and may not fit in memory. The compiled kernels update only the lower triangle (half the flops of Φ_bᵀΦ_b),
with fp64 products and sums on the CPU. Damping is the knob users sweep most, so after one `eigh()` a solve
for any number of damping values costs two [k, k] products instead of a new factorisation. With fewer rows than
columns (n < k, e.g. groups of training points), `FeatureGram` keeps Φ itself and solves through the n×n kernel.
"""

from __future__ import annotations

import torch

from ._backend import module_and_runner
from ._checks import check_finite, check_int, check_like, check_matrix, check_tensor, dtype_name
from ._kernel_args import gram_update_args

GRAM_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rhs_rows(rhs, k: int, like: torch.Tensor) -> torch.Tensor:
    """rhs [r, k] or [k], checked (shape, dtype, device of `like`, finite), as float64 rows [r, k]."""
    if not isinstance(rhs, torch.Tensor):
        raise TypeError(f"rhs: expected a torch.Tensor of shape [r, k] or [k], got {type(rhs).__name__}")
    check_tensor("rhs", rhs, "[r, k] or [k]", 1 if rhs.dim() == 1 else 2, GRAM_INPUTS)
    if rhs.shape[-1] != k:
        raise ValueError(f"rhs: expected last dimension k == {k} (from the accumulator), got {list(rhs.shape)}")
    check_like("rhs", rhs, "the accumulator", like, same_dtype=False)
    check_finite("rhs", rhs)
    return rhs.reshape(-1, k).double()


def _damping_values(damping, relative: bool, scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Damping as a 1-D float64 tensor of absolute values (times `scale` when relative), all >= 0, and whether
    it was given as a sequence."""
    given = torch.as_tensor(damping, dtype=torch.float64)
    values = given.reshape(-1).to(scale.device)
    if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"damping: expected finite values >= 0, got {damping!r}")
    return (values * scale if relative else values), given.dim() > 0


class GramAccumulator:
    """Accumulate G = Σ φ φᵀ [k, k] from feature batches φ [b, k]; merge, all-reduce, finalize and solve.

    Equivalent to `G = Φ.double().T @ Φ.double()` for Φ all batches stacked, and `solve(rhs, λ)` to
    `torch.linalg.solve(G + λI, rhs.T).T`.

    Args:
        k: feature dimension. dtype: the accumulator, float64 (default) or float32 with Kahan compensation
            (fp32 storage, close to fp64 accuracy over many updates). device: where G lives; updates must come from
            there.
    Determinism: CPU updates are bitwise independent of the thread count (each entry sums rows in order);
    the order of updates and merges changes G only by fp64 rounding. CUDA sums f16/bf16 rows on tensor cores in
    fp32 slices of 256 rows, then in fp64.
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float64, device="cpu"):
        self.k = check_int("k", k, 0)
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype: expected float64 or float32 (Kahan-compensated), got {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self._g = torch.zeros((self.k, self.k), dtype=dtype, device=self.device)
        self._comp = torch.zeros_like(self._g) if dtype == torch.float32 else None
        self.count = 0
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._factors: dict[float, torch.Tensor] = {}  # Cholesky factors of G + λI by λ, until the next change
        self._lower: torch.Tensor | None = None  # mask of the lower triangle, made when first needed

    def update(self, phi: torch.Tensor) -> "GramAccumulator":
        """Add φᵀφ for a batch φ [b, k] (float32|float16|bfloat16|float64, on `device`); NaN/Inf raise."""
        check_matrix("phi", phi, "[b, k]", GRAM_INPUTS)
        if phi.shape[1] != self.k:
            raise ValueError(f"phi: expected shape [b, k] with k == {self.k} (from the accumulator), got {list(phi.shape)}")
        if phi.device != self.device:
            raise ValueError(f"phi: expected device {self.device} (that of the accumulator), got {phi.device}")
        check_finite("phi", phi)
        if self.k > 1 and phi.shape[0] > 0 and phi.stride(1) != 1:
            phi = phi.contiguous()
        module, run = module_and_runner("gram_update", "phi", self.device)
        run(gram_update_args(module, phi, self._g, self._comp))
        self.count += phi.shape[0]
        self._changed()
        return self

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        """Add another accumulator's G (same k, dtype and device) into this one, e.g. from another worker."""
        if not isinstance(other, GramAccumulator):
            raise TypeError(f"other: expected a GramAccumulator, got {type(other).__name__}")
        if (other.k, other.dtype, other.device) != (self.k, self.dtype, self.device):
            raise ValueError(f"other: expected k={self.k}, dtype {dtype_name(self.dtype)} on {self.device}, got "
                             f"k={other.k}, dtype {dtype_name(other.dtype)} on {other.device}")
        if self._comp is None:
            self._g += other._g
        else:
            self._set_exact(self._exact() + other._exact())
        self.count += other.count
        self._changed()
        return self

    def all_reduce(self, group=None) -> "GramAccumulator":
        """Sum G and the row count over the ranks of a torch.distributed `group` (every rank gets the total)."""
        import torch.distributed as dist

        total = self._exact()
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=group)
        dist.all_reduce(count, group=group)
        self._set_exact(total)
        self.count = int(count.item())
        self._changed()
        return self

    def finalize(self) -> torch.Tensor:
        """The symmetric G [k, k] in the accumulator's dtype (a new tensor; accumulation can go on)."""
        return self._symmetric().to(self.dtype)

    def trace(self) -> float:
        """trace(G) = Σ ‖φ‖² over all rows so far (float64 sum of the diagonal)."""
        diagonal = torch.diagonal(self._g).double()
        return float((diagonal if self._comp is None else diagonal - torch.diagonal(self._comp).double()).sum())

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending, [k]) and eigenvectors ([k, k], columns) of G in float64, cached until the next
        update; later solves use them for any damping."""
        if self._eig is None:
            self._eig = torch.linalg.eigh(self._symmetric())
        return self._eig

    def solve(self, rhs: torch.Tensor, damping=0.0, *, relative: bool = False) -> torch.Tensor:
        """(G + λI)⁻¹ applied to each row of rhs [r, k] (or to rhs [k]) for one λ or a sequence of them.

        Equivalent to `torch.linalg.solve(G + λ * I, rhs.T).T`, per λ.

        Args:
            rhs: [r, k] or [k] float tensor on `device`. damping: λ >= 0, a float or a sequence. relative: λ is
                damping × trace(G)/k (the mean eigenvalue), so one value suits features of any scale.
        Returns: rhs's shape in float64, with a leading [len(damping)] dimension when damping is a sequence. After
        `eigh()`, every λ costs two [k, k] x [k, r] products; without it, one Cholesky factorisation per λ, kept
        for later solves with the same λ until G changes.
        Raises: ValueError naming rhs or damping (bad shape, negative λ, or G + λI singular).
        """
        rows = _rhs_rows(rhs, self.k, self._g)
        scale = torch.tensor(self.trace() / max(self.k, 1), dtype=torch.float64, device=self.device)
        lambdas, many = _damping_values(damping, relative, scale)
        if self._eig is not None:
            values, vectors = self._eig
            coefficients = rows @ vectors
            shifted = values[None, :] + lambdas[:, None]
            self._check_nonsingular(bool((shifted <= 0).any()), damping)
            out = (coefficients[None] / shifted[:, None, :]) @ vectors.T
        else:
            solutions, g = [], None
            for lam in lambdas.tolist():
                if lam not in self._factors:  # G is mirrored only when a factor must be made
                    g = self._symmetric() if g is None else g
                    shifted = g.clone()
                    shifted.diagonal().add_(lam)
                    factor, info = torch.linalg.cholesky_ex(shifted)
                    self._check_nonsingular(bool(info != 0), damping)
                    self._factors[lam] = factor
                solutions.append(torch.cholesky_solve(rows.T, self._factors[lam]).T)
            out = torch.stack(solutions) if solutions else rows.new_zeros((0, *rows.shape))
        out = out.reshape(len(lambdas), *rhs.shape)
        return out if many else out[0]

    def inverse(self, damping=0.0, *, relative: bool = False) -> torch.Tensor:
        """(G + λI)⁻¹ [k, k] in float64 (a leading dimension per λ when damping is a sequence); see `solve`."""
        eye = torch.eye(self.k, dtype=torch.float64, device=self.device)
        return self.solve(eye, damping, relative=relative)

    def _changed(self) -> None:
        """G changed: drop the cached eigendecomposition and Cholesky factors."""
        self._eig = None
        self._factors.clear()

    def _check_nonsingular(self, singular: bool, damping) -> None:
        if singular:
            raise ValueError(f"damping: G + damping·I is singular or indefinite for damping={damping!r} "
                             f"(G has {self.count} rows for k={self.k}); use a damping > 0")

    def _exact(self) -> torch.Tensor:
        """G's lower-triangle storage as float64 (fp32 storage minus its Kahan compensation)."""
        return self._g.clone() if self._comp is None else self._g.double() - self._comp.double()

    def _set_exact(self, total: torch.Tensor) -> None:
        """Store a float64 total, keeping for fp32 storage what rounding lost as the new compensation."""
        if self._comp is None:
            self._g.copy_(total)
        else:
            self._g.copy_(total)
            self._comp.copy_(self._g.double() - total)

    def _symmetric(self) -> torch.Tensor:
        """The full symmetric G in float64, mirrored from the lower triangle the kernels maintain (one pass)."""
        exact = self._g if self._comp is None else self._exact()  # where() copies: no clone needed
        if self._lower is None:
            self._lower = torch.ones((self.k, self.k), dtype=torch.bool, device=self.device).tril_()
        return torch.where(self._lower, exact, exact.T)

    def __repr__(self) -> str:
        return f"GramAccumulator(k={self.k}, dtype={dtype_name(self.dtype)}, device={self.device}, count={self.count})"


class FeatureGram:
    """G = ΦᵀΦ for features Φ [n, k] with fewer rows than columns, solved through the n×n kernel ΦΦᵀ.

    Equivalent to `GramAccumulator(k).update(Φ)` for `count`, `trace` and `solve`, by Woodbury:
    (G + λI)⁻¹ = (I − Φᵀ(ΦΦᵀ + λI)⁻¹Φ) / λ, which costs O(n²k + n³) instead of O(nk² + k³). G has rank at most
    n < k, so only λ > 0 is solvable. Φ is kept in float64 (n·k ≤ k² elements: no more than G itself).
    """

    def __init__(self, features: torch.Tensor):
        check_matrix("features", features, "[n, k]", GRAM_INPUTS)
        if features.shape[0] >= features.shape[1]:
            raise ValueError(f"features: expected fewer rows than columns (n < k; else use GramAccumulator), got "
                             f"{list(features.shape)}")
        check_finite("features", features)
        self.features = features.double()
        self.count, self.k = features.shape
        self.device = features.device
        self._kernel = self.features @ self.features.T
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._factors: dict[float, torch.Tensor] = {}

    def trace(self) -> float:
        """trace(G) = trace(ΦΦᵀ) = Σ ‖φ‖²."""
        return float(torch.diagonal(self._kernel).sum())

    def solve(self, rhs: torch.Tensor, damping, *, relative: bool = False) -> torch.Tensor:
        """(G + λI)⁻¹ applied to each row of rhs [r, k] (or rhs [k]): as `GramAccumulator.solve`, for λ > 0.

        A sequence of λ goes through one eigendecomposition of ΦΦᵀ (cached); one λ through a Cholesky factor of
        ΦΦᵀ + λI (cached per λ).
        """
        rows = _rhs_rows(rhs, self.k, self.features)
        scale = torch.tensor(self.trace() / self.k, dtype=torch.float64, device=self.device)
        lambdas, many = _damping_values(damping, relative, scale)
        if bool((lambdas <= 0).any()):
            raise ValueError(f"damping: G = ΦᵀΦ of {self.count} rows for k = {self.k} is singular; expected damping "
                             f"> 0, got {damping!r}")
        coefficients = rows @ self.features.T  # [r, n]
        if many or self._eig is not None:
            if self._eig is None:
                self._eig = torch.linalg.eigh(self._kernel)
            values, vectors = self._eig
            inner = ((coefficients @ vectors)[None] / (values[None, :] + lambdas[:, None])[:, None, :]) @ vectors.T
        else:
            lam = float(lambdas[0])
            if lam not in self._factors:
                shifted = self._kernel.clone()
                shifted.diagonal().add_(lam)
                self._factors[lam] = torch.linalg.cholesky(shifted)
            inner = torch.cholesky_solve(coefficients.T, self._factors[lam]).T[None]
        out = (rows[None] - inner @ self.features) / lambdas[:, None, None]
        out = out.reshape(len(lambdas), *rhs.shape)
        return out if many else out[0]
