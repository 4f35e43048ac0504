"""Hessian- and Gauss–Newton-vector products on flat parameter vectors, batched over several vectors.

Vectors are flat: the parameters' elements, each parameter flattened row-major, concatenated in the order of
the parameters given. The functional `hvp` and `ggn_vp` take the parameters as a dict name -> tensor (as
torch.func.functional_call does; the dict's order is the flat order); `HessianOperator` takes a model and a
parameter selection, in `param_layout` order. v is [b, p] (b vectors) or [p]; the result has v's shape.

Products use forward-over-reverse autodiff (torch.func.jvp of torch.func.grad), vectorised over the b vectors
with vmap. Where vmap cannot batch the function (an autograd.Function with no vmap rule, an op with no batching
rule) they fall back to a Python loop over the vectors and warn; `vectorize=False` loops silently. Only the
tangents are batched, so control flow on the parameters' or outputs' values is fine under vmap.

`HessianOperator` is the curvature of a model's loss over a dataset given as batches, the object the IHVP
solvers (attrprims.ihvp) take. With reduction="mean" it is H = (1/N) Σ_i ∇²ℓ_i over all N examples of all
batches; batches are weighted by their size, so this is not a mean of batch means. With "sum" it is Σ_i ∇²ℓ_i.
kind="ggn" gives the Gauss–Newton matrix Σ_i J_iᵀ ∇²_o ℓ_i J_i instead, where J_i is the Jacobian of the outputs
o; it is PSD when the loss is convex in the outputs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from ._checks import check_finite, check_tensor
from .param_layout import param_layout
from ._batches import batch_size, model_args

KINDS = ("hessian", "ggn")
REDUCTIONS = ("mean", "sum")
_VECTOR_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_vectors(v, p: int, dtype: torch.dtype, device: torch.device, source: str) -> tuple[torch.Tensor, bool]:
    """v [b, p] or [p] as detached rows [b, p] of `dtype`, and whether v was [p]; `source` says where p comes from."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v: expected a torch.Tensor of shape [b, p] or [p], got {type(v).__name__}")
    check_tensor("v", v, "[b, p] or [p]", 1 if v.dim() == 1 else 2, _VECTOR_DTYPES)
    if v.shape[-1] != p:
        raise ValueError(f"v: expected shape [b, p] or [p] with p == {p} ({source}), got {list(v.shape)}")
    if v.device != device:
        raise ValueError(f"v: expected device {device} ({source}), got {v.device}")
    check_finite("v", v)
    return v.detach().reshape(-1, p).to(dtype), v.dim() == 1


def check_losses(losses, n: int) -> torch.Tensor:
    """`losses`, if it is loss_fn's floating [n] per-example losses for a batch of n."""
    if isinstance(losses, torch.Tensor) and tuple(losses.shape) == (n,) and losses.is_floating_point():
        return losses
    got = f"shape {list(losses.shape)} {losses.dtype}" if isinstance(losses, torch.Tensor) else type(losses).__name__
    raise ValueError(f"loss_fn: expected a floating tensor of shape [n] with n == {n} (one loss per example), "
                     f"got {got}")


def hvp(loss_fn, params, v, *, vectorize=True):
    """Multiply the Hessian of `loss_fn` at `params` by each vector of v.

    Equivalent to `v @ torch.autograd.functional.hessian(f, θ)`, with f(θ) = loss_fn(params rebuilt from θ) and
    θ the parameters flattened and concatenated in dict order.

    Args:
        loss_fn: (dict name -> tensor) -> scalar tensor, twice differentiable.
        params: dict name -> tensor: the point, and (by its order) the flat layout; p is the total element count.
        v: [b, p] or [p] float tensor, finite, on the parameters' device.
        vectorize: vmap over the vectors (looping, with a warning, where vmap cannot), or loop (False).
    Returns: v's shape, in the parameters' (promoted) dtype, detached.
    Raises: ValueError naming `params` (empty, not floating, several devices) or `v` (shape, device, NaN/Inf).
    Determinism: equal inputs give equal results on a device; vmap and the loop agree to float rounding.
    """
    names, primals, p, dtype = _flat_params(params)
    rows, squeeze = check_vectors(v, p, dtype, primals[names[0]].device, "from params")

    def one(u):
        _, out = jvp(grad(loss_fn), (primals,), (_unflatten(u, primals),))
        return _flatten(out, names, dtype)

    out = _map_rows(one, rows, vectorize)
    return out[0] if squeeze else out


