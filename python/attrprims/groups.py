"""Groupings of the training set for group attribution (GGDA, Ley et al. 2024): ids [n] of a partition into G groups.

Attributing to groups instead of points makes featurization, curvature and scoring cost G rows instead of n. A group
acts through the sum of its members' gradients, so fidelity is lost least when members have similar gradients; hence
Grad-K-Means (K-means on projected loss gradients), beside grouping by class, at random, by inputs or by
representations. Every function returns a LongTensor [n] on the CPU whose ids 0..G-1 are all used; `sizes` and
`expand` take such ids, as do the `groups=` arguments of the primitives.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ._batches import model_args, to_device
from ._checks import check_finite, check_int, check_seed, check_tensor, dtype_name
from ._group_rows import _INTEGERS, group_ids
from ._layers import last_linear
from .tasks import Task

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def by_class(labels, *, size=None, seed=0) -> torch.Tensor:
    """One group per class present, ids in order of the class value; with `size`, each class split further.

    Equivalent to `torch.unique(labels, return_inverse=True)[1]`; with `size`, class c's members, in a seeded random
    order, are cut into ceil(n_c / size) runs whose sizes differ by at most 1 (class c's runs follow class c−1's).
    Args: labels: [n] integer tensor. size: None or the most members per group (>= 1). seed: seed of the order.
    Returns: ids [n] int64 on the CPU. Raises: ValueError/TypeError naming the argument.
    Determinism: the same labels and seed give the same ids on any device.
    """
    check_tensor("labels", labels, "[n]", 1, _INTEGERS)
    seed = check_seed(seed)
    classes = torch.unique(labels.detach().cpu(), return_inverse=True)[1]
    return classes if size is None else _split(classes, check_int("size", size, 1), seed)


def random(n, *, size, seed=0) -> torch.Tensor:
    """A seeded random partition of n points into ceil(n / size) groups whose sizes differ by at most 1.

    Equivalent to cutting a seeded permutation of range(n) into ceil(n / size) nearly equal runs.
    Returns: ids [n] int64 on the CPU. Raises: ValueError/TypeError naming `n`, `size` or `seed`.
    """
    n = check_int("n", n, 0)
    return _split(torch.zeros(n, dtype=torch.long), check_int("size", size, 1), check_seed(seed))


def kmeans(features, *, size, seed=0, balanced=False, iters=50) -> torch.Tensor:
    """K-means (Lloyd, k-means++ start, squared Euclidean, float64) into G = ceil(n / size) groups.

    Equivalent to Lloyd's iterations from a k-means++ start (Arthur & Vassilvitskii 2007), except that a cluster left
    empty is given the point farthest from its centroid (from a cluster that keeps a member), so all G ids are used;
    ids are renumbered by first occurrence. Stops after `iters` updates or once the assignment repeats.
    Args:
        features: [n, d] float tensor, finite, n >= 1 (computed on its device). size: the target group size (>= 1;
            size >= n gives one group). seed: seed of the k-means++ draws. iters: most Lloyd updates (>= 1).
        balanced: cap every group at ceil(n / G) members: the final assignment puts points, in order of their
            distance to the nearest centroid, each in the nearest centroid with room left.
    Returns: ids [n] int64 on the CPU. Raises: ValueError/TypeError naming the argument.
    Determinism: the same features and seed give the same ids on a device; devices agree up to float rounding.
    """
    check_tensor("features", features, "[n, d]", 2, _FLOATS)
    return _kmeans("features", features, size, seed, balanced, iters)


def input_kmeans(inputs, *, size, seed=0, balanced=False) -> torch.Tensor:
    """K-means on the flattened inputs: `kmeans(inputs.reshape(n, -1).double(), ...)`, for inputs [n, ...]."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor [n, ...], got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.dtype not in _FLOATS + _INTEGERS:
        raise ValueError(f"inputs: expected a float or integer tensor [n, ...], got {list(inputs.shape)} "
                         f"{dtype_name(inputs.dtype)}")
    return _kmeans("inputs", inputs.reshape(inputs.shape[0], -1), size, seed, balanced, 50)


