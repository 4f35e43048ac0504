"""Influence functions, TracInCP, Grad-Dot and Grad-Cos against their formulas written out in float64 on small
models, with per-example gradients from one backward pass per example and the Hessian from autograd."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrprims import Projector, param_layout
from attrprims.methods.gradient_similarity import GradCos, GradDot, GradientSimilarity, TracInCP
from attrprims.methods.influence import InfluenceFunction
from attrprims.tasks import MultiClassClassification

TASK = MultiClassClassification()


def setting(models=2, n=40, m=5, hidden=False, seed=0):
    """Checkpoints of a logistic regression (or a small MLP), training batches and one test batch."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n + m, 6, generator=g), torch.randint(0, 3, (n + m,), generator=g)
    nets = []
    for s in range(models):
        torch.manual_seed(s)
        nets.append(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)) if hidden else nn.Sequential(nn.Linear(6, 3)))
    train = [(x[i:min(i + 16, n)], y[i:min(i + 16, n)]) for i in range(0, n, 16)]
    return nets, train, [(x[n:], y[n:])]


def loss_grads(net, batches):
    """[N, p] float64 gradients of each example's cross-entropy, one backward pass per example."""
    net = copy.deepcopy(net).double()
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            net.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 1].double()), y[i:i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


def mean_loss_hessian(net, batches):
    """[p, p] float64 Hessian of the mean training cross-entropy (parameters in param_layout order)."""
    net = copy.deepcopy(net).double()
    names = param_layout(net).names
    shapes = {k: v.shape for k, v in net.named_parameters()}
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])

    def loss(flat):
        params, start = {}, 0
        for name in names:
            size = shapes[name].numel()
            params[name] = flat[start:start + size].reshape(shapes[name])
            start += size
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    flat = torch.cat([dict(net.named_parameters())[name].detach().reshape(-1) for name in names])
    return torch.autograd.functional.hessian(loss, flat)


def states(nets):
    return [n.state_dict() for n in nets]


@pytest.mark.parametrize("path", ["layer", "generic"])
def test_grad_dot_tracin_and_cos_match_formulas(path):
    nets, train, test = setting(hidden=True)
    g_train, g_test = [loss_grads(n, train) for n in nets], [loss_grads(n, test) for n in nets]
    dot = sum(a @ b.T for a, b in zip(g_test, g_train)) / 2
    scores = GradDot(nets[0], TASK, path=path, progress=False).featurize(train, states(nets)).score(test)
    torch.testing.assert_close(scores.double(), dot, rtol=1e-4, atol=1e-5)
    lr = [0.1, 0.3]
    tracin = TracInCP(nets[0], TASK, learning_rates=lr, path=path, progress=False).featurize(train, states(nets))
    expected = sum(w * a @ b.T for w, a, b in zip(lr, g_test, g_train))
    torch.testing.assert_close(tracin.score(test).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tracin.self_score().double(), sum(w * (b ** 2).sum(1) for w, b in zip(lr, g_train)),
                               rtol=1e-4, atol=1e-5)
    unit = [g / g.norm(dim=1, keepdim=True) for g in g_test], [g / g.norm(dim=1, keepdim=True) for g in g_train]
    cos = sum(a @ b.T for a, b in zip(*unit)) / 2
    scores = GradCos(nets[0], TASK, path=path, progress=False).featurize(train, states(nets)).score(test)
    torch.testing.assert_close(scores.double(), cos, rtol=1e-4, atol=1e-5)


