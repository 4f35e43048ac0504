"""Per-example gradients of a scalar output per example, materialised or streamed into a projection.

`output_fn(outputs, batch) -> [n]` turns the model's outputs on a batch into one scalar per example
(a margin, a loss, a log-probability); the gradient of example i's scalar with respect to the selected
parameters is row i. Two paths compute it:
- "generic": torch.func (functional_call + vmap(grad)), one example at a time in a vectorised map. Works
  for any model and output function; costs about a backward pass per example.
- "layer": forward hooks record each supported layer's input a, tensor hooks its output gradient δ, in
  one ordinary forward/backward over the batch; a layer's per-example gradient is formed from a and δ
  (Linear: Σ_t δ_t a_tᵀ) and handed on at once, so only one layer's worth exists at a time. Supported:
  Linear, Conv2d, Embedding, LayerNorm, RMSNorm, GroupNorm, BatchNorm (see _layer_rules.py). Parameters
  of other layers go through the generic path (or raise, with fallback=False). It assumes examples do
  not interact (no train-mode BatchNorm, no in-batch terms in output_fn) and that a supported layer's
  parameters are used only by calling that layer; a parameter that gets a gradient without its layer
  being called (nn.MultiheadAttention's out_proj) is detected and sent through the generic path.

Batches: a tensor (the model's input), a tuple/list (inputs first, e.g. (x, y)) or a mapping (keyword
arguments); `inputs=` maps other layouts to the model's arguments. Every tensor in the batch holds one
row per example.

Groups (`groups=` ids [n]): one row per group, the sum of its members' gradients (GGDA). The layer path
sums inside the products (a group's tokens end to end), the generic path sums per-example gradients;
either way a projection then costs one row per group instead of one per example.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from ._batches import batch_size, model_args, requiring_grad
from ._checks import all_finite, kernel_float
from ._group_rows import GroupRows, group_ids, per_group
from ._layer_rules import rule_for, uses_batch_statistics
from .factored_projector import FactoredProjector
from .param_layout import ParamLayout, param_layout
from .projection import Projector

PATHS = ("generic", "layer")
# Layers whose weight matrix [d_out, d_in] a FactoredProjector projects with P_out ⊗ P_in, on either path.
FACTORED_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)
# Default parameter chunk of the generic projection: about 256 MiB of float32 per-example gradients.
_CHUNK_BUDGET = 2**26
# Most float32 elements (rows × p) of a batch's gradients the layer path gathers to project in one call (64 MiB).
# One call instead of one per layer: each kernel call right after a torch op pays for torch's OpenMP threads
# still spinning (about 1 ms on 2 cores), which dominates small models.
_STAGE_BUDGET = 2**24


def per_sample_grads(model, output_fn, batch, *, params=None, inputs=None, path="generic", flat=False,
                     fallback=True, groups=None):
    """Compute each example's gradient of `output_fn` with respect to the selected parameters.

    Equivalent to `[torch.autograd.grad(output_fn(model(x[i:i+1]), batch[i:i+1])[0], params) for i in range(n)]`.

    Args:
        model: nn.Module; its parameters select the device. output_fn: (outputs, batch) -> [n] tensor.
        batch: tensor, tuple/list (inputs first) or mapping, every tensor with first dimension n.
        params: None (all parameters with requires_grad) or names/tensors of `model` (see `param_layout`).
        inputs: optional batch -> model arguments (tensor, tuple of positional, or mapping of keyword ones).
        path: "generic" (torch.func) or "layer" (hooks; see the module docstring).
        flat: return one [n, p] tensor in `param_layout` order instead of a dict.
        fallback: on the layer path, send unsupported layers' parameters through the generic path (True) or
            raise naming them (False).
        groups: optional integer ids [n] (0..G-1, G = max + 1; a group may be empty): rows become the G groups,
            row j the sum of the gradients of the examples with id j.
    Returns: dict name -> [n, *param.shape] in layout order (views into one [n, p] buffer on the layer path),
        or the [n, p] tensor; in the parameters' dtype, detached. With groups, G rows instead of n.
    Raises: ValueError naming the argument (output_fn's shape, batch layout, params, path) and the examples
        whose gradients are not finite. Warns when BatchNorm uses batch statistics on the layer path.
    Determinism: the same inputs give the same result on a device; the two paths agree to float rounding.
    """
    layout, n = _prepare(model, output_fn, batch, params, path)
    device = _device(model, layout)
    rows = _group_rows(groups, n, device)
    r = n if rows is None else rows.count
    if path == "generic":
        grads = {name: per_group(g, rows) for name, g in
                 _vmap_grads(model, output_fn, batch, inputs, layout.names, n).items()}
        _check_finite_rows(r, grads.values(), rows)
        if flat:
            return torch.cat([_rows(grads[name]) for name in layout.names], 1)
        return {name: grads[name] for name in layout.names}
    dtype = _common_dtype(model, layout)
    buffer = torch.zeros((r, layout.p), dtype=dtype, device=device)

    def add(name, lo, values):
        start = layout.offset(name) + lo
        buffer[:, start:start + values.shape[1]] += values

    rest = _layer_pass(model, output_fn, batch, inputs, layout, n, add, None, fallback, rows)
    for name, g in _vmap_grads(model, output_fn, batch, inputs, rest, n).items():
        add(name, 0, per_group(_rows(g), rows))
    _check_finite_rows(r, [buffer], rows)
    if flat:
        return buffer
    return {name: buffer[:, off:off + layout.numel(name)].view(r, *shape)
            for name, shape, off in zip(layout.names, layout.shapes, layout.offsets)}


def project_grads(model, output_fn, batch, projector, *, params=None, inputs=None, path="generic", chunk=None,
                  fallback=True, groups=None):
    """Project each example's gradient to k dimensions without holding all n × p of them.

    Equivalent to `projector(per_sample_grads(model, output_fn, batch, params=params, flat=True))` (for a
    FactoredProjector, to the flat gradients times the matrix its docstring defines: P_out ⊗ P_in on weight blocks).

    Args: as `per_sample_grads`, plus
        projector: Projector or FactoredProjector with p == param_layout(model, params).p. A FactoredProjector
            projects the weights of Linear/Conv2d/Embedding layers with P_out ⊗ P_in: on the layer path from a
            and δ, never forming their gradients; on the generic path from the materialised gradients.
        chunk: generic path only: most parameter elements whose per-example gradients are formed at once
            (default: about 2^26 / n); a chunk is a run of whole parameters in layout order, and each chunk
            costs one vmap(grad) pass.
        groups: as `per_sample_grads`: G rows, each group's summed gradient projected (the projection's work
            scales with G, not n).
    Returns: [n, k] (or [G, k]) float32 on the parameters' device.
    Memory: on the layer path with a dense Projector, a batch whose rows × p is at most 2^24 has its gradients
        gathered in float32 and projected in one call; larger ones are projected layer by layer.
    Raises: as `per_sample_grads`; ValueError naming `projector` if its p differs from the selection's.
    Determinism: chunks are summed in layout order, so equal inputs give equal results on a device; any
    chunking agrees with the unchunked projection to float32 rounding.
    """
    layout, n = _prepare(model, output_fn, batch, params, path)
    if not isinstance(projector, (Projector, FactoredProjector)):
        raise TypeError(f"projector: expected a Projector or FactoredProjector, got {type(projector).__name__}")
    if projector.p != layout.p:
        raise ValueError(f"projector: expected p == {layout.p} (elements of the {len(layout.names)} selected "
                         f"parameters), got p = {projector.p}")
    factored = isinstance(projector, FactoredProjector)
    dense = projector.dense if factored else projector
    device = _device(model, layout)
    rows = _group_rows(groups, n, device)
    r = n if rows is None else rows.count
    out = torch.zeros((r, projector.k), dtype=torch.float32, device=device)
    kronecker = _kronecker_weights(model, layout) if factored else {}
    staged = path == "layer" and not factored and r * layout.p <= _STAGE_BUDGET
    stage = torch.zeros((r, layout.p), dtype=torch.float32, device=device) if staged else None

    def add(name, lo, values):
        start = layout.offset(name) + lo
        if stage is not None:
            stage[:, start:start + values.shape[1]] += values
        else:
            dense(kernel_float(values), start, out=out, accumulate=True)

    def add_weight(name, rule, module, a, delta):
        p_out, p_in = projector.factors(layout.offset(name), *kronecker[name], device)
        out.add_(per_group(rule.project_weight(module, a, delta, n, p_out, p_in), rows))

    rest = layout.names
    if path == "layer":
        rest = _layer_pass(model, output_fn, batch, inputs, layout, n, add, add_weight if factored else None,
                           fallback, rows)
    if chunk is None:
        chunk = max(1, _CHUNK_BUDGET // max(n, 1))
    for names in _chunks(layout, rest, chunk):
        for name, g in _vmap_grads(model, output_fn, batch, inputs, names, n).items():
            if name in kronecker:  # a weight matrix whose layer the layer path could not handle
                p_out, p_in = projector.factors(layout.offset(name), *kronecker[name], device)
                g = g.float().reshape(n, *kronecker[name])
                out.add_(per_group(_rows(p_out.T @ g @ p_in), rows))
            else:
                add(name, 0, per_group(_rows(g), rows))
    if stage is not None:
        dense(stage, 0, out=out, accumulate=True)
    _check_finite_rows(r, [out], rows)
    return out


def _prepare(model, output_fn, batch, params, path) -> tuple[ParamLayout, int]:
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(map(repr, PATHS))}, got {path!r}")
    layout = param_layout(model, params)
    if not layout.names:
        raise ValueError("params: selects no parameters (none given, or none of the model's requires grad)")
    if not callable(output_fn):
        raise TypeError(f"output_fn: expected a callable (outputs, batch) -> [n], got {type(output_fn).__name__}")
    coupled = [name for name, m in model.named_modules() if uses_batch_statistics(m)]
    if coupled:
        what = (f"BatchNorm layer(s) {', '.join(map(repr, coupled))} normalise with the batch's statistics "
                "(train mode, or track_running_stats=False), so per-example gradients are ill-defined")
        if path == "generic":
            raise ValueError(f"model: {what}, and the generic path sees one example at a time; call model.eval()")
        warnings.warn(f"model: {what}; call model.eval() first", UserWarning, stacklevel=3)
    return layout, batch_size(batch)


def _group_rows(groups, n: int, device) -> GroupRows | None:
    if groups is None:
        return None
    ids, count = group_ids(groups, n, every_id=False)
    return GroupRows(ids.to(device), count)


def _rows(g: torch.Tensor) -> torch.Tensor:
    """[n, *shape] per-example gradients as [n, numel]: also for 0-dim parameters and for n = 0."""
    return g.reshape(g.shape[0], math.prod(g.shape[1:]))


def _check_output(o, n: int) -> None:
    if not isinstance(o, torch.Tensor) or tuple(o.shape) != (n,) or not o.is_floating_point():
        got = f"shape {list(o.shape)} {o.dtype}" if isinstance(o, torch.Tensor) else type(o).__name__
        raise ValueError(f"output_fn: expected a floating tensor of shape [n] with n == {n} (one scalar per "
                         f"example), got {got}")


def _vmap_grads(model, output_fn, batch, inputs, names, n) -> dict[str, torch.Tensor]:
    """Generic path: {name: [n, *shape]} for the parameters `names`, by vmap over grad."""
    if not names:
        return {}
    params = dict(model.named_parameters())
    chosen = {name: params[name].detach() for name in names}
    fixed = {name: t.detach() for name, t in params.items() if name not in chosen}
    fixed.update(model.named_buffers())
    in_dims = pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)

    def output_of_one(chosen, example):
        example = pytree.tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
        args, kwargs = model_args(inputs, example)
        o = output_fn(functional_call(model, (chosen, fixed), args, kwargs), example)
        _check_output(o, 1)
        return o[0]

    if n == 0:
        return {name: t.new_zeros((0, *t.shape)) for name, t in chosen.items()}
    return vmap(grad(output_of_one), in_dims=(None, in_dims), randomness="different")(chosen, batch)


def _layer_pass(model, output_fn, batch, inputs, layout, n, add, add_weight, fallback, rows) -> list[str]:
    """Layer path over one batch: calls add(name, offset_in_param, [n, c]) for every gradient piece ([G, c] when
    `rows` groups the examples), or add_weight(name, rule, module, a, delta) for weight matrices when given.
    Returns the selected parameters it could not cover, in layout order."""
    if n == 0:
        return []
    selected = set(layout.names)
    name_of = {id(t): name for name, t in model.named_parameters()}
    owners, unsupported = {}, {}
    for module_name, m in model.named_modules():
        mine = {local: name_of[id(t)] for local, t in m.named_parameters(recurse=False) if name_of[id(t)] in selected}
        rule = rule_for(m)
        if rule is None:
            for name in mine.values():
                unsupported.setdefault(name, f"{module_name or 'model'} ({type(m).__name__})")
        elif mine:
            owners[m] = (rule, mine)
    if unsupported and not fallback:
        layers = sorted(set(unsupported.values()))
        raise ValueError(f"model: the layer path does not support {', '.join(layers)}, which own(s) selected "
                         "parameters; pass fallback=True to use the generic path for them")
    # A parameter shared with an unsupported layer goes through the generic path everywhere.
    owners = {m: (rule, {local: name for local, name in mine.items() if name not in unsupported})
              for m, (rule, mine) in owners.items()}
    covered = [name for name in layout.names if name not in unsupported and any(
        name in mine.values() for _, mine in owners.values())]
    delivered = set()

    def handle(m, a, delta):
        rule, mine = owners[m]
        if add_weight is not None and rule.factored and "weight" in mine:
            add_weight(mine["weight"], rule, m, a, delta)
        wanted = set(mine) - ({"weight"} if add_weight is not None and rule.factored else set())
        for local, lo, values in rule.pieces(m, a, delta, n, wanted, rows):
            add(mine[local], lo, values)
        delivered.update(mine.values())

    def forward_hook(m, args, output):
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not owners[m][1]:
            return
        a = args[0].detach()
        if a.dim() == 0 or a.shape[0] != n:
            raise ValueError(f"model: layer {type(m).__name__} got an input of shape {list(a.shape)}, whose first "
                             f"dimension is not the batch's n = {n}; the layer path needs batch-first "
                             "activations (use path='generic')")
        output.register_hook(lambda delta: handle(m, a, delta.detach()))

    tensors = dict(model.named_parameters())
    targets = [tensors[name] for name in covered]
    handles = [m.register_forward_hook(forward_hook) for m in owners]
    try:
        with torch.enable_grad(), requiring_grad(targets):
            args, kwargs = model_args(inputs, batch)
            o = output_fn(model(*args, **kwargs), batch)
            _check_output(o, n)
            summed = torch.autograd.grad(o.sum(), targets, allow_unused=True) if o.requires_grad else []
    finally:
        for h in handles:
            h.remove()
    # Used without calling its layer (e.g. by a parent's functional call): only the generic path sees it.
    missed = {name for name, g in zip(covered, summed) if g is not None and name not in delivered}
    return [name for name in layout.names if name in unsupported or name in missed]


def _kronecker_weights(model: nn.Module, layout: ParamLayout) -> dict[str, tuple[int, int]]:
    """{name: (d_out, d_in)} of the selected weights a FactoredProjector projects with P_out ⊗ P_in."""
    selected = set(layout.names)
    name_of = {id(t): name for name, t in model.named_parameters()}
    blocks = {}
    for m in model.modules():
        weight = m._parameters.get("weight") if isinstance(m, FACTORED_LAYERS) else None
        if weight is not None and name_of[id(weight)] in selected:
            blocks[name_of[id(weight)]] = (weight.shape[0], weight[0].numel())
    return blocks


def _chunks(layout: ParamLayout, names, budget: int):
    """Runs of parameters that are consecutive in the layout, each at most `budget` elements (or one parameter)."""
    wanted = set(names)
    run, size, previous = [], 0, None
    for i, name in enumerate(layout.names):
        if name not in wanted:
            continue
        numel = layout.numel(name)
        if run and (previous != i - 1 or size + numel > budget):
            yield run
            run, size = [], 0
        run.append(name)
        size += numel
        previous = i
    if run:
        yield run


def _check_finite_rows(n: int, tensors, grouped: GroupRows | None = None) -> None:
    """Raise naming the examples (or groups, given `grouped`) whose values in any of `tensors` [n, ...] are NaN or
    Inf."""
    tensors = [t.reshape(n, -1) for t in tensors if t.numel()]
    if all(all_finite(t) for t in tensors):  # the common case, by one compiled scan each
        return
    bad = sum((~torch.isfinite(t).all(1)).int() for t in tensors).nonzero().flatten().tolist()
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    what = "examples" if grouped is None else "groups"
    raise ValueError(f"batch: the gradients of {what} {bad[:10]}{more} are not finite (NaN or Inf in the output or "
                     "its gradient)")


def _device(model: nn.Module, layout: ParamLayout) -> torch.device:
    return dict(model.named_parameters())[layout.names[0]].device


def _common_dtype(model: nn.Module, layout: ParamLayout) -> torch.dtype:
    tensors = dict(model.named_parameters())
    dtype = tensors[layout.names[0]].dtype
    for name in layout.names[1:]:
        dtype = torch.promote_types(dtype, tensors[name].dtype)
    return dtype
