"""Benchmark the IHVP solvers on scikit-learn's bundled digits: fit time, solve time and error vs the exact solve.

Run from the repository root: `python bench/bench_ihvp.py [--quick]`. Writes bench/results/ihvp[-quick]-<slug>.md
and .json. Each solver computes (H + λI)⁻¹v for b vectors v (test-loss gradients' stand-ins: N(0,1) directions)
on the same HessianOperator; the exact answer is the explicit solver's (Cholesky of the materialised H).
ekfac and datainf approximate the empirical Fisher, so their error is measured against the exact solve with the
empirical Fisher (mean of g gᵀ) in place of H: each is compared with what it approximates.
"""

import sys
import time
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from attrprims import HessianOperator, ihvp_solver, per_sample_grads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_parser, bench_setup, write_results  # noqa: E402

COLUMNS = ["model", "p", "solver", "target", "options", "fit_s", "solve_s", "iterations", "rel_err"]


def digits_batches(n, batch):
    data = load_digits()
    x = torch.tensor(data.data[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target[:n])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def trained(model, batches, steps=200):
    """A few hundred full-batch Adam steps, so H is taken near a minimum as influence functions assume."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def loss(outputs, batch):
    return nn.functional.cross_entropy(outputs, batch[1], reduction="none")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel_err(x, ref):
    return float(torch.linalg.vector_norm(x.double() - ref) / torch.linalg.vector_norm(ref))


def main():
    args = bench_parser(__doc__, "logistic regression only, fewer examples", cuda=False).parse_args()
    _, info, slug = bench_setup(args)
    torch.manual_seed(0)
    n = 300 if args.quick else 1000
    batches = digits_batches(n, 100)
    models = {"logistic regression": nn.Linear(64, 10).double()}
    if not args.quick:
        models["MLP 64-32-10"] = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    damping, b = 1e-3, 10
    rows = []
    for name, model in models.items():
        trained(model, batches)
        op = HessianOperator(model, loss, batches, kind="ggn")
        v = torch.randn(b, op.p, dtype=torch.float64)
        exact, fit = timed(lambda: ihvp_solver("explicit", op, damping=damping))
        result, solve = timed(lambda: exact.solve(v))
        ref = result.x
        rows.append({"model": name, "p": op.p, "solver": "explicit", "target": "GGN", "options": "", "fit_s": fit,
                     "solve_s": solve, "iterations": result.iterations, "rel_err": 0.0})
        grads = torch.cat([per_sample_grads(model, loss, batch, flat=True) for batch in batches])
        fisher = grads.T @ grads / grads.shape[0]
        fisher_ref = torch.linalg.solve(fisher + damping * torch.eye(op.p, dtype=torch.float64), v.T).T
        variants = [("cg", "GGN", {"tol": 1e-8, "max_iter": 500}),
                    ("lissa", "GGN", {"depth": 1000, "repeats": 1, "sample_batches": False}),
                    ("arnoldi", "GGN", {"rank": min(op.p, 200)}),
                    ("ekfac", "Fisher", {}),
                    ("datainf", "Fisher", {"damping": damping})]
        for solver, target, options in variants:
            opts = {"damping": damping, **options}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built, fit = timed(lambda: ihvp_solver(solver, op, **opts))
                result, solve = timed(lambda: built.solve(v))
            rows.append({"model": name, "p": op.p, "solver": solver, "target": target,
                         "options": ", ".join(f"{k}={val}" for k, val in options.items()), "fit_s": fit,
                         "solve_s": solve, "iterations": result.iterations,
                         "rel_err": rel_err(result.x, fisher_ref if target == "Fisher" else ref)})
            print(rows[-1], flush=True)
    notes = [f"Data: the first {n} of scikit-learn's bundled digits (64 features / 16), batches of 100; models trained "
             "200 full-batch Adam steps, float64. H = the GGN of the mean cross-entropy (PSD), damping λ = 1e-3.",
             f"b = {b} random N(0,1) vectors per solve. rel_err: ‖x − x_exact‖ / ‖x_exact‖, x_exact from Cholesky of "
             "the materialised H + λI (target GGN) or of the empirical Fisher + λI (target Fisher: what ekfac and "
             "datainf approximate; datainf is exact only within a parameter block and for λ ≫ ‖g‖²).",
             "fit_s: building the solver (H materialised, eigenpairs, factors); solve_s: one solve of the b vectors; "
             "iterations: batched operator applications during the solve.",
             f"{args.threads} torch threads, single runs (seconds-scale timings)."]
    write_results("ihvp-quick" if args.quick else "ihvp", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
