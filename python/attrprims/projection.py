"""Seeded chunked random projection: compress vectors of p coordinates (10^5..10^10) to k, one chunk at a time.

The matrix P [p, k] is defined by (seed, kind, k, s) alone. Entry P[r, c] is a pure function of
(seed, r, c) through Philox-4x32-10 (see src/cpp/attrprims/projection.h), so a chunk x[:, a:b] is
projected with rows a..b of P, chunks can be projected on different devices or machines and summed, and
P is never stored: kernels generate tiles of it on the fly.

Kinds (all scaled so that E||xP||^2 = ||x||^2):
- "rademacher": entries ±1/√k.
- "gaussian": entries N(0, 1)/√k (Box-Muller on 24-bit uniforms, so |entry| <= 5.77/√k).
- "sjlt": sparse JL; each row has s nonzeros ±1/√s, one in each of s near-equal column blocks.
  Default s = min(4, k): O(n·c·s) work instead of O(n·c·k).
"""

from __future__ import annotations

import torch

from ._backend import module_and_runner
from ._checks import check_finite as _check_finite
from ._checks import check_int, check_matrix, check_or_allocate_out, check_seed
from ._kernel_args import KIND_NAMES, materialize_args, project_args, projection_spec

DEFAULT_SJLT_S = 4
MAX_K = 2**31 - 1
MAX_ROWS = 2**62
# Version of the matrix definition; bumped if P for a given config ever changes.
MATRIX_FORMAT = 1


def _resolve_kind(kind: str, k, s) -> tuple[str, int, int]:
    if kind not in KIND_NAMES:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KIND_NAMES))}, got {kind!r}")
    k = check_int("k", k, 1, MAX_K)
    if kind == "sjlt":
        return kind, k, min(DEFAULT_SJLT_S, k) if s is None else check_int("s", s, 1, k)
    if s is not None:
        raise ValueError(f"s: only kind='sjlt' takes s (nonzeros per row of P), got s={s!r} with kind={kind!r}")
    return kind, k, 1


def _launch(entry, x, name, out_shape, out_dims, *, seed, kind, k, s, offset, c, out, accumulate, check_finite):
    x = x.detach()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if check_finite:
        _check_finite(name, x)
    out = check_or_allocate_out(out, out_shape, x.device, out_dims, accumulate)
    module, run = module_and_runner(entry, name, x.device)
    spec = projection_spec(module, seed, kind, k, s)
    run(project_args(module, spec, x, out, c=c, offset=offset, accumulate=accumulate))
    return out


def project(x, k, *, seed, kind="rademacher", s=None, offset=0, out=None, accumulate=False, check_finite=False):
    """Project the chunk x (columns offset..offset+c of longer vectors) to k dimensions.

    Equivalent to `x.float() @ Projector(p, k, seed, kind).matrix(slice(offset, offset + c))`.

    Args:
        x: [n, c] float32|float16|bfloat16, CPU or CUDA; any row stride (a non-unit column stride is copied).
        k: output dimension, >= 1. seed: integer in [0, 2^64). kind: "rademacher", "gaussian" or "sjlt".
        s: nonzeros per row of P, only for kind="sjlt" (default min(4, k)).
        offset: index of x's first column in the full vector. out: [n, k] float32 on x's device.
        accumulate: add into `out` instead of overwriting it. check_finite: raise on NaN/Inf in x.
    Returns: [n, k] float32 on x's device (`out` if given). Not differentiable (runs as under no_grad).
    Raises: TypeError/ValueError naming the bad argument; RuntimeError for a CUDA tensor without usable kernels.
    Determinism: P is bit-identical for a seed on every device, chunking and thread count. CPU outputs are
    bitwise independent of the thread count and of the other rows of the batch; a sum over chunks equals the
    whole vector's projection to float32 rounding. CUDA sjlt sums with atomics (order varies run to run).
    """
    kind, k, s = _resolve_kind(kind, k, s)
    seed = check_seed(seed)
    check_matrix("x", x, "[n, c]")
    n, c = x.shape
    offset = check_int("offset", offset, 0, MAX_ROWS - c)
    return _launch("project", x, "x", (n, k), "[n, k]", seed=seed, kind=kind, k=k, s=s, offset=offset, c=c, out=out,
                   accumulate=accumulate, check_finite=check_finite)