def ggn_vp(output_fn, loss_of_outputs, params, v, *, vectorize=True):
    """Multiply the Gauss–Newton matrix Jᵀ H_o J of loss_of_outputs(output_fn(params)) by each vector of v.

    Equivalent to `v @ (J.T @ H_o @ J)` with J = ∂o/∂θ [o, p] the Jacobian of the flattened outputs o =
    output_fn(params) and H_o = ∇²_o loss_of_outputs(o) [o, o] (θ as in `hvp`).

    Args:
        output_fn: (dict name -> tensor) -> outputs (a tensor or a pytree of tensors).
        loss_of_outputs: outputs -> scalar tensor, twice differentiable in the outputs.
        params, v, vectorize: as `hvp`.
    Returns: v's shape, in the parameters' (promoted) dtype, detached.
    Raises: as `hvp`.
    Determinism: as `hvp`.
    """
    names, primals, p, dtype = _flat_params(params)
    rows, squeeze = check_vectors(v, p, dtype, primals[names[0]].device, "from params")
    outputs, pullback = vjp(output_fn, primals)

    def one(u):
        _, ju = jvp(output_fn, (primals,), (_unflatten(u, primals),))
        _, hju = jvp(grad(loss_of_outputs), (outputs,), (ju,))
        return _flatten(pullback(hju)[0], names, dtype)

    out = _map_rows(one, rows, vectorize)
    return out[0] if squeeze else out


class HessianOperator:
    """The Hessian (or GGN) of a model's loss over a dataset in batches, as a linear operator on [b, p] vectors.

    Equivalent to `H = w Σ_batches Σ_i ∇²_θ loss_fn(model(batch), batch)[i]` with w = 1/N (reduction "mean",
    N examples in all) or 1 ("sum"), and `matvec(v)` to `v @ H`.

    Args:
        model: nn.Module, in eval mode (train-mode BatchNorm or dropout make H ill-defined).
        loss_fn: (outputs, batch) -> [n] per-example losses (per_sample_grads's output_fn convention).
        batches: re-iterable (list, DataLoader) of batches in per_sample_grads's layout; read once here to count
            N, then on every full matvec.
        params: None (every parameter requiring grad) or names/tensors of `model`; flat order is param_layout's.
        kind: "hessian" or "ggn" (Jᵀ ∇²_o ℓ J with o the model's outputs). reduction: "mean" or "sum".
        inputs: optional batch -> model arguments (see per_sample_grads). vectorize: as `hvp`.
    Attributes: p, dtype, device, layout (ParamLayout), count (N), num_batches, and the arguments.
    Raises: ValueError naming the argument (empty or one-shot batches, kind, reduction, params).
    Determinism: as `hvp`; batches are summed in iteration order.
    """

    def __init__(self, model, loss_fn, batches, *, params=None, kind="hessian", reduction="mean", inputs=None,
                 vectorize=True):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (outputs, batch) -> [n], got {type(loss_fn).__name__}")
        self.layout = param_layout(model, params)
        if not self.layout.names:
            raise ValueError("params: selects no parameters (none given, or none of the model's requires grad)")
        tensors = dict(model.named_parameters())
        self.device = tensors[self.layout.names[0]].device
        self.dtype = _promoted(tensors[name].dtype for name in self.layout.names)
        self.p = self.layout.p
        self.model, self.loss_fn, self.batches, self.inputs = model, loss_fn, batches, inputs
        self.kind, self.reduction, self.vectorize = kind, reduction, vectorize
        try:
            one_shot = iter(batches) is batches
        except TypeError:
            raise TypeError(f"batches: expected a re-iterable of batches (list, DataLoader), got "
                            f"{type(batches).__name__}") from None
        if one_shot:
            raise ValueError(f"batches: expected a re-iterable of batches (list, DataLoader), got a one-shot "
                             f"{type(batches).__name__}, which the operator could read only once")
        sizes = [batch_size(batch) for batch in batches]
        self.count, self.num_batches = sum(sizes), len(sizes)
        if self.count == 0:
            raise ValueError(f"batches: expected at least one example, got {len(sizes)} batches holding none")

    def matvec(self, v, batch=None):
        """v @ H for v [b, p] or [p] (v's shape out, in `dtype`); `batch` (one batch) gives a one-batch estimate
        instead, unbiased over batches of equal size: the batch's mean curvature, times N for reduction "sum"."""
        rows, squeeze = check_vectors(v, self.p, self.dtype, self.device, "from the operator")
        if batch is not None:
            n = batch_size(batch)
            out = self._batch_product(rows, batch, (self.count if self.reduction == "sum" else 1) / max(n, 1))
        else:
            weight = 1 / self.count if self.reduction == "mean" else 1
            out = torch.zeros_like(rows)
            for each in self.batches:
                out += self._batch_product(rows, each, weight)
        return out[0] if squeeze else out

    def _batch_product(self, rows, batch, weight):
        n = batch_size(batch)
        everything = dict(self.model.named_parameters())
        chosen = {name: everything[name].detach() for name in self.layout.names}
        fixed = {name: t.detach() for name, t in everything.items() if name not in chosen}
        fixed.update(self.model.named_buffers())
        args, kwargs = model_args(self.inputs, batch)

        def outputs(params):
            return functional_call(self.model, (params, fixed), args, kwargs)

        def loss_of_outputs(o):
            return check_losses(self.loss_fn(o, batch), n).sum() * weight

        if self.kind == "ggn":
            return ggn_vp(outputs, loss_of_outputs, chosen, rows, vectorize=self.vectorize)
        return hvp(lambda params: loss_of_outputs(outputs(params)), chosen, rows, vectorize=self.vectorize)


