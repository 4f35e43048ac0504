"""attrprims.hvp: hvp, ggn_vp and HessianOperator against float64 Hessian / Gauss–Newton matrices built row by row."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import reference
from attrprims import HessianOperator, ggn_vp, hvp

PROBLEMS = ["logistic", "mlp"]


def cross_entropy(outputs, batch):
    return F.cross_entropy(outputs, batch[1], reduction="none")


def logistic_loss(outputs, batch):
    return F.binary_cross_entropy_with_logits(outputs[:, 0], batch[1], reduction="none")


def problem(name, n=12, seed=0, dtype=torch.float64):
    """(model, loss_fn, batches, model_args): logistic regression on 4 features or models.mlp with cross-entropy,
    float64 unless `dtype`, the n examples split into two batches of different sizes."""
    g = torch.Generator().manual_seed(seed)
    if name == "logistic":
        torch.manual_seed(seed)
        model, loss = nn.Linear(4, 1).double(), logistic_loss
        batch = (torch.randn(n, 4, generator=g, dtype=torch.float64), (torch.rand(n, generator=g) > 0.5).double())
    else:
        model, _, batch, _ = models.setting(name, n, seed)
        loss = cross_entropy
    model = model.to(dtype)
    batch = (batch[0].to(dtype), batch[1].to(dtype) if batch[1].is_floating_point() else batch[1])
    cut = n // 3
    batches = [tuple(t[:cut] for t in batch), tuple(t[cut:] for t in batch)]
    return model, loss, batches, lambda example: ((example[0],), {})


def vectors(b, p, seed=1, dtype=torch.float64):
    return torch.randn(b, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def functional(model, loss, batch):
    """loss_fn(params) and output_fn(params) of `model` on one batch, for the functional API."""
    def outputs(params):
        return torch.func.functional_call(model, params, (batch[0],))

    return (lambda params: loss(outputs(params), batch).mean()), outputs


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("b", [0, 1, 3])
def test_hvp_matches_hessian(name, b):
    model, loss, batches, args = problem(name)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    loss_of_params, _ = functional(model, loss, batches[1])
    h = reference.hessian(model, loss, batches[1:], names, args)
    v = vectors(b, h.shape[0])
    out = hvp(loss_of_params, params, v)
    assert out.shape == v.shape and out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out, v @ h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hvp(loss_of_params, params, vectors(1, h.shape[0])[0]), (vectors(1, h.shape[0]) @ h)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_ggn_vp_matches_gauss_newton(name):
    model, loss, batches, args = problem(name)
    names = [n for n, _ in model.named_parameters()]
    _, outputs = functional(model, loss, batches[1])
    g = reference.ggn(model, loss, batches[1:], names, args)
    v = vectors(3, g.shape[0])
    out = ggn_vp(outputs, lambda o: loss(o, batches[1]).mean(), dict(model.named_parameters()), v)
    torch.testing.assert_close(out, v @ g, rtol=1e-10, atol=1e-12)
    assert bool(torch.linalg.eigvalsh(g).min() > -1e-12)  # cross-entropy is convex in the logits: the GGN is PSD


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_operator_over_batches(name, kind, reduction):
    """Mean over all examples, not over batches (the two batches differ in size)."""
    model, loss, batches, args = problem(name)
    op = HessianOperator(model, loss, batches, kind=kind, reduction=reduction)
    matrix = (reference.hessian if kind == "hessian" else reference.ggn)(model, loss, batches, op.layout.names, args,
                                                                         reduction)
    assert (op.p, op.count, op.num_batches, op.dtype) == (matrix.shape[0], 12, 2, torch.float64)
    v = vectors(4, op.p)
    torch.testing.assert_close(op.matvec(v), v @ matrix, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v[0]), v[0] @ matrix, rtol=1e-10, atol=1e-12)


def test_operator_selected_parameters_in_layout_order():
    model, loss, batches, args = problem("mlp")
    op = HessianOperator(model, loss, batches, params=["4.bias", "0.weight"])
    assert op.layout.names == ("0.weight", "4.bias")
    h = reference.hessian(model, loss, batches, list(op.layout.names), args)
    v = vectors(2, op.p)
    torch.testing.assert_close(op.matvec(v), v @ h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_batch_estimate(reduction):
    """matvec(v, batch) is the batch's mean curvature (times N for "sum"): unbiased over batches of equal size."""
    model, loss, batches, args = problem("mlp")
    op = HessianOperator(model, loss, batches, reduction=reduction)
    scale = op.count if reduction == "sum" else 1
    v = vectors(2, op.p)
    for batch in batches:
        h = reference.hessian(model, loss, [batch], op.layout.names, args, "mean")
        torch.testing.assert_close(op.matvec(v, batch=batch), scale * v @ h, rtol=1e-10, atol=1e-12)


