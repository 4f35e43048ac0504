"""Group attribution (GGDA) through every method's featurize(..., groups=): groups of one are per-point attribution,
summed-gradient methods score a group as the sum of its members, TRAK's group estimator against its formula in
float64, the store holds and resumes group features, and bad group ids are named."""

import pytest
import torch
from torch import nn

import reference
from attrprims import Projector, param_layout
from attrprims.groups import expand
from attrprims.methods import TRAK, GradCos, GradDot, InfluenceFunction, RepresenterPoints, TracInCP
from attrprims.tasks import MultiClassClassification

TASK = MultiClassClassification()
ARGS = lambda example: ((example[0],), {})  # noqa: E731  (model arguments of a batch)
N = 45

METHODS = {
    "trak": lambda net: TRAK(net, TASK, proj_dim=16, seed=1, progress=False),
    "trak-factored": lambda net: TRAK(net, TASK, proj_dim=16, kind="factored", progress=False),
    "grad-dot": lambda net: GradDot(net, TASK, progress=False),
    "grad-cos-projected": lambda net: GradCos(net, TASK, proj_dim=24, progress=False),
    "tracin-generic": lambda net: TracInCP(net, TASK, learning_rates=[0.1, 0.3], path="generic", progress=False),
    "if-ggn": lambda net: InfluenceFunction(net, TASK, curvature="ggn", damping=1e-2, progress=False),
    "if-projected-fisher": lambda net: InfluenceFunction(net, TASK, proj_dim=20, damping=1e-2, progress=False),
    "rps": lambda net: RepresenterPoints(net, TASK, l2=1e-2, progress=False),
}


def setting(models=2, seed=0):
    """Two checkpoints of a small MLP, training batches of 16 (the last one short) and one test batch."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N + 6, 6, generator=g), torch.randint(0, 3, (N + 6,), generator=g)
    nets = []
    for s in range(models):
        torch.manual_seed(s)
        nets.append(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
    train = [(x[i:min(i + 16, N)], y[i:min(i + 16, N)]) for i in range(0, N, 16)]
    return nets, train, [(x[N:], y[N:])], [n.state_dict() for n in nets]


def random_groups(count, seed=0):
    """Ids of `count` groups over the N training points, every id used, members scattered across batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.arange(count), torch.randint(0, count, (N - count,), generator=g)])[
        torch.randperm(N, generator=g)]