def _flat_params(params) -> tuple[list[str], dict[str, torch.Tensor], int, torch.dtype]:
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params: expected a non-empty dict name -> tensor, got {type(params).__name__}"
                         f"{' (empty)' if isinstance(params, Mapping) else ''}")
    names = list(params)
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"params: expected floating tensors, got {got} for {name!r}")
        if t.device != params[names[0]].device:
            raise ValueError(f"params: expected every tensor on {params[names[0]].device} (that of {names[0]!r}), "
                             f"got {t.device} for {name!r}")
    primals = {name: params[name].detach() for name in names}
    return names, primals, sum(t.numel() for t in primals.values()), _promoted(t.dtype for t in primals.values())


def _promoted(dtypes) -> torch.dtype:
    dtypes = list(dtypes)
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _unflatten(u: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = u[start:start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


def _flatten(tree: dict[str, torch.Tensor], names: list[str], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([tree[name].reshape(-1).to(dtype) for name in names])


@functools.cache
def _load_forward_ad() -> None:
    """Run one tiny jvp with torch's warning about torch.jit.script silenced. On first forward-AD use torch (2.13)
    scripts its own jvp decompositions and warns that torch.jit.script is deprecated: a warning about torch's
    code, not the caller's, which -W error (as in our tests) would turn into a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


def _map_rows(fn, rows: torch.Tensor, vectorize: bool) -> torch.Tensor:
    """fn applied to each row of rows [b, p]: by vmap where it can batch fn, else by a loop."""
    if rows.shape[0] == 0:
        return rows.clone()
    _load_forward_ad()
    if vectorize:
        try:
            return vmap(fn)(rows)
        except RuntimeError as error:
            if not any(word in str(error).lower() for word in ("vmap", "batching")):
                raise  # not vmap's limitation: the loop would fail the same way
            warnings.warn(f"vectorize: vmap cannot batch this function ({str(error).splitlines()[0]}); looping over "
                          f"the {rows.shape[0]} vectors instead (pass vectorize=False to skip the attempt)",
                          UserWarning, stacklevel=3)
    return torch.stack([fn(row) for row in rows])