def representation_kmeans(model, loader, *, layer=None, size, seed=0, balanced=False, inputs=None) -> torch.Tensor:
    """K-means on the inputs of submodule `layer` (default: the last nn.Linear, the penultimate representations).

    Equivalent to `kmeans(cat([h(batch).flatten(1) for batch in loader]), ...)`, h(batch) the layer's input when the
    model runs on model_args(inputs, batch) in eval mode under no_grad (batches moved to the model's device).
    Args: model: nn.Module (its modes are restored afterward). loader: iterable of batches, in order.
        layer: a name in model.named_modules(), called once per forward. inputs: optional batch -> model arguments.
        size, seed, balanced: as `kmeans`.
    Returns: ids [n] int64 on the CPU. Raises: ValueError/TypeError naming the argument.
    """
    _check_options(size, seed, balanced)
    modules = dict(model.named_modules())
    if layer is None:
        layer = last_linear(model, "layer")
    if layer not in modules:
        raise ValueError(f"layer: expected a name in model.named_modules(), got {layer!r}")
    captured, parts = [], []
    handle = modules[layer].register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    device = _device_of(model)
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in loader:
                args, kwargs = model_args(inputs, to_device(batch, device))
                model(*args, **kwargs)
                if len(captured) != 1:
                    raise ValueError(f"layer: expected {layer!r} to be called once per forward, got "
                                     f"{len(captured)} calls")
                rows = captured.pop()
                parts.append(rows.reshape(rows.shape[0], -1))
    finally:
        handle.remove()
    if not parts:
        raise ValueError("loader: expected at least one batch, got none")
    return _kmeans("model", torch.cat(parts), size, seed, balanced, 50)


def grad_kmeans(model, task, loader, *, size, seed=0, balanced=False, proj_dim=64, params=None) -> torch.Tensor:
    """Grad-K-Means: K-means on each training example's projected loss gradient.

    Equivalent to `kmeans(cat([GradientFeatures(model, params=params, proj_dim=proj_dim, seed=seed)(model,
    task.loss, batch, task.inputs) for batch in loader]), ...)`, the model in eval mode (its modes are restored
    afterward) and batches moved to its device; `task` is prepared on a copy (Task.prepare).
    Args: task: an attrprims.tasks.Task. loader: iterable of batches, in order. proj_dim: k (>= 1), or None for the
        flat gradients. params: names or tensors of `model` (default: the parameters of its last nn.Linear, whose
        gradients, error times representation, are cheap and grouped best in bench/bench_groups.py).
        size, seed (also the projection's), balanced: as `kmeans`.
    Returns: ids [n] int64 on the CPU. Raises: ValueError/TypeError naming the argument.
    """
    from .methods._gradients import GradientFeatures  # lazily: importing groups must not import methods (a cycle)

    if not isinstance(task, Task):
        raise TypeError(f"task: expected an attrprims.tasks.Task, got {type(task).__name__}")
    _check_options(size, seed, balanced)
    if proj_dim is not None:
        check_int("proj_dim", proj_dim, 1)
    if params is None:
        last = last_linear(model, "params")
        params = [f"{last}.{name}" if last else name for name, _ in model.get_submodule(last).named_parameters()]
    features = GradientFeatures(model, params=params, proj_dim=proj_dim, seed=seed)
    device = _device_of(model)
    with _eval_mode(model):
        task = copy.deepcopy(task)
        task.prepare(model, loader)
        parts = [features(model, task.loss, to_device(batch, device), task.inputs) for batch in loader]
    if not parts:
        raise ValueError("loader: expected at least one batch, got none")
    return _kmeans("model", torch.cat(parts), size, seed, balanced, 50)


def sizes(groups) -> torch.Tensor:
    """Members per group: LongTensor [G], `torch.bincount(groups)` of a partition's ids [n] (checked)."""
    ids, count = group_ids(groups, None)
    return torch.bincount(ids, minlength=count)


def expand(scores, groups, *, reduce="sum") -> torch.Tensor:
    """Spread group scores [..., G] over the points [..., n]: its group's score ("sum") or a member's share ("mean").

    Equivalent to `scores[..., groups]` (or `(scores / sizes(groups))[..., groups]`), on scores' device and dtype.
    Raises: ValueError/TypeError naming `scores`, `groups` or `reduce`.
    """
    ids, count = group_ids(groups, None)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce: expected 'sum' or 'mean', got {reduce!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or not scores.is_floating_point():
        got = f"{list(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a float tensor [..., G] with G == {count} (from groups), got {got}")
    if scores.shape[-1] != count:
        raise ValueError(f"scores: expected shape [..., G] with G == {count} (from groups), got {list(scores.shape)}")
    if reduce == "mean":
        scores = scores / torch.bincount(ids, minlength=count).to(scores.device, scores.dtype)
    return scores.index_select(-1, ids.to(scores.device))


