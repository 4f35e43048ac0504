"""groups: every grouping is a partition with the right G, seeded, class-pure, balanced where promised; K-means on
known blobs; representation/gradient K-means on a tiny MLP; expand against hand computations; errors name arguments."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attrprims import groups
from attrprims.methods._gradients import GradientFeatures
from attrprims.tasks import MultiClassClassification


def _assert_partition(ids, n, count):
    assert ids.dtype == torch.long and ids.device.type == "cpu" and ids.shape == (n,)
    assert torch.equal(ids.unique(), torch.arange(count))


def _same_up_to_relabelling(a, b):
    """One bijection maps the ids of a onto those of b."""
    pairs = torch.stack([a, b]).unique(dim=1)
    return pairs.shape[1] == a.unique().numel() == b.unique().numel()


def _blobs(per_blob, centres, seed=0):
    """Points [sum, d] around each centre with spread 0.1, and the blob of each point."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.1 * torch.randn(per_blob, len(c), generator=g, dtype=torch.float64) for c in centres])
    return x, torch.arange(len(centres)).repeat_interleave(per_blob)


def _mlp_data(n=23, batch=8):
    """A tiny float64 MLP (4 → 6 → 3) in train mode, with Dropout, and batches (inputs, labels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)
    return model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


# ---- by_class and random ---------------------------------------------------------------------------------------

def test_by_class_one_group_per_class_in_class_order():
    labels = torch.tensor([7, -1, 3, 7, 3, 3])
    assert torch.equal(groups.by_class(labels), torch.tensor([2, 0, 1, 2, 1, 1]))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_by_class_split_never_mixes_classes_and_is_balanced_per_class(size):
    labels = torch.randint(4, (57,), generator=torch.Generator().manual_seed(size))
    ids = groups.by_class(labels, size=size, seed=3)
    counts = torch.bincount(labels)
    _assert_partition(ids, 57, sum(math.ceil(c / size) for c in counts.tolist()))
    for g in ids.unique():
        assert labels[ids == g].unique().numel() == 1
    for c in labels.unique():
        per_group = torch.bincount(ids[labels == c])
        per_group = per_group[per_group > 0]
        assert per_group.max() - per_group.min() <= 1 and per_group.max() <= size
    group_class = torch.zeros(int(ids.max()) + 1, dtype=torch.long).scatter_(0, ids, labels)
    assert torch.equal(group_class, group_class.sort().values)  # class c's groups follow class c-1's
    assert torch.equal(ids, groups.by_class(labels, size=size, seed=3))


@pytest.mark.parametrize("n, size", [(0, 3), (1, 1), (10, 3), (10, 10), (10, 11), (97, 7)])
def test_random_sizes_differ_by_at_most_one(n, size):
    ids = groups.random(n, size=size, seed=5)
    _assert_partition(ids, n, math.ceil(n / size))
    if n:
        counts = torch.bincount(ids)
        assert counts.max() - counts.min() <= 1 and counts.max() <= size


def test_random_is_seeded():
    assert torch.equal(groups.random(50, size=5, seed=1), groups.random(50, size=5, seed=1))
    assert not torch.equal(groups.random(50, size=5, seed=1), groups.random(50, size=5, seed=2))
    assert not torch.equal(groups.by_class(torch.zeros(50, dtype=torch.long), size=5, seed=1),
                           groups.by_class(torch.zeros(50, dtype=torch.long), size=5, seed=2))


# ---- kmeans --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("balanced", [False, True])
def test_kmeans_recovers_separated_blobs(device, balanced):
    x, blob = _blobs(20, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0]]))
    for seed in range(5):
        ids = groups.kmeans(x.to(device), size=20, seed=seed, balanced=balanced)
        _assert_partition(ids, 100, 5)
        assert _same_up_to_relabelling(ids, blob)


def test_kmeans_ids_by_first_occurrence_and_deterministic():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    ids = groups.kmeans(x, size=6, seed=9)
    _assert_partition(ids, 40, 7)
    first = [int((ids == g).nonzero()[0]) for g in range(7)]
    assert first == sorted(first)
    assert torch.equal(ids, groups.kmeans(x, size=6, seed=9))
    assert torch.equal(ids, groups.kmeans(x.double(), size=6, seed=9))


@pytest.mark.parametrize("n, size", [(50, 7), (50, 3), (31, 30), (9, 2)])
def test_kmeans_balanced_respects_the_capacity(n, size):
    x, _ = _blobs(n, torch.tensor([[0.0, 0.0, 0.0]]), seed=n)
    x[: n // 2] += 50.0  # two unequal masses: unconstrained clusters would be uneven
    count = math.ceil(n / size)
    ids = groups.kmeans(x, size=size, balanced=True)
    _assert_partition(ids, n, count)
    assert torch.bincount(ids).max() <= math.ceil(n / count)


def test_kmeans_balanced_is_the_sequential_greedy():
    """Deferred acceptance equals: points by distance to the nearest centre, each to the nearest centre with room."""
    g = torch.Generator().manual_seed(4)
    dist = torch.rand(30, 4, generator=g, dtype=torch.float64)
    room = [8] * 4
    expected = torch.empty(30, dtype=torch.long)
    for i in dist.min(1).values.argsort(stable=True).tolist():
        c = next(c for c in dist[i].argsort(stable=True).tolist() if room[c])
        room[c] -= 1
        expected[i] = c
    assert torch.equal(groups._capacitated(dist, 8), expected)


def test_kmeans_edge_sizes():
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(groups.kmeans(x, size=1), torch.arange(12))
    assert torch.equal(groups.kmeans(x, size=12), torch.zeros(12, dtype=torch.long))
    assert torch.equal(groups.kmeans(x, size=100, balanced=True), torch.zeros(12, dtype=torch.long))
    assert torch.equal(groups.kmeans(x[:1], size=1), torch.zeros(1, dtype=torch.long))
    _assert_partition(groups.kmeans(x[:, :0], size=5), 12, 3)  # d = 0: all points coincide


@pytest.mark.parametrize("balanced", [False, True])
def test_kmeans_duplicate_points_still_fill_every_group(balanced):
    x = torch.tensor([[0.0, 0.0]] * 9 + [[1.0, 1.0]] * 3)
    for size in (1, 2, 5):
        ids = groups.kmeans(x, size=size, seed=1, balanced=balanced)
        _assert_partition(ids, 12, math.ceil(12 / size))
        if size == 5 and not balanced:
            assert ids[9:].unique().numel() == 1


def test_input_kmeans_is_kmeans_on_flattened_inputs():
    images = torch.randint(0, 256, (30, 2, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ids = groups.input_kmeans(images, size=4, seed=2, balanced=True)
    assert torch.equal(ids, groups.kmeans(images.reshape(30, -1).double(), size=4, seed=2, balanced=True))
    _assert_partition(groups.input_kmeans(torch.arange(5.0), size=2), 5, 3)


@given(n=st.integers(1, 60), size=st.integers(1, 70), seed=st.integers(0, 2**64 - 1), balanced=st.booleans())
def test_property_groupings_are_partitions(n, size, seed, balanced):
    count = math.ceil(n / size)
    _assert_partition(groups.random(n, size=size, seed=seed), n, count)
    labels = torch.randint(3, (n,), generator=torch.Generator().manual_seed(n))
    ids = groups.by_class(labels, size=size, seed=seed)
    _assert_partition(ids, n, sum(math.ceil(c / size) for c in torch.bincount(labels).tolist() if c))
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(size)).round()  # rounding makes duplicates
    ids = groups.kmeans(x, size=size, seed=seed, balanced=balanced, iters=10)
    _assert_partition(ids, n, count)
    if balanced:
        assert torch.bincount(ids).max() <= math.ceil(n / count)


# ---- representations and gradients of a model ------------------------------------------------------------------

def test_representation_kmeans_groups_the_last_linear_inputs():
    model, batches = _mlp_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = groups.representation_kmeans(model, batches, size=5, seed=1)
    _assert_partition(ids, 23, 5)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x, _ in batches])
    assert torch.equal(ids, groups.kmeans(hidden, size=5, seed=1))
    first = groups.representation_kmeans(model, batches, layer="0", size=5, seed=1, inputs=lambda b: b[0])
    assert torch.equal(first, groups.kmeans(torch.cat([x for x, _ in batches]), size=5, seed=1))


def test_grad_kmeans_groups_the_gradient_features():
    model, batches = _mlp_data()
    task = MultiClassClassification()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    last = [name for name, _ in model.named_parameters()][-2:]  # the last Linear's weight and bias: the default
    for proj_dim, params, p in [(8, None, 6 * 3 + 3), (None, None, 6 * 3 + 3), (8, "all", 4 * 6 + 6 + 6 * 3 + 3)]:
        ids = groups.grad_kmeans(model, task, batches, size=4, seed=3, proj_dim=proj_dim, balanced=True,
                                 params=[n for n, _ in model.named_parameters()] if params else None)
        _assert_partition(ids, 23, 6)
        model.eval()
        features = GradientFeatures(model, params=None if params else last, proj_dim=proj_dim, seed=3)
        direct = torch.cat([features(model, task.loss, batch, task.inputs) for batch in batches])
        model.train()
        assert direct.shape == (23, proj_dim or p)
        assert torch.equal(ids, groups.kmeans(direct, size=4, seed=3, balanced=True))
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ---- sizes and expand ------------------------------------------------------------------------------------------

def test_sizes_and_expand_by_hand(device):
    ids = torch.tensor([1, 0, 1, 2, 1])
    assert torch.equal(groups.sizes(ids.to(device)), torch.tensor([1, 3, 1]))
    scores = torch.tensor([[3.0, 6.0, 9.0], [1.0, -3.0, 0.5]], device=device)
    assert torch.equal(groups.expand(scores, ids).cpu(), torch.tensor([[6.0, 3.0, 6.0, 9.0, 6.0],
                                                                       [-3.0, 1.0, -3.0, 0.5, -3.0]]))
    assert torch.equal(groups.expand(scores, ids.tolist(), reduce="mean").cpu(),
                       torch.tensor([[2.0, 3.0, 2.0, 9.0, 2.0], [-1.0, 1.0, -1.0, 0.5, -1.0]]))
    assert groups.expand(scores[0].double(), ids, reduce="mean").dtype == torch.float64


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: groups.by_class(torch.tensor([0.5, 1.0])), ValueError, "labels"),
    (lambda: groups.by_class(torch.zeros(2, 2, dtype=torch.long)), ValueError, "labels"),
    (lambda: groups.by_class([0, 1]), TypeError, "labels"),
    (lambda: groups.by_class(torch.tensor([0, 1]), size=0), ValueError, "size"),
    (lambda: groups.by_class(torch.tensor([0, 1]), seed=-1), ValueError, "seed"),
    (lambda: groups.random(-1, size=2), ValueError, "n"),
    (lambda: groups.random(5, size=1.5), TypeError, "size"),
    (lambda: groups.random(5, size=True), TypeError, "size"),
    (lambda: groups.kmeans(torch.zeros(3), size=1), ValueError, "features"),
    (lambda: groups.kmeans(torch.zeros(3, 2, dtype=torch.long), size=1), ValueError, "features"),
    (lambda: groups.kmeans(torch.zeros(0, 2), size=1), ValueError, "features"),
    (lambda: groups.kmeans(torch.tensor([[0.0], [float("nan")]]), size=1), ValueError, "features"),
    (lambda: groups.kmeans(torch.zeros(3, 2), size=0), ValueError, "size"),
    (lambda: groups.kmeans(torch.zeros(3, 2), size=1, seed=2**64), ValueError, "seed"),
    (lambda: groups.kmeans(torch.zeros(3, 2), size=1, balanced=1), TypeError, "balanced"),
    (lambda: groups.kmeans(torch.zeros(3, 2), size=1, iters=0), ValueError, "iters"),
    (lambda: groups.input_kmeans([1.0, 2.0], size=1), TypeError, "inputs"),
    (lambda: groups.input_kmeans(torch.tensor(1.0), size=1), ValueError, "inputs"),
    (lambda: groups.input_kmeans(torch.tensor([1.0, float("inf")]), size=1), ValueError, "inputs"),
    (lambda: groups.sizes(torch.tensor([0, 2])), ValueError, "groups"),
    (lambda: groups.sizes(torch.tensor([[0, 1]])), ValueError, "groups"),
    (lambda: groups.sizes(3), ValueError, "groups"),
    (lambda: groups.expand(torch.zeros(2, 3), torch.tensor([0, 1])), ValueError, "scores"),
    (lambda: groups.expand(torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])), ValueError, "scores"),
    (lambda: groups.expand(torch.zeros(2), torch.tensor([0, 1]), reduce="max"), ValueError, "reduce"),
    (lambda: groups.expand(torch.zeros(2), torch.tensor([-1, 0])), ValueError, "groups"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_model_errors_name_the_argument():
    model, batches = _mlp_data()
    task = MultiClassClassification()
    with pytest.raises(ValueError, match="layer"):
        groups.representation_kmeans(model, batches, layer="nope", size=2)
    with pytest.raises(ValueError, match="layer"):
        groups.representation_kmeans(nn.Tanh(), batches, size=2)
    with pytest.raises(ValueError, match="loader"):
        groups.representation_kmeans(model, [], size=2)
    with pytest.raises(TypeError, match="task"):
        groups.grad_kmeans(model, task.loss, batches, size=2)
    with pytest.raises(ValueError, match="proj_dim"):
        groups.grad_kmeans(model, task, batches, size=2, proj_dim=0)
    with pytest.raises(ValueError, match="loader"):
        groups.grad_kmeans(model, task, [], size=2)
    with pytest.raises(ValueError, match="size"):
        groups.grad_kmeans(model, task, batches, size=0)
    with pytest.raises(ValueError, match="params: model has no nn.Linear"):
        groups.grad_kmeans(nn.Sequential(nn.Conv1d(1, 2, 1), nn.Flatten()), task, batches, size=2)
    assert model.training