def project_transpose(y, p_chunk, *, seed, kind="rademacher", s=None, offset=0, out=None, accumulate=False,
                      check_finite=False):
    """Map projected vectors back: y [n, k] -> [n, p_chunk] through rows offset..offset+p_chunk of P.

    Equivalent to `y.float() @ Projector(p, k, seed, kind).matrix(slice(offset, offset + p_chunk)).T`,
    with k = y.shape[1]. Arguments, errors and determinism as in `project`; `out` is [n, p_chunk].
    """
    check_matrix("y", y, "[n, k]")
    n, k = y.shape
    kind, k, s = _resolve_kind(kind, k, s)
    seed = check_seed(seed)
    p_chunk = check_int("p_chunk", p_chunk, 0, MAX_ROWS)
    offset = check_int("offset", offset, 0, MAX_ROWS - p_chunk)
    return _launch("project_transpose", y, "y", (n, p_chunk), "[n, p_chunk]", seed=seed, kind=kind, k=k, s=s,
                   offset=offset, c=p_chunk, out=out, accumulate=accumulate, check_finite=check_finite)


class Projector:
    """A seeded projection P [p, k] of one kind: holds only its configuration, applies P chunk by chunk.

    Equivalent to multiplying by `self.matrix()`, which is never formed by __call__ or transpose. Two
    projectors with equal `config()` define the same matrix on every device; stores compare configs to
    refuse features made with another projection.
    """

    def __init__(self, p, k, seed=0, kind="rademacher", *, s=None):
        self.p = check_int("p", p, 1, MAX_ROWS)
        self.kind, self.k, self.s = _resolve_kind(kind, k, s)
        self.seed = check_seed(seed)

    def _s_arg(self):
        return self.s if self.kind == "sjlt" else None

    def _check_span(self, name: str, offset, length: int) -> int:
        offset = check_int("offset", offset, 0)
        if offset + length > self.p:
            raise ValueError(f"{name}: columns offset..offset+{length} = {offset}..{offset + length} exceed p = {self.p}")
        return offset

    def __call__(self, x, offset=0, *, out=None, accumulate=False, check_finite=False):
        """Project x [n, c] holding columns offset..offset+c of p-vectors: [n, k] float32 (see `project`)."""
        check_matrix("x", x, "[n, c]")
        offset = self._check_span("x", offset, x.shape[1])
        return project(x, self.k, seed=self.seed, kind=self.kind, s=self._s_arg(), offset=offset, out=out,
                       accumulate=accumulate, check_finite=check_finite)

    def transpose(self, y, offset=0, p_chunk=None, *, out=None, accumulate=False):
        """Map y [n, k] back to [n, p_chunk] through rows offset..offset+p_chunk (default: to the end)."""
        p_chunk = self.p - check_int("offset", offset, 0, self.p) if p_chunk is None else p_chunk
        offset = self._check_span("p_chunk", offset, check_int("p_chunk", p_chunk, 0))
        if isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] != self.k:
            raise ValueError(f"y: expected shape [n, k] with k == {self.k} (from projector), got {list(y.shape)}")
        return project_transpose(y, p_chunk, seed=self.seed, kind=self.kind, s=self._s_arg(), offset=offset, out=out,
                                 accumulate=accumulate)

    def matrix(self, rows=slice(None), *, device="cpu") -> torch.Tensor:
        """Materialise rows of P (a slice with step 1) as a float32 tensor [len, k]: for tests and debugging."""
        if not isinstance(rows, slice):
            raise TypeError(f"rows: expected a slice, got {type(rows).__name__}")
        start, stop, step = rows.indices(self.p)
        if step != 1:
            raise ValueError(f"rows: expected a slice with step 1, got step {step}")
        device = torch.device(device)
        out = torch.empty((max(0, stop - start), self.k), dtype=torch.float32, device=device)
        module, run = module_and_runner("materialize", "device", device)
        run(materialize_args(module, projection_spec(module, self.seed, self.kind, self.k, self.s), out, offset=start))
        return out

    def config(self) -> dict:
        """A JSON-serialisable description that determines P completely."""
        config = {"kind": self.kind, "p": self.p, "k": self.k, "seed": self.seed, "rng": "philox4x32-10",
                  "format": MATRIX_FORMAT}
        if self.kind == "sjlt":
            config["s"] = self.s
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Projector":
        """Rebuild the projector `config()` describes; refuses an unknown RNG or matrix format."""
        if config.get("rng") != "philox4x32-10" or config.get("format") != MATRIX_FORMAT:
            raise ValueError(f"config: expected rng 'philox4x32-10' and format {MATRIX_FORMAT}, got {config!r}")
        return cls(config["p"], config["k"], config["seed"], config["kind"], s=config.get("s"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Projector) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    def __repr__(self) -> str:
        extra = f", s={self.s}" if self.kind == "sjlt" else ""
        return f"Projector(p={self.p}, k={self.k}, seed={self.seed}, kind={self.kind!r}{extra})"