def _split(classes: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Ids splitting each class c of `classes` [n] (ids 0..C-1, all used) into ceil(n_c / size) groups, members in a
    seeded random order, group sizes within a class differing by at most 1."""
    n = classes.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(classes[order], stable=True).indices]  # by class, seeded random within each
    members = torch.bincount(classes)
    per_class = -(-members // size)
    of = classes[order]
    rank = torch.arange(n) - (members.cumsum(0) - members)[of]
    ids = torch.empty(n, dtype=torch.long)
    ids[order] = (per_class.cumsum(0) - per_class)[of] + rank * per_class[of] // members[of]
    return ids


def _check_options(size, seed, balanced) -> tuple[int, int]:
    """(size, seed) checked, and balanced a bool: the K-means options, checked before any model runs."""
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced: expected True or False, got {type(balanced).__name__}")
    return check_int("size", size, 1), check_seed(seed)


def _kmeans(name: str, x: torch.Tensor, size, seed, balanced, iters) -> torch.Tensor:
    """`kmeans` on x [n, d] after checking the options and x (named `name` in errors)."""
    size, seed = _check_options(size, seed, balanced)
    iters = check_int("iters", iters, 1)
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"{name}: expected at least one point (n >= 1), got shape {list(x.shape)}")
    x = x.detach().double()
    check_finite(name, x)
    count = -(-n // size)
    centres = _plus_plus(x, count, torch.Generator().manual_seed(seed))
    assign = None
    for _ in range(iters):
        dist = _distances(x, centres)
        new = _fill_empty(dist.argmin(1), dist, count)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        members = torch.bincount(assign, minlength=count).unsqueeze(1)
        centres = x.new_zeros(count, x.shape[1]).index_add_(0, assign, x) / members
    if balanced:
        assign = _capacitated(_distances(x, centres), -(-n // count))
    return _by_first_occurrence(assign.cpu(), count)


def _distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, G] of points x [n, d] to centres [G, d]."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)).clamp_min_(0)


def _plus_plus(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ centres [count, d]: a uniform first point, then points drawn ∝ squared distance to the nearest
    centre so far (uniforms from the CPU generator, so draws do not depend on the device's RNG)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (), generator=generator))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(count - 1):
        cumulative = nearest.cumsum(0)
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        pick = min(int(torch.searchsorted(cumulative, u * cumulative[-1], right=True)), n - 1)
        chosen.append(pick)
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    return x[chosen]


def _fill_empty(assign: torch.Tensor, dist: torch.Tensor, count: int) -> torch.Tensor:
    """`assign` with each empty cluster given the point farthest from its centroid, among points that are not the
    first member of their cluster (so no cluster empties); n >= count guarantees enough such points."""
    n = assign.shape[0]
    members = torch.bincount(assign, minlength=count)
    empty = (members == 0).nonzero().flatten()
    if empty.numel() == 0:
        return assign
    index = torch.arange(n, device=assign.device)
    first = torch.full((count,), n, device=assign.device).scatter_reduce_(0, assign, index, "amin")
    spread = dist.gather(1, assign.unsqueeze(1)).squeeze(1)
    spread[first[members > 0]] = -1  # keep one member of every cluster
    donors = torch.sort(spread, descending=True, stable=True).indices[:empty.numel()]
    assign = assign.clone()
    assign[donors] = empty
    return assign


def _capacitated(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assignment [n] with at most `capacity` points per centre: points in order of their distance to the nearest
    centre, each to the nearest centre with room left.

    Computed by deferred acceptance (each point proposes to its centres nearest first; a centre holds its
    `capacity` highest-priority proposers and rejects the rest), whose result, with one priority order shared by all
    centres, is exactly the sequential greedy one, in a few vectorised rounds instead of a loop over points."""
    n, count = dist.shape
    preference = dist.argsort(dim=1, stable=True)
    priority = torch.empty(n, dtype=torch.long, device=dist.device)
    priority[dist.min(1).values.argsort(stable=True)] = torch.arange(n, device=dist.device)
    choice = torch.zeros(n, dtype=torch.long, device=dist.device)
    while True:
        target = preference.gather(1, choice.unsqueeze(1)).squeeze(1)
        order = torch.argsort(target * n + priority)
        held = torch.bincount(target, minlength=count)
        place = torch.empty_like(order)
        place[order] = torch.arange(n, device=dist.device) - (held.cumsum(0) - held)[target[order]]
        rejected = place >= capacity
        if not rejected.any():
            return target
        choice += rejected


def _by_first_occurrence(assign: torch.Tensor, count: int) -> torch.Tensor:
    """`assign` (all of 0..count-1 used) renumbered so that ids appear in increasing order of first occurrence."""
    first = torch.full((count,), assign.shape[0]).scatter_reduce_(0, assign, torch.arange(assign.shape[0]), "amin")
    relabel = torch.empty(count, dtype=torch.long)
    relabel[first.argsort()] = torch.arange(count)
    return relabel[assign]


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode, every module's own mode restored afterward."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model):
    """The device of the model's first parameter, or None (batches stay where they are) for a model without any."""
    param = next(model.parameters(), None)
    return None if param is None else param.device