def test_float32_against_float64():
    model64, loss, batches64, args = problem("mlp")
    model, _, batches, _ = problem("mlp", dtype=torch.float32)
    h = reference.hessian(model64, loss, batches64, [n for n, _ in model64.named_parameters()], args)
    op = HessianOperator(model, loss, batches, kind="hessian")
    v = vectors(3, op.p)
    out = op.matvec(v)  # float64 v is cast to the parameters' float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), v @ h, rtol=1e-4, atol=1e-5)


def test_loop_equals_vmap():
    model, loss, batches, _ = problem("mlp")
    v = vectors(3, HessianOperator(model, loss, batches).p)
    for kind in ("hessian", "ggn"):
        fast = HessianOperator(model, loss, batches, kind=kind).matvec(v)
        slow = HessianOperator(model, loss, batches, kind=kind, vectorize=False).matvec(v)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


class Square(torch.autograd.Function):
    """x², with forward and backward rules but no vmap rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.saved_tensors[0] * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * ctx.saved_tensors[0] * t


def test_vmap_fallback_warns_and_loops():
    """An autograd.Function without a vmap rule cannot be vmapped: the loop takes over, with a warning."""
    model, _, batches, args = problem("logistic")
    op = HessianOperator(model, lambda o, b: Square.apply(o[:, 0] - b[1]), batches)
    v = vectors(3, op.p)
    with pytest.warns(UserWarning, match="vectorize: vmap cannot batch"):
        out = op.matvec(v)
    h = reference.hessian(model, lambda o, b: (o[:, 0] - b[1]) ** 2, batches, op.layout.names, args)
    torch.testing.assert_close(out, v @ h, rtol=1e-10, atol=1e-12)
    silent = HessianOperator(model, lambda o, b: Square.apply(o[:, 0] - b[1]), batches, vectorize=False)
    torch.testing.assert_close(silent.matvec(v), out, rtol=0, atol=0)


def test_errors_name_the_argument():
    model, loss, batches, _ = problem("logistic")
    op = HessianOperator(model, loss, batches)
    with pytest.raises(ValueError, match=r"v: expected shape \[b, p\] or \[p\] with p == 5"):
        op.matvec(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="v: expected shape"):
        op.matvec(torch.zeros(1, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="v: expected finite"):
        op.matvec(torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="v: expected dtype"):
        op.matvec(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="v: expected a torch.Tensor"):
        op.matvec([0.0] * 5)
    with pytest.raises(ValueError, match="kind: expected one of 'hessian', 'ggn'"):
        HessianOperator(model, loss, batches, kind="fisher")
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, loss, batches, reduction="max")
    with pytest.raises(ValueError, match="batches: expected a re-iterable"):
        HessianOperator(model, loss, (b for b in batches))
    with pytest.raises(ValueError, match="batches: expected at least one example"):
        HessianOperator(model, loss, [])
    with pytest.raises(ValueError, match="params: selects no parameters"):
        HessianOperator(model, loss, batches, params=[])
    with pytest.raises(ValueError, match="loss_fn: expected a floating tensor of shape"):
        HessianOperator(model, lambda o, b: loss(o, b).mean(), batches).matvec(vectors(1, 5))
    with pytest.raises(ValueError, match="params: expected a non-empty dict"):
        hvp(lambda params: 0, {}, torch.zeros(1))
    with pytest.raises(RuntimeError, match="to return a scalar"):  # raised as is: no vmap fallback warning
        hvp(lambda params: params["w"] * 2, {"w": torch.ones(2)}, torch.ones(2))
    with pytest.raises(ValueError, match="params: expected floating tensors"):
        hvp(lambda params: 0, {"w": torch.zeros(2, dtype=torch.int64)}, torch.zeros(2))
