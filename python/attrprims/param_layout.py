"""Which parameters a gradient covers and where each sits in the flat p-vector: the contract between
gradient extraction, the projection's row offsets and the feature store.

The order is the model's `named_parameters()` order (a tied parameter counts once, under its first
name), restricted to the selection; offsets are cumulative element counts in that order, and each
parameter is flattened row-major. `digest()` fingerprints names, shapes and order, so features made
with another selection or another architecture can be refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of the selected parameters; p is the total element count."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    p: int

    @classmethod
    def from_shapes(cls, named_shapes) -> "ParamLayout":
        """Layout of (name, shape) pairs in the given order."""
        names, shapes, offsets, p = [], [], [], 0
        for name, shape in named_shapes:
            names.append(name)
            shapes.append(tuple(int(d) for d in shape))
            offsets.append(p)
            p += _numel(shapes[-1])
        return cls(tuple(names), tuple(shapes), tuple(offsets), p)

    def offset(self, name: str) -> int:
        """Index of parameter `name`'s first element in the flat vector."""
        return self.offsets[self.names.index(name)]

    def numel(self, name: str) -> int:
        return _numel(self.shapes[self.names.index(name)])

    def digest(self) -> str:
        """SHA-256 of the names and shapes in order: equal digests mean equal flat layouts."""
        text = json.dumps([list(self.names), [list(s) for s in self.shapes]], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def config(self) -> dict:
        """A JSON-serialisable record of the layout (for manifests and error messages)."""
        return {"p": self.p, "count": len(self.names), "digest": self.digest()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def param_layout(model: nn.Module, params=None) -> ParamLayout:
    """The layout of `model`'s parameters selected by `params`.

    Args:
        model: the module whose parameters are differentiated.
        params: None (every parameter with requires_grad), or an iterable of parameter names and/or
            nn.Parameter objects of `model` (e.g. only the last layers). Their order is ignored: the
            layout always follows the model's order.
    Raises: TypeError/ValueError naming `model` or `params` (an unknown name or a foreign tensor).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    chosen = {name for name, t in named if t.requires_grad} if params is None else _resolve_selection(model, params)
    return ParamLayout.from_shapes((name, t.shape) for name, t in named if name in chosen)


def _resolve_selection(model: nn.Module, params) -> set[str]:
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params: expected None or an iterable of parameter names or tensors, got "
                        f"{type(params).__name__}") from None
    first_name = {}  # id -> the name named_parameters() keeps
    for name, t in model.named_parameters():
        first_name[id(t)] = name
    # Every name, including the later names of tied parameters, maps to the kept name.
    canonical = {name: first_name[id(t)] for name, t in model.named_parameters(remove_duplicate=False)}
    chosen = set()
    for item in items:
        if isinstance(item, str):
            if item not in canonical:
                known = sorted(first_name.values())
                more = ", ..." if len(known) > 8 else ""
                raise ValueError(f"params: {item!r} is not a parameter of the model (it has {len(known)}: "
                                 f"{', '.join(known[:8])}{more})")
            chosen.add(canonical[item])
        elif isinstance(item, torch.Tensor):
            if id(item) not in first_name:
                raise ValueError(f"params: a tensor of shape {list(item.shape)} is not a parameter of the model")
            chosen.add(first_name[id(item)])
        else:
            raise TypeError(f"params: expected parameter names or tensors, got an item of type {type(item).__name__}")
    return chosen