def test_projected_grad_dot_is_the_projected_inner_product():
    nets, train, test = setting(models=1, hidden=True)
    p = param_layout(nets[0]).p
    P = Projector(p, 32, seed=7).matrix().double()
    a, b = loss_grads(nets[0], test) @ P, loss_grads(nets[0], train) @ P
    method = GradDot(nets[0], TASK, proj_dim=32, seed=7, progress=False).featurize(train, states(nets))
    torch.testing.assert_close(method.score(test).double(), a @ b.T, rtol=1e-4, atol=1e-5)
    ranked = method.score(test, topk=3, bottomk=2)
    dense = method.score(test)
    assert torch.equal(ranked.top_indices, dense.topk(3).indices)
    assert torch.equal(ranked.bottom_indices, (-dense).topk(2).indices)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_explicit_influence_matches_the_closed_form_on_logistic_regression(curvature):
    """For a linear model with cross-entropy the GGN is the Hessian, so both give the same closed form."""
    nets, train, test = setting(models=1)
    damping = 1e-2
    h = mean_loss_hessian(nets[0], train)
    inverse = torch.linalg.inv(h + damping * torch.eye(h.shape[0], dtype=torch.float64))
    g_train, g_test = loss_grads(nets[0], train), loss_grads(nets[0], test)
    expected = g_test @ inverse @ g_train.T
    method = InfluenceFunction(nets[0], TASK, damping=damping, curvature=curvature, progress=False)
    method.featurize(train, states(nets))
    torch.testing.assert_close(method.score(test).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.self_score().double(), (g_train @ inverse * g_train).sum(1), rtol=1e-4,
                               atol=1e-5)
    cg = InfluenceFunction(nets[0], TASK, solver="cg", damping=damping, curvature=curvature,
                           solver_options={"tol": 1e-10, "max_iter": 500}, progress=False)
    torch.testing.assert_close(cg.featurize(train, states(nets)).score(test).double(), expected, rtol=1e-3,
                               atol=1e-5)


@pytest.mark.parametrize("k", [16, 64])  # 64 > 40 training examples: solved through the 40×40 kernel
def test_influence_averages_checkpoints_and_projects_with_the_fisher(k):
    nets, train, test = setting(models=2, hidden=True)
    p = param_layout(nets[0]).p
    P = Projector(p, k, seed=1).matrix().double()
    expected = 0
    for net in nets:
        a, b = loss_grads(net, test) @ P, loss_grads(net, train) @ P
        fisher = b.T @ b / b.shape[0]
        expected = expected + a @ torch.linalg.inv(fisher + 0.1 * torch.eye(k, dtype=torch.float64)) @ b.T / 2
    method = InfluenceFunction(nets[0], TASK, damping=0.1, proj_dim=k, seed=1, progress=False)
    torch.testing.assert_close(method.featurize(train, states(nets)).score(test).double(), expected, rtol=1e-4,
                               atol=1e-4)


def test_bad_arguments_are_named():
    nets, train, test = setting(models=2)
    with pytest.raises(ValueError, match="similarity"):
        GradientSimilarity(nets[0], TASK, similarity="l2")
    with pytest.raises(ValueError, match="weights: expected one per checkpoint"):
        TracInCP(nets[0], TASK, learning_rates=[0.1], progress=False).featurize(train, states(nets))
    with pytest.raises(ValueError, match="weights"):
        TracInCP(nets[0], TASK, learning_rates=[float("nan"), 1.0])
    with pytest.raises(ValueError, match="featurize"):
        GradDot(nets[0], TASK, progress=False).score(test)
    with pytest.raises(ValueError, match="solver"):
        InfluenceFunction(nets[0], TASK, solver="newton")
    with pytest.raises(ValueError, match="curvature"):
        InfluenceFunction(nets[0], TASK, proj_dim=8, curvature="hessian")
    with pytest.raises(ValueError, match="solver: the 'fisher' curvature"):
        InfluenceFunction(nets[0], TASK, solver="lissa", curvature="fisher")
    with pytest.raises(ValueError, match="featurize"):
        InfluenceFunction(nets[0], TASK, progress=False).self_score()
    with pytest.raises(ValueError, match="checkpoints"):
        GradDot(nets[0], TASK, progress=False).featurize(train, [])


