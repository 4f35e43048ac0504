"""Score test examples against training examples through a kernel matrix, in blocks, with a fused top-k.

Attribution scores are bilinear: scores = φ_test K Φ_trainᵀ, each column j optionally weighted by w_j (TRAK's
out-to-loss term). With m test and n training examples, [m, n] is often too large to hold, and users want only
each row's most helpful and most harmful training examples: `topk`/`bottomk` keep those per row inside the
kernel, so the [m, n] matrix never exists. An ensemble's mean score over models is one pass over features
concatenated along k (see attrprims.ensemble).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import module_and_runner
from ._checks import FLOAT_INPUTS, check_finite, check_int, check_like, check_matrix, check_tensor
from ._kernel_args import score_topk_args

_FEATURES = (*FLOAT_INPUTS, torch.float64)
_BLOCK_ELEMENTS = 2**24  # training rows per block: about 64 MiB of float32 features


class Ranked(NamedTuple):
    """Per test row, the `topk` largest and `bottomk` smallest scores, best first, with training indices.

    values [m, t] float32 and indices [m, t] int64; None for a side that was not asked for.
    """

    top_values: torch.Tensor | None
    top_indices: torch.Tensor | None
    bottom_values: torch.Tensor | None
    bottom_indices: torch.Tensor | None


def _test_side(phi_test, K) -> torch.Tensor:
    """φ_test K as float32 [m, k] (the product in float64, since K is often an fp64 inverse)."""
    check_matrix("phi_test", phi_test, "[m, k]", _FEATURES)
    check_finite("phi_test", phi_test)
    if K is None:
        return phi_test.float().contiguous()
    k = phi_test.shape[1]
    check_matrix("K", K, "[k, k]", _FEATURES)
    if tuple(K.shape) != (k, k):
        raise ValueError(f"K: expected shape [k, k] with k == {k} (from phi_test), got {list(K.shape)}")
    check_like("K", K, "phi_test", phi_test, same_dtype=False)
    check_finite("K", K)
    return (phi_test.double() @ K.double()).float()


def score(phi_test, K, phi_train, *, train_weights=None, topk=None, bottomk=None, block=None):
    """Score every test row against every training row: φ_test K Φ_trainᵀ, columns weighted by train_weights.

    Equivalent to `s = (phi_test @ K @ phi_train.T) * train_weights`, then, with topk/bottomk,
    `s.topk(topk)` and `s.topk(bottomk, largest=False)` per row, ties going to the smaller training index.

    Args:
        phi_test: [m, k] float tensor. K: [k, k] float tensor on phi_test's device, or None for the identity.
        phi_train: [n, k] float32|float16|bfloat16|float64 on phi_test's device (a CPU tensor over a memmap is
            read block by block). train_weights: [n] float, or None.
        topk, bottomk: keep this many largest / smallest scores per row (<= n) instead of returning [m, n].
        block: training rows per step (default: about 2^24 elements of phi_train).
    Returns: scores [m, n] float32 (torch matmul per block), or a `Ranked` with values sorted best first.
    Raises: ValueError naming the argument (shapes, dtypes, devices, NaN/Inf, topk > n).
    Determinism: the fused top-k is bitwise reproducible and independent of thread count and block; its
    scores are fp32 dot products, equal to the dense path's to fp32 rounding.
    """
    a = _test_side(phi_test, K)
    m, k = a.shape
    check_matrix("phi_train", phi_train, "[n, k]", _FEATURES)
    n = phi_train.shape[0]
    if phi_train.shape[1] != k:
        raise ValueError(f"phi_train: expected shape [n, k] with k == {k} (from phi_test), got {list(phi_train.shape)}")
    check_like("phi_train", phi_train, "phi_test", phi_test, same_dtype=False)
    weights = None
    if train_weights is not None:
        check_tensor("train_weights", train_weights, "[n]", 1, _FEATURES)
        if train_weights.shape[0] != n:
            raise ValueError(f"train_weights: expected shape [n] with n == {n} (from phi_train), "
                             f"got {list(train_weights.shape)}")
        check_like("train_weights", train_weights, "phi_test", phi_test, same_dtype=False)
        check_finite("train_weights", train_weights)
        weights = train_weights.float().contiguous()
    block = check_int("block", block, 1) if block is not None else max(1, _BLOCK_ELEMENTS // max(k, 1))
    if topk is None and bottomk is None:
        return _dense(a, phi_train, weights, block)
    top = check_int("topk", topk, 0, n) if topk is not None else None
    bottom = check_int("bottomk", bottomk, 0, n) if bottomk is not None else None
    return _ranked(a, phi_train, weights, top, bottom, block)


def _blocks(phi_train: torch.Tensor, block: int):
    """(start, rows) over phi_train, rows checked finite and made kernel-ready (contiguous last dim, no fp64)."""
    for start in range(0, phi_train.shape[0], block):
        rows = phi_train[start:start + block]
        check_finite("phi_train", rows)
        if rows.dtype == torch.float64:
            rows = rows.float()
        if rows.shape[1] > 1 and rows.stride(1) != 1:
            rows = rows.contiguous()
        yield start, rows


def _dense(a, phi_train, weights, block) -> torch.Tensor:
    out = torch.empty((a.shape[0], phi_train.shape[0]), dtype=torch.float32, device=a.device)
    for start, rows in _blocks(phi_train, block):
        scores = a @ rows.float().T
        if weights is not None:
            scores *= weights[start:start + rows.shape[0]]
        out[:, start:start + rows.shape[0]] = scores
    return out


def _ranked(a, phi_train, weights, top: int | None, bottom: int | None, block: int) -> Ranked:
    """Running lists (index -1: empty), merged with each block by the kernel."""
    m, device = a.shape[0], a.device
    lists = [(torch.zeros((m, t or 0), dtype=torch.float32, device=device),
              torch.full((m, t or 0), -1, dtype=torch.int64, device=device)) for t in (top, bottom)]
    module, run = module_and_runner("score_topk", "phi_test", device)
    for start, rows in _blocks(phi_train, block):
        w = weights[start:start + rows.shape[0]] if weights is not None else None
        run(score_topk_args(module, a, rows, w, start, lists[0], lists[1]))
    (tv, ti), (bv, bi) = lists
    return Ranked(*((tv, ti) if top is not None else (None, None)), *((bv, bi) if bottom is not None else (None, None)))
