"""attrprims.ihvp: every solver against torch.linalg.solve on float64 matrices built independently (reference.py),
to the accuracy its theory gives; fit-once reuse, divergence and indefiniteness handling, shapes, dtypes, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import models
import reference
from attrprims import SOLVERS, HessianOperator, IHVPResult, ihvp_solver
from test_hvp import problem, vectors


def model_args(example):
    return (example[0],), {}


class Counting:
    """A symmetric matrix behind the operator protocol (p, dtype, device, matvec), counting matvec calls."""

    def __init__(self, matrix):
        self.matrix, self.p, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device
        self.calls = 0

    def matvec(self, rows):
        self.calls += 1
        return rows @ self.matrix


def solve(matrix, v, damping):
    """The float64 truth: rows of (H + λI)⁻¹v."""
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    return torch.linalg.solve(matrix.double() + damping * eye, v.double().T).T


def assert_solves(result, expected, rtol):
    """‖x − x*‖ <= rtol ‖x*‖ for every row."""
    err = torch.linalg.vector_norm(result.x.double() - expected, dim=-1)
    assert bool((err <= rtol * torch.linalg.vector_norm(expected, dim=-1) + 1e-300).all()), float(err.max())


@st.composite
def spd_matrices(draw, low=1.0, high=4.0):
    """Q diag(λ) Qᵀ with p in 1..8, Q random orthogonal, eigenvalues uniform in [low, high]."""
    p = draw(st.integers(min_value=1, max_value=8))
    g = torch.Generator().manual_seed(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    return (q * (low + (high - low) * torch.rand(p, generator=g, dtype=torch.float64))) @ q.T


def ggn_problem(name):
    model, loss, batches, args = problem(name)
    op = HessianOperator(model, loss, batches, kind="ggn")
    return op, reference.ggn(model, loss, batches, op.layout.names, args)


@pytest.mark.parametrize("name", ["logistic", "mlp"])
@pytest.mark.parametrize("damping", [0.1, 1.0])
def test_explicit_and_cg_are_exact(name, damping):
    op, matrix = ggn_problem(name)
    v = vectors(3, op.p)
    expected = solve(matrix, v, damping)
    for solver in (ihvp_solver("explicit", op, damping=damping), ihvp_solver("explicit", matrix, damping=damping)):
        result = solver.solve(v)
        assert isinstance(result, IHVPResult) and result.iterations == 0 and bool(result.converged.all())
        assert_solves(result, expected, 1e-10)
        assert bool((result.residual < 1e-12).all())
    result = ihvp_solver("cg", op, damping=damping, tol=1e-11, max_iter=300).solve(v)
    assert_solves(result, expected, 1e-8)
    assert bool(result.converged.all()) and bool((result.residual <= 1e-11).all()) and 0 < result.iterations <= 300


def test_cg_honours_tol_and_max_iter():
    _, matrix = ggn_problem("mlp")
    v = vectors(4, matrix.shape[0])
    loose = ihvp_solver("cg", matrix, damping=0.01, tol=1e-2, max_iter=1000).solve(v)
    tight = ihvp_solver("cg", matrix, damping=0.01, tol=1e-10, max_iter=1000).solve(v)
    assert bool(loose.converged.all()) and bool((loose.residual <= 1e-2).all()) and loose.iterations < tight.iterations
    true_residual = torch.linalg.vector_norm(loose.x @ matrix + 0.01 * loose.x - v, dim=1) / v.norm(dim=1)
    torch.testing.assert_close(loose.residual, true_residual, rtol=1e-6, atol=1e-12)
    capped = ihvp_solver("cg", matrix, damping=0.01, tol=1e-10, max_iter=2).solve(v)
    assert capped.iterations == 2 and not bool(capped.converged.any())


def test_cg_columns_stop_independently():
    """A zero column and an eigenvector converge at once; the others go on, and each column is right."""
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    op = Counting(matrix)
    v = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    result = ihvp_solver("cg", op, tol=1e-12).solve(v)
    assert_solves(result, solve(matrix, v, 0.0), 1e-12)
    assert result.iterations == 4 and op.calls == 4 and bool(result.converged.all())


def test_cg_preconditioner():
    _, matrix = ggn_problem("mlp")
    v = vectors(2, matrix.shape[0])
    exact = ihvp_solver("explicit", matrix, damping=0.1)
    result = ihvp_solver("cg", matrix, damping=0.1, tol=1e-9, preconditioner=lambda r: exact.solve(r).x).solve(v)
    assert result.iterations == 1
    assert_solves(result, solve(matrix, v, 0.1), 1e-9)


@given(spd_matrices(), st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=1, max_value=3))
def test_matrix_free_solvers_on_spd(matrix, damping, b):
    p = matrix.shape[0]
    v = vectors(b, p, seed=p)
    expected = solve(matrix, v, damping)
    assert_solves(ihvp_solver("cg", Counting(matrix), damping=damping, tol=1e-12, max_iter=10 * p).solve(v),
                  expected, 1e-9)
    # eigenvalues of (H + λI)/scale in [1/5.5, 1] at worst: 200 steps shrink the error by (1 - 1/5.5)^200
    lissa = ihvp_solver("lissa", Counting(matrix), damping=damping, depth=200).solve(v)
    assert_solves(lissa, expected, 1e-9)
    assert lissa.iterations == 200 and bool(lissa.converged.all())
    assert_solves(ihvp_solver("arnoldi", Counting(matrix), rank=p, damping=damping).solve(v), expected, 1e-9)
    assert_solves(ihvp_solver("explicit", Counting(matrix), damping=damping).solve(v), expected, 1e-10)


def test_lissa_on_a_hessian_operator():
    op, matrix = ggn_problem("logistic")
    v = vectors(2, op.p)
    result = ihvp_solver("lissa", op, damping=0.1, depth=80, tol=1e-6, sample_batches=False).solve(v)
    assert_solves(result, solve(matrix, v, 0.1), 1e-6)
    assert bool(result.converged.all()) and bool((result.residual <= 1e-6).all())


def test_lissa_one_batch_per_step():
    """With identical batches each step's estimate is the full H; with different ones the result is a noisy estimate
    (about 16% off here, a scale-sized step leaving little room to average the batches out)."""
    model, loss, batches, args = problem("logistic", n=24)
    copies = HessianOperator(model, loss, [batches[1]] * 3)
    matrix = reference.hessian(model, loss, [batches[1]], copies.layout.names, args)
    v = vectors(2, copies.p)
    result = ihvp_solver("lissa", copies, damping=0.1, scale=0.5, depth=60, repeats=2).solve(v)
    assert result.iterations == 120
    assert_solves(result, solve(matrix, v, 0.1), 1e-8)
    everything = [torch.cat(pair) for pair in zip(*batches)]
    quarters = [tuple(t[i::4] for t in everything) for i in range(4)]
    mixed = HessianOperator(model, loss, quarters)
    full = reference.hessian(model, loss, quarters, mixed.layout.names, args)
    assert_solves(ihvp_solver("lissa", mixed, damping=0.1, scale=1.0, depth=40).solve(v), solve(full, v, 0.1), 0.25)


def test_lissa_divergence_raises():
    matrix = torch.diag(torch.tensor([1.0, 5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"scale: LiSSA diverged at step \d+"):
        ihvp_solver("lissa", matrix, scale=2.0, depth=200).solve(vectors(2, 2))  # 5/2 > 2: |1 - 2.5| > 1
    indefinite = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="raise damping"):
        ihvp_solver("lissa", indefinite, damping=0.1, depth=500).solve(vectors(1, 2))
    converging = ihvp_solver("lissa", indefinite, damping=1.0, depth=500).solve(vectors(1, 2))
    assert_solves(converging, solve(indefinite, vectors(1, 2), 1.0), 1e-9)


def test_arnoldi_full_rank_is_exact_and_fit_once():
    op, matrix = ggn_problem("mlp")
    v = vectors(3, op.p)
    solver = ihvp_solver("arnoldi", op, rank=op.p, damping=0.1)
    assert solver.eigenvalues.shape == (op.p,) and solver.eigenvectors.shape == (op.p, op.p)
    assert_solves(solver.solve(v), solve(matrix, v, 0.1), 1e-9)
    counting = Counting(matrix)
    solver = ihvp_solver("arnoldi", counting, rank=10, max_iter=40)
    fitted = counting.calls
    assert fitted == 40
    for _ in range(2):
        result = solver.solve(v)
    assert counting.calls == fitted and result.iterations == 0 and result.residual is None


def test_arnoldi_low_rank_plus_damping_is_exact():
    """H of rank 3 in p = 12: the top 3 eigenpairs are all of H, so (H_r + λI)⁻¹ is (H + λI)⁻¹."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    matrix = (u * torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)) @ u.T
    v = vectors(4, 12)
    with pytest.warns(UserWarning, match="negative eigenvalues among its top 3"):
        solver = ihvp_solver("arnoldi", Counting(matrix), rank=3, damping=0.3, subspace_only=False, max_iter=6)
    absolute = (u * torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)) @ u.T
    assert_solves(solver.solve(v), solve(absolute, v, 0.3), 1e-10)
    projected = ihvp_solver("arnoldi", Counting(absolute), rank=3, damping=0.3).solve(v)  # Schioppa et al.
    assert_solves(projected, (v @ u) / torch.tensor([5.3, 2.3, 0.8], dtype=torch.float64) @ u.T, 1e-10)