def test_params_select_the_last_layer_and_methods_run_on_every_device(device):
    """params= restricts every gradient to the chosen parameters; the same scores come out on CPU and CUDA."""
    nets, train, test = setting(models=2, hidden=True)
    last = 5 * 3 + 3  # "2.weight" and "2.bias" are the last entries in param_layout order
    g_train = [loss_grads(n, train)[:, -last:] for n in nets]
    g_test = [loss_grads(n, test)[:, -last:] for n in nets]
    on = [(tuple(t.to(device) for t in b)) for b in train], [(tuple(t.to(device) for t in b)) for b in test]
    dot = GradDot(nets[0], TASK, params=["2.weight", "2.bias"], device=device, progress=False)
    scores = dot.featurize(on[0], states(nets)).score(on[1])
    assert scores.device.type == device.type
    expected = sum(a @ b.T for a, b in zip(g_test, g_train)) / 2
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=1e-4, atol=1e-5)
    fisher = InfluenceFunction(nets[0], TASK, curvature="fisher", damping=0.1, params=["2.weight", "2.bias"],
                               device=device, progress=False)
    expected = 0
    for a, b in zip(g_test, g_train):
        f = b.T @ b / b.shape[0] + 0.1 * torch.eye(last, dtype=torch.float64)
        expected = expected + a @ torch.linalg.solve(f, b.T) / 2
    torch.testing.assert_close(fisher.featurize(on[0], states(nets)).score(on[1]).cpu().double(), expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver,options,agreement", [
    ("lissa", {"depth": 300, "scale": 5.0}, 0.98),
    ("arnoldi", {"rank": 20}, 0.99),
    ("ekfac", {}, 0.9),
    ("datainf", {}, 0.8),
])
def test_every_solver_runs_and_approximates_the_explicit_scores(solver, options, agreement):
    """The approximate solvers land near the exact scores on logistic regression (ekfac and datainf approximate the
    empirical Fisher, so they agree less)."""
    nets, train, test = setting(models=1)
    exact = InfluenceFunction(nets[0], TASK, damping=0.05, progress=False).featurize(train, states(nets)).score(test)
    method = InfluenceFunction(nets[0], TASK, solver=solver, damping=0.05, solver_options=options, progress=False)
    scores = method.featurize(train, states(nets)).score(test)
    assert torch.isfinite(scores).all()
    a, b = scores.double().flatten() - scores.double().mean(), exact.double().flatten() - exact.double().mean()
    assert float(a @ b / (a.norm() * b.norm())) > agreement


def test_explicit_influence_predicts_leave_one_out_retraining():
    """On an L2-regularised logistic regression trained to its optimum, −Δloss from leaving each point out matches
    the influence (damping = the L2 coefficient, so the Hessian is the objective's): Pearson > 0.99."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
    l2 = 0.05

    def fit(keep):
        model = nn.Linear(4, 3).double()
        params = list(model.parameters())
        for p in params:
            nn.init.zeros_(p)
        opt = torch.optim.LBFGS(params, max_iter=200, tolerance_grad=1e-12, tolerance_change=0,
                                line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[keep].double()), y[keep]) + l2 / 2 * sum((p ** 2).sum()
                                                                                                 for p in params)
            loss.backward()
            return loss

        opt.step(objective)
        return nn.Sequential(model.float())

    everything = torch.arange(50)
    full = fit(everything)
    test_x, test_y = x[50:], y[50:]
    train = [(x[:50], y[:50])]
    scores = InfluenceFunction(full, TASK, damping=l2, progress=False).featurize(train, states([full]))
    scores = scores.score([(test_x, test_y)]).double()
    with torch.no_grad():
        base = nn.functional.cross_entropy(full(test_x).double(), test_y, reduction="none")
        effects = torch.stack([nn.functional.cross_entropy(fit(everything[everything != j])(test_x).double(), test_y,
                                                           reduction="none") - base for j in range(10)], 1)
    # Removing a helpful point raises the test loss: effect ≈ score / n.
    a, b = scores[:, :10].flatten(), effects.flatten()
    a, b = a - a.mean(), b - b.mean()
    assert float(a @ b / (a.norm() * b.norm())) > 0.99
