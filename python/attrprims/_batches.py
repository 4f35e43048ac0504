"""How a batch is read: its size, the model's arguments for it, and gradients for frozen parameters.

Shared by the per-sample gradient paths and the curvature operators, which read batches the same way: a
tensor, a tuple (inputs first) or a mapping (keyword arguments), or any layout through `inputs=`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch.utils import _pytree as pytree


def batch_size(batch) -> int:
    """n, the first dimension every tensor of `batch` shares (its examples)."""
    leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError(f"batch: expected tensors with one row per example, got {type(batch).__name__} with none")
    for t in leaves:
        if t.dim() == 0 or t.shape[0] != leaves[0].shape[0]:
            raise ValueError(f"batch: every tensor must have the examples as its first dimension (n = "
                             f"{leaves[0].shape[0]} from the first), got shape {list(t.shape)}")
    return leaves[0].shape[0]


def model_args(inputs, batch) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model call for `batch`."""
    x = batch if inputs is None else inputs(batch)
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return ((x[0],), {}) if inputs is None else (tuple(x), {})
    raise TypeError(f"{'batch' if inputs is None else 'inputs'}: expected a tensor, tuple/list or mapping, got "
                    f"{type(x).__name__}; pass inputs=batch -> model arguments for other layouts")


def to_device(batch, device):
    """`batch` with every tensor in it (at any depth of tuples, lists, mappings) moved to `device` (None: stays)."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


@contextlib.contextmanager
def requiring_grad(tensors):
    """Temporarily set requires_grad on parameters selected while frozen."""
    frozen = [t for t in tensors if not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in frozen:
            t.requires_grad_(False)