def test_arnoldi_finds_repeated_eigenvalues():
    """One start vector spans a 1-dim Krylov space of I; restarts find the other directions."""
    matrix = torch.diag(torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    solver = ihvp_solver("arnoldi", Counting(matrix), rank=6, damping=0.0)
    torch.testing.assert_close(solver.eigenvalues, torch.tensor([2.0] * 4 + [1.0] * 2, dtype=torch.float64))
    assert_solves(solver.solve(vectors(2, 6)), solve(matrix, vectors(2, 6), 0.0), 1e-12)


def test_explicit_indefinite_warns_and_uses_absolute_eigenvalues():
    g = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    values = torch.tensor([3.0, 1.0, -0.5, -2.0, 0.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"operator: H \+ λI is not positive definite.*absolute values"):
        solver = ihvp_solver("explicit", (q * values) @ q.T, damping=0.0)
    v = vectors(2, 5)
    expected = ((v @ q) * torch.tensor([1 / 3, 1.0, 2.0, 0.5, 0.0], dtype=torch.float64)) @ q.T  # 0 pseudo-inverted
    result = solver.solve(v)
    assert_solves(result, expected, 1e-10)
    assert bool(result.converged.all()) and bool((result.residual > 0.1).all())  # the residual shows the change


def test_cg_indefinite_warns():
    matrix = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.warns(UserWarning, match="not positive definite along a CG direction"):
        result = ihvp_solver("cg", matrix).solve(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert result.converged.tolist() == [True, False]


def single_linear(bias):
    """A Linear layer where EK-FAC is exact: layer inputs ã_i (with the 1 for the bias) orthogonal with distinct
    norms, output gradients δ_i = t_i (a loss linear in the outputs) orthogonal with distinct norms, so the
    empirical Fisher Σ (t_i t_iᵀ) ⊗ (ã_i ã_iᵀ) / N is diagonal in the Kronecker eigenbasis."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Linear(5, 4, bias=bias).double()
    u = torch.linalg.qr(torch.randn(5 + bias, 3, generator=g, dtype=torch.float64))[0].T
    a = (u / u[:, -1:])[:, :-1] if bias else u * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    t = torch.linalg.qr(torch.randn(4, 3, generator=g, dtype=torch.float64))[0].T
    t = t * torch.tensor([[1.5], [1.0], [0.5]], dtype=torch.float64)
    return model, (lambda o, b: (o * b[1]).sum(-1)), [(a[:2], t[:2]), (a[2:], t[2:])]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ekfac_exact_where_kfac_is(bias, reduction):
    model, loss, batches = single_linear(bias)
    op = HessianOperator(model, loss, batches, reduction=reduction)
    grads = torch.cat([reference.per_sample_grads(model, loss, b, op.layout.names, model_args) for b in batches])
    fisher = reference.empirical_fisher(grads, reduction)
    v = vectors(3, op.p)
    assert_solves(ihvp_solver("ekfac", op, damping=0.05).solve(v), solve(fisher, v, 0.05), 1e-9)


class Tokens(nn.Module):
    """Linear layers over [n, T, d] tokens, the first called twice per forward."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def token_loss(outputs, batch):
    return F.cross_entropy(outputs.reshape(-1, 3), batch[1].reshape(-1), reduction="none").reshape(-1, 3).sum(1)


@pytest.mark.parametrize("setting", ["mlp", "mlp_partial", "tokens"])
def test_ekfac_matches_reference(setting):
    if setting == "tokens":
        torch.manual_seed(6)
        g = torch.Generator().manual_seed(6)
        model = Tokens().double()
        batch = (torch.randn(7, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7, 3), generator=g))
        loss, batches = token_loss, [tuple(t[:3] for t in batch), tuple(t[3:] for t in batch)]
    else:
        model, loss, batches, _ = problem("mlp")
    params = ["0.weight", "2.bias", "4.weight", "4.bias"] if setting == "mlp_partial" else None
    op = HessianOperator(model, loss, batches, params=params)
    matrix = reference.ekfac(model, loss, batches, op.layout.names, model_args)
    v = vectors(3, op.p)
    assert_solves(ihvp_solver("ekfac", op, damping=0.01).solve(v), solve(matrix, v, 0.01), 1e-8)


def test_ekfac_and_datainf_fit_once():
    model, loss, batches, _ = problem("mlp")
    op = HessianOperator(model, loss, batches)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    for name in ("ekfac", "datainf"):
        solver = ihvp_solver(name, op, damping=0.1)
        fitted = len(forwards)
        first, second = solver.solve(vectors(2, op.p)), solver.solve(vectors(2, op.p))
        assert len(forwards) == fitted > 0
        assert torch.equal(first.x, second.x) and first.residual is None and bool(first.converged.all())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("damping", [None, 0.5])
def test_datainf_closed_form(reduction, damping):
    model, loss, batches, args = problem("mlp")
    op = HessianOperator(model, loss, batches, reduction=reduction)
    grads = torch.cat([reference.per_sample_grads(model, loss, b, op.layout.names, args) for b in batches])
    solver = ihvp_solver("datainf", op, damping=damping)
    c = grads.shape[0] if reduction == "sum" else 1
    blocks = []
    for name, offset in zip(op.layout.names, op.layout.offsets):
        g = grads[:, offset:offset + op.layout.numel(name)]
        expected = 0.1 * c * float((g ** 2).sum(1).mean()) / g.shape[1] if damping is None else damping
        assert solver.layer_damping[name] == pytest.approx(expected, rel=1e-12)
        blocks.append((offset, g.shape[1], expected))
    v = vectors(3, op.p)
    assert_solves(solver.solve(v), reference.datainf(grads, blocks, v, reduction), 1e-10)


def test_datainf_exact_for_one_example_and_close_for_large_damping():
    """Averaging inverses instead of inverting the average errs by O((‖g‖²/λ)²) relative, within one block."""
    model, loss, batches, args = problem("logistic")
    one = HessianOperator(model, loss, [tuple(t[:1] for t in batches[0])], params=["weight"])
    g = reference.per_sample_grads(model, loss, tuple(t[:1] for t in batches[0]), ["weight"], args)
    v = vectors(2, one.p)
    assert_solves(ihvp_solver("datainf", one, damping=0.01).solve(v), solve(g.T @ g, v, 0.01), 1e-12)
    op = HessianOperator(model, loss, batches, params=["weight"])
    grads = torch.cat([reference.per_sample_grads(model, loss, b, ["weight"], args) for b in batches])
    fisher, largest = reference.empirical_fisher(grads), float((grads ** 2).sum(1).max())
    for ratio in (10, 100):
        lam = ratio * largest
        assert_solves(ihvp_solver("datainf", op, damping=lam).solve(v), solve(fisher, v, lam), ratio ** -2.0)
    off = torch.linalg.vector_norm(ihvp_solver("datainf", op, damping=largest / 10).solve(v).x
                                   - solve(fisher, v, largest / 10), dim=1)
    assert bool((off > 0.1 * solve(fisher, v, largest / 10).norm(dim=1)).all())  # outside its regime it shows


SOLVER_OPTIONS = {"explicit": {}, "cg": {"tol": 1e-9, "max_iter": 50}, "lissa": {"depth": 80, "scale": 0.5},
                  "arnoldi": {"rank": 5}, "ekfac": {}, "datainf": {}}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_shapes_and_dtypes(solver):
    """[p] and [b, p] (b = 1, 3, 0), float64 and float32 operators (float32 agreeing to float32 accuracy)."""
    model, loss, batches, _ = problem("logistic")
    model32, _, batches32, _ = problem("logistic", dtype=torch.float32)
    op, op32 = HessianOperator(model, loss, batches), HessianOperator(model32, loss, batches32)
    options = dict(SOLVER_OPTIONS[solver], damping=0.1)
    s64, s32 = ihvp_solver(solver, op, **options), ihvp_solver(solver, op32, **options)
    v = vectors(3, op.p)
    full = s64.solve(v)
    assert full.x.shape == (3, 5) and full.x.dtype == torch.float64 and full.converged.shape == (3,)
    single = s64.solve(v[1])
    assert single.x.shape == (5,) and single.converged.shape == ()
    assert (single.residual is None) == (full.residual is None)
    torch.testing.assert_close(single.x, full.x[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s64.solve(v[1:2]).x[0], full.x[1], rtol=1e-10, atol=1e-12)
    empty = s64.solve(v[:0])
    assert empty.x.shape == (0, 5) and (empty.residual is None) == (full.residual is None)
    low = s32.solve(v.float())
    assert low.x.dtype == torch.float32
    torch.testing.assert_close(low.x.double(), full.x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_device(device, solver):
    """A model and batches on the device give the CPU's solution, on the device."""
    model, loss, batches, _ = problem("logistic")
    moved = copy.deepcopy(model).to(device)
    on_device = [tuple(t.to(device) for t in batch) for batch in batches]
    options = dict(SOLVER_OPTIONS[solver], damping=0.1)
    here = ihvp_solver(solver, HessianOperator(model, loss, batches), **options)
    there = ihvp_solver(solver, HessianOperator(moved, loss, on_device), **options)
    v = vectors(3, here.p)
    result = there.solve(v.to(device))
    assert result.x.device.type == device.type and result.converged.device.type == device.type
    torch.testing.assert_close(result.x.cpu(), here.solve(v).x, rtol=1e-8, atol=1e-10)


def test_errors_name_the_argument():
    matrix = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="solver: expected one of 'explicit', 'cg', 'lissa', 'arnoldi', 'ekfac', "
                                         "'datainf', got 'newton'"):
        ihvp_solver("newton", matrix)
    with pytest.raises(ValueError, match="damping: expected a finite number >= 0"):
        ihvp_solver("cg", matrix, damping=-1.0)
    solver = ihvp_solver("cg", matrix)
    with pytest.raises(ValueError, match=r"v: expected shape \[b, p\] or \[p\] with p == 3"):
        solver.solve(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="v: expected finite values"):
        solver.solve(torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="operator: expected a HessianOperator"):
        ihvp_solver("cg", lambda v: v)
    with pytest.raises(ValueError, match="operator: expected a symmetric matrix"):
        ihvp_solver("explicit", torch.triu(torch.ones(3, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="operator: expected a square matrix"):
        ihvp_solver("explicit", torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank: expected an integer in"):
        ihvp_solver("arnoldi", matrix, rank=4)
    with pytest.raises(ValueError, match="damping: subspace_only=False"):
        ihvp_solver("arnoldi", matrix, rank=2, subspace_only=False)
    with pytest.raises(ValueError, match="tol"):
        ihvp_solver("cg", matrix, tol=-1.0)
    with pytest.raises(ValueError, match="scale: expected a finite number > 0"):
        ihvp_solver("lissa", matrix, scale=0.0)
    with pytest.raises(TypeError, match="operator: ekfac needs a HessianOperator"):
        ihvp_solver("ekfac", matrix)
    model, loss, batches, _ = problem("logistic")
    with pytest.raises(ValueError, match="damping: expected > 0 for datainf"):
        ihvp_solver("datainf", HessianOperator(model, loss, batches), damping=0.0)
    cnn, out, batch, _ = models.setting("cnn", 3)
    with pytest.raises(ValueError, match="params: ekfac covers weights and biases of nn.Linear layers only"):
        ihvp_solver("ekfac", HessianOperator(cnn, out, [batch]))
    attention, out, batch, _ = models.setting("attention", 3)
    op = HessianOperator(attention, out, [batch], params=["attn.out_proj.weight", "out.weight"])
    with pytest.raises(ValueError, match="model: the Linear layer.*'attn.out_proj' were never called"):
        ihvp_solver("ekfac", op)
