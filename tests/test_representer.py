"""Representer points: the decomposition reproduces the fine-tuned last layer exactly, scores follow it."""

import pytest
import torch
from torch import nn

from attrprims.methods import RepresenterPoints
from attrprims.tasks import BinaryClassification, LanguageModeling, MultiClassClassification

TASK = MultiClassClassification()


def setting(models=2, n=48, m=6, classes=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n + m, 5, generator=g), torch.randint(0, classes, (n + m,), generator=g)
    nets = []
    for s in range(models):
        torch.manual_seed(s)
        nets.append(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, classes, bias=bias)))
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    return nets, train, [(x[n:], y[n:])]


@pytest.mark.parametrize("bias", [True, False])
def test_decomposition_reproduces_the_fine_tuned_layer(bias):
    """Fitting the checkpoint's own probabilities (the default): the fit's targets are softmax of its logits."""
    nets, train, test = setting(bias=bias)
    rps = RepresenterPoints(nets[0], TASK, l2=1e-2, progress=False).featurize(train, [n.state_dict() for n in nets])
    x = torch.cat([b[0] for b in train])
    torch.testing.assert_close(rps._fits[0]["targets"], torch.softmax(nets[0](x).double(), 1).detach())
    for m, fit in enumerate(rps._fits):
        features = torch.cat([torch.tanh(nets[m][0](b[0]).double()) for b in test]).detach()
        if bias:
            features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(rps.decompose(m, features), features @ fit["theta"].T, rtol=1e-5, atol=1e-6)
        # Θ* is a stationary point of the regularised objective.
        theta = fit["theta"].clone().requires_grad_(True)
        soft = -(fit["targets"] * torch.log_softmax(fit["features"] @ theta.T, dim=1)).sum(1).mean()
        loss = soft + 1e-2 * (theta ** 2).sum()
        loss.backward()
        assert float(theta.grad.abs().max()) < 1e-7


def test_scores_are_each_targets_class_term_averaged_over_checkpoints():
    nets, train, test = setting()
    rps = RepresenterPoints(nets[0], TASK, l2=1e-2, progress=False).featurize(train, [n.state_dict() for n in nets])
    scores = rps.score(test)
    assert scores.shape == (6, 48)
    y = test[0][1]
    expected = 0
    for m, fit in enumerate(rps._fits):
        f = torch.cat([torch.tanh(nets[m][0](test[0][0]).double()), torch.ones(6, 1, dtype=torch.float64)], 1).detach()
        expected = expected + (f @ fit["features"].T) * fit["alpha"][:, y].T / 2
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    # Summed over the training set, a target's scores are its fine-tuned logit of its own class (mean over models).
    logits = sum((torch.cat([torch.tanh(nets[m][0](test[0][0]).double()), torch.ones(6, 1, dtype=torch.float64)],
                            1).detach() @ fit["theta"].T) for m, fit in enumerate(rps._fits)) / 2
    torch.testing.assert_close(scores.double().sum(1), logits.gather(1, y.unsqueeze(1)).squeeze(1), rtol=1e-5,
                               atol=1e-5)
    ranked = rps.score(test, topk=4, bottomk=3)
    assert torch.equal(ranked.top_indices, scores.topk(4).indices)
    assert torch.equal(ranked.bottom_indices, (-scores).topk(3).indices)
    self_scores = rps.self_score()
    assert self_scores.shape == (48,) and torch.isfinite(self_scores).all()


def test_fitting_the_labels_is_stationary_for_cross_entropy():
    nets, train, test = setting(models=1)
    rps = RepresenterPoints(nets[0], TASK, l2=1e-2, targets="labels", progress=False)
    fit = rps.featurize(train, [nets[0].state_dict()])._fits[0]
    theta = fit["theta"].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(fit["features"] @ theta.T, fit["labels"]) + 1e-2 * (theta ** 2).sum()
    loss.backward()
    assert float(theta.grad.abs().max()) < 1e-7
    torch.testing.assert_close(rps.decompose(0, fit["features"][:5]), fit["features"][:5] @ fit["theta"].T,
                               rtol=1e-5, atol=1e-6)


def test_binary_one_logit():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g).float()
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    rps = RepresenterPoints(net, BinaryClassification(), l2=1e-2, progress=False)
    train = [(x[:32], y[:32])]
    scores = rps.featurize(train, [net.state_dict()]).score([(x[32:], y[32:])])
    fit = rps._fits[0]
    f = torch.cat([torch.relu(net[0](x[32:])).double(), torch.ones(8, 1, dtype=torch.float64)], 1).detach()
    logit = (f @ fit["theta"].T).squeeze(1)
    torch.testing.assert_close(scores.double().sum(1), (2 * y[32:].double() - 1) * logit, rtol=1e-5, atol=1e-5)


def test_unlabelled_targets_use_the_checkpoints_predicted_class():
    nets, train, test = setting()
    rps = RepresenterPoints(nets[0], TASK, l2=1e-2, progress=False).featurize(train, [n.state_dict() for n in nets])
    x = test[0][0]
    predicted = (sum(torch.softmax(n(x).double(), 1) for n in nets) / 2).argmax(1).detach()
    unlabelled = rps.score([x])
    torch.testing.assert_close(unlabelled, rps.score([(x, predicted)]))
    torch.testing.assert_close(rps.score([(x,)], topk=3).top_values, unlabelled.topk(3).values)
    with pytest.raises(ValueError, match="train_loader"):
        rps.featurize([b[0] for b in train], [nets[0].state_dict()])


def test_a_fine_tuning_stopped_early_warns():
    nets, train, test = setting(models=1)
    with pytest.warns(UserWarning, match="max_iter"):
        RepresenterPoints(nets[0], TASK, l2=1e-2, max_iter=1, progress=False).featurize(train, [nets[0].state_dict()])


def test_bad_arguments_are_named():
    nets, train, test = setting(models=1)
    with pytest.raises(TypeError, match="task"):
        RepresenterPoints(nets[0], LanguageModeling())
    with pytest.raises(ValueError, match="l2"):
        RepresenterPoints(nets[0], TASK, l2=0)
    with pytest.raises(ValueError, match="targets"):
        RepresenterPoints(nets[0], TASK, targets="soft")
    with pytest.raises(ValueError, match="last_layer"):
        RepresenterPoints(nets[0], TASK, last_layer="1")
    with pytest.raises(ValueError, match="max_iter"):
        RepresenterPoints(nets[0], TASK, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        RepresenterPoints(nets[0], TASK, tol=-1.0)
    with pytest.raises(ValueError, match="featurize"):
        RepresenterPoints(nets[0], TASK, progress=False).score(test)