@pytest.mark.parametrize("name", METHODS)
def test_groups_of_one_are_per_point_attribution(name):
    nets, train, test, states = setting()
    points = METHODS[name](nets[0]).featurize(train, states)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(4))  # point i is group ids[i]
    groups = METHODS[name](nets[0]).featurize(train, states, groups=ids)
    scores = groups.score(test)
    assert scores.shape == (6, N)
    torch.testing.assert_close(scores[:, ids], points.score(test), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(groups.self_score()[ids], points.self_score(), rtol=1e-4, atol=1e-6)
    ranked = groups.score(test, topk=3)
    torch.testing.assert_close(ranked.top_values, scores.topk(3).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["grad-dot", "tracin-generic", "if-ggn", "rps"])
def test_a_group_scores_the_sum_of_its_members(name):
    """Summed loss gradients under a fixed curvature, or RPS's additive decomposition: linear in the members."""
    nets, train, test, states = setting()
    ids = random_groups(7)
    points = METHODS[name](nets[0]).featurize(train, states).score(test).double()
    groups = METHODS[name](nets[0]).featurize(train, states, groups=ids).score(test).double()
    summed = torch.zeros(6, 7, dtype=torch.float64).index_add_(1, ids, points)
    torch.testing.assert_close(groups, summed, rtol=1e-4, atol=1e-6)


def test_projecting_per_batch_or_once_per_group_agree(monkeypatch):
    """Group sums are projected once per group when [G, p] fits the budget, else batch by batch: same features."""
    from attrprims.methods import _gradients

    nets, train, test, states = setting()
    ids = random_groups(7)
    once = METHODS["trak"](nets[0]).featurize(train, states, groups=ids)
    assert once.grads.deferred
    monkeypatch.setattr(_gradients, "_DEFER_BUDGET", 0)
    per_batch = METHODS["trak"](nets[0]).featurize(train, states, groups=ids)
    assert not per_batch.grads.deferred
    torch.testing.assert_close(per_batch.score(test), once.score(test), rtol=1e-4, atol=1e-6)


def test_grad_cos_takes_the_cosine_with_the_summed_gradient():
    nets, train, test, states = setting(models=1)
    ids = random_groups(5)
    names = param_layout(nets[0]).names
    g_train = torch.cat([reference.per_sample_grads(nets[0], TASK.loss, b, names, ARGS) for b in train])
    g_test = torch.cat([reference.per_sample_grads(nets[0], TASK.loss, b, names, ARGS) for b in test])
    summed = torch.zeros(5, g_train.shape[1], dtype=torch.float64).index_add_(0, ids, g_train)
    unit = lambda g: g / g.norm(dim=1, keepdim=True)  # noqa: E731
    scores = GradCos(nets[0], TASK, progress=False).featurize(train, states, groups=ids).score(test)
    torch.testing.assert_close(scores.double(), unit(g_test) @ unit(summed).T, rtol=1e-4, atol=1e-6)


def test_trak_groups_match_the_formula():
    """Φ_G = Σ Q_i φ_i / Q_G, Q_G = mean Q_i, K = (Σ_G Φ_GᵀΦ_G + λI)⁻¹; scores mean_m[φ_m K_m Φ_Gmᵀ] · mean_m[Q_Gm]."""
    nets, train, test, states = setting()
    ids = random_groups(6)
    sizes = torch.bincount(ids).double()
    total, qs = 0, []
    for net in nets:
        names, P = param_layout(net).names, Projector(param_layout(net).p, 16, 1).matrix().double()
        phi = torch.cat([reference.per_sample_grads(net, TASK.output, b, names, ARGS) for b in train]) @ P
        phi_z = torch.cat([reference.per_sample_grads(net, TASK.output, b, names, ARGS) for b in test]) @ P
        with torch.no_grad():
            q = torch.cat([TASK.out_to_loss(net(b[0]), b).double() for b in train])
        q_group = torch.zeros(6, dtype=torch.float64).index_add_(0, ids, q) / sizes
        features = torch.zeros(6, 16, dtype=torch.float64).index_add_(0, ids, q.unsqueeze(1) * phi)
        features = features / q_group.unsqueeze(1)
        kernel = features.T @ features + 0.05 * torch.eye(16, dtype=torch.float64)
        total = total + phi_z @ torch.linalg.solve(kernel, features.T)
        qs.append(q_group)
    expected = total / len(nets) * torch.stack(qs).mean(0)
    for path in ("layer", "generic"):
        trak = TRAK(nets[0], TASK, proj_dim=16, seed=1, damping=0.05, relative=False, path=path, progress=False)
        scores = trak.featurize(train, states, groups=ids).score(test)
        torch.testing.assert_close(scores.double(), expected, rtol=2e-4, atol=1e-6)


def test_trak_store_holds_group_features_and_resumes(tmp_path):
    nets, train, test, states = setting()
    ids = random_groups(6)
    plain = TRAK(nets[0], TASK, proj_dim=8, progress=False).featurize(train, states, groups=ids).score(test)
    first = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False)
    calls, original = [], first._features

    def interrupted(task, batch, local):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return original(task, batch, local)

    first._features = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.featurize(train, states, groups=ids)
    again = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False)
    resumed, original_again = [], again._features
    again._features = lambda task, batch, local: resumed.append(1) or original_again(task, batch, local)
    scores = again.featurize(train, states, groups=ids).score(test)
    assert len(resumed) == 2 * len(train) - 3  # the three batch-checkpoint pairs stored are not recomputed
    torch.testing.assert_close(scores, plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="groups"):  # another grouping cannot reuse the partial sums
        TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False).featurize(train, states,
                                                                                        groups=random_groups(6, 1))


def test_expand_gives_each_point_its_groups_score():
    nets, train, test, states = setting(models=1)
    ids = random_groups(4)
    scores = GradDot(nets[0], TASK, progress=False).featurize(train, states, groups=ids).score(test)
    torch.testing.assert_close(expand(scores, ids), scores[:, ids])


def test_bad_groups_are_named():
    nets, train, test, states = setting(models=1)
    trak = TRAK(nets[0], TASK, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match=r"groups: expected every id in 0..5 to be used .* ids \[3\]"):
        trak.featurize(train, states, groups=torch.tensor([0, 1, 2, 4, 5] * 9))
    with pytest.raises(ValueError, match="groups: expected integer"):
        trak.featurize(train, states, groups=torch.zeros(N))
    with pytest.raises(ValueError, match=r"train_loader: yielded 45 rows, but groups has 46"):
        trak.featurize(train, states, groups=torch.zeros(N + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"train_loader: yields more rows than groups has ids \(44\)"):
        GradDot(nets[0], TASK, progress=False).featurize(train, states, groups=torch.zeros(N - 1, dtype=torch.long))
