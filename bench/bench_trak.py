"""Benchmark TRAK end to end against traker and dattri on scikit-learn's bundled digits: LDS and wall time.

Run from the repository root: `.bench-env/bin/python bench/bench_trak.py [--quick]` (about 8 min on the 2-core
CPU machine from an empty cache, 7 with the subset outputs cached; `--quick` about 1 min). Writes
bench/results/trak[-quick]-<slug>.md and .json. Options: --settings, --ensembles, --k-lr, --k-mlp, --subsets,
--batch, --repeat, --kinds (extra attrprims projections), --peers, --cache, --slug.

Settings: dattri's MNIST benchmarks (logistic regression; MLP 784-128-64-10 with dropout 0.1) at digits' size:
the 1,797 8x8 digits bundled with scikit-learn (no download), pixels / 16, a seeded split into 1,500 training and
297 test images (attrprims.demo.load_digits_split). Logistic regression is Linear(64, 10) (p = 650) trained as
dattri's `train_mnist_lr` (SGD lr 0.01, batch 32, 20 epochs); the MLP is 64-128-64-10 with dropout 0.1
(p = 17,226) trained as `train_mnist_mlp` (SGD lr 0.01, momentum 0.9, batch 64, 50 epochs).

For each setting, 10 checkpoints (independently trained models, seeds 0..9) and 50 subset models (random
α = 0.5 halves, `subset_masks(1500, 50, 0.5, seed=0)`) are trained once; the subset models' margins on the 297
test images are cached with `retrain_outputs` (in --cache, default <tmp>/attrprims-bench-cache, outside the
repository) so reruns skip the retraining. Every method then attributes all 297 test images to all 1,500
training images from the same first M checkpoints (M = 1 and 10) and the same DataLoader batches, and each score
matrix gets its LDS against the same subset outputs. Timed: featurization of the training set under every
checkpoint plus scoring (target gradients, the kernel solve, the score matrix), never training or LDS.

Methods (rows): attrprims TRAK with damping "auto" and with traker's λ = 0 (`damping=0.0, relative=False`;
"singular" where G has a zero eigenvalue); traker 0.3.2's TRAKer on CPU (BasicProjector, normal entries, which is
what TRAKer picks on CPU; float32 storage, `use_half_precision=False`, since float16 CPU matmuls are slow and
inexact; lambda_reg = 0, its default; features saved in a temporary directory, as TRAKer always does); dattri
0.3.0's TRAKAttributor (CPU "normal" projector, regularization 0, its default; margin as the loss and target
function, p_y as the correct-probability function, as in its TRAK examples). All use the same k (proj_dim).

The peers live only in the bench environment (see bench/README.md): `.bench-env` is created with
--system-site-packages, so its python sees torch and attrprims from the system install and traker/dattri from
its own site-packages; run this script with `.bench-env/bin/python`. Run with plain python3, the script appends
the bench environment's site-packages to the END of sys.path (so nothing there can shadow the system torch or
attrprims) when that directory exists; a peer that still does not import gets "not installed" rows.
"""

import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from attrprims.demo import load_digits_split
from attrprims.methods import TRAK
from attrprims.metrics.lds import lds
from attrprims.metrics.retrain import retrain_outputs, subset_masks
from attrprims.tasks import MultiClassClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_parser, bench_setup, cpu_jiffies, time_cpu_many, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH_SITE = ROOT / ".bench-env" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
TASK = MultiClassClassification()
COLUMNS = ["setting", "method (projection)", "M", "k", "damping", "LDS", "LDS 95% interval", "seconds",
           "× attrprims time", "traker ÷ this", "corr vs traker"]


def _peer_path():
    """Make the bench environment's peers importable from plain python3, after everything else on sys.path."""
    if str(BENCH_SITE) not in sys.path and BENCH_SITE.is_dir():
        sys.path.append(str(BENCH_SITE))


def _peer_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---- models and training: dattri's MNIST recipes at digits' size ---------------------------------------------


def make_lr():
    return nn.Sequential(nn.Linear(64, 10))


def make_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                         nn.Dropout(0.1), nn.Linear(64, 10))


SETTINGS = {
    # name: (model factory, optimizer factory, batch, epochs, recipe text)
    "LR": (make_lr, lambda ps: torch.optim.SGD(ps, lr=0.01), 32, 20,
           "dattri train_mnist_lr: SGD lr 0.01, batch 32, 20 epochs"),
    "MLP": (make_mlp, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), 64, 50,
            "dattri train_mnist_mlp: SGD lr 0.01 momentum 0.9, batch 64, 50 epochs, dropout 0.1"),
}


def train(setting, x, y, seed, on_epoch=None, settings=None):
    """A model of `setting` trained from scratch on (x, y) with dattri's recipe; seeded init, dropout and order.

    on_epoch(epoch, model) runs after each epoch (e.g. to keep checkpoints); settings: another SETTINGS-like dict.
    """
    factory, optimizer, batch, epochs, _ = (settings or SETTINGS)[setting]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 32-64 tiny examples train 4x faster on one thread than on two
    try:
        return _train(factory, optimizer, batch, epochs, x, y, seed, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(factory, optimizer, batch, epochs, x, y, seed, on_epoch=None):
    torch.manual_seed(seed)
    model = factory()
    opt = optimizer(model.parameters())
    order = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), batch):
            idx = perm[start:start + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model.eval()


def margins(model, x, y):
    with torch.no_grad():
        return TASK.output(model(x), (x, y))


# ---- the three TRAKs: each (factory, checkpoints, loaders, k) -> scores [n_test, n_train] --------------------


def run_attrprims(factory, checkpoints, train_loader, test_loader, k, damping, kind="rademacher"):
    if damping == "auto":
        trak = TRAK(factory(), TASK, proj_dim=k, seed=0, kind=kind, progress=False)
    else:
        trak = TRAK(factory(), TASK, proj_dim=k, seed=0, kind=kind, damping=damping, relative=False,
                    progress=False)
    trak.featurize(train_loader, checkpoints)
    return trak.score(test_loader)


def run_traker(factory, checkpoints, train_loader, test_loader, k):
    from trak import TRAKer

    n_train, n_test = len(train_loader.dataset), len(test_loader.dataset)
    with tempfile.TemporaryDirectory(prefix="traker-") as save_dir:
        traker = TRAKer(model=factory(), task="image_classification", train_set_size=n_train, save_dir=save_dir,
                        device="cpu", proj_dim=k, use_half_precision=False, logging_level=logging.ERROR)
        for model_id, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            for batch in train_loader:
                traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        traker.finalize_features()
        for model_id, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="bench", checkpoint=state, model_id=model_id,
                                            num_targets=n_test)
            for batch in test_loader:
                traker.score(batch=batch, num_samples=batch[0].shape[0])
        scores = traker.finalize_scores(exp_name="bench")  # [n_train, n_test] memmap
        return torch.from_numpy(scores.copy()).T.contiguous().float()


def run_dattri(factory, checkpoints, train_loader, test_loader, k):
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = factory().eval()

    def margin(params, data):  # dattri's TRAK examples: log p_y − log(1 − p_y), one example
        image, label = data
        logp = -nn.functional.cross_entropy(torch.func.functional_call(model, params, image.unsqueeze(0)),
                                            label.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data):
        image, label = data
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, image.unsqueeze(0)),
                                           label.unsqueeze(0))
        return torch.exp(-loss)

    task = AttributionTask(loss_func=margin, model=model, checkpoints=list(checkpoints))
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability, device="cpu",
                                projector_kwargs={"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": 0,
                                                  "device": "cpu"})
    attributor.cache(train_loader)
    with torch.no_grad():
        return attributor.attribute(test_loader).T.contiguous().float()  # dattri's scores are [n_train, n_test]


# ---- helpers ------------------------------------------------------------------------------------------------


def quiet(fn):
    """fn() with the peers' tqdm bars, logging and warnings silenced (they write to stderr on every call)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn()


def timed(fn):
    t0 = time.perf_counter()
    out = quiet(fn)
    return out, time.perf_counter() - t0


def _own_cpu_s():
    """CPU seconds used by this process (all threads) so far."""
    t = os.times()
    return t.user + t.system


def correlation(a, b):
    """Pearson correlation of two score matrices, flattened, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def variants(kinds, peers, k):
    """[(name, label, damping label, runner(factory, checkpoints, train_loader, test_loader, k) or None)]."""
    k_in = 1 << (k.bit_length() - 1) // 2  # TRAK's default split of a power of 2 for kind="factored"
    out = [("attrprims", "attrprims (rademacher)", "auto",
            lambda *a: run_attrprims(*a, damping="auto")),
           ("attrprims λ=0", "attrprims (rademacher)", "0",
            lambda *a: run_attrprims(*a, damping=0.0))]
    for kind in kinds:
        label = f"attrprims (factored {k // k_in}×{k_in})" if kind == "factored" else f"attrprims ({kind})"
        out.append((f"attrprims {kind}", label, "auto", lambda *a, kind=kind: run_attrprims(*a, "auto", kind)))
    for peer, fn in peers.items():
        out.append((peer, f"{peer} (normal)", f"0 ({'lambda_reg' if peer == 'traker' else 'regularization'})", fn))
    return out


def time_round_robin(runs, repeat, min_total_s=3.0, max_samples=9, keep_slow_warmup_s=1.0, log=""):
    """Seconds samples, last scores and errors of each runner in `runs` ({name: fn}), called in turn.

    As bench/_timing.time_cpu_many: one warmup round whose calls of >= keep_slow_warmup_s are kept as samples,
    then rounds until each runner has >= repeat samples totalling >= min_total_s (at most max_samples). A runner
    that raises is not called again; its error is returned instead of samples.
    """
    samples, scores, errors = {name: [] for name in runs}, {}, {}

    def call(name, warmup):
        try:
            out, dt = timed(runs[name])
        except (ValueError, RuntimeError, torch.linalg.LinAlgError) as error:
            errors[name] = error
            print(f"{log} {name}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            return
        scores[name] = out
        if not warmup or dt >= keep_slow_warmup_s:
            samples[name].append(dt)
        print(f"{log} {name}: {dt:.2f} s{' (warmup)' if warmup else ''}", flush=True)

    for name in runs:
        call(name, warmup=True)
    while todo := [name for name, got in samples.items() if name not in errors and len(got) < max_samples
                   and (len(got) < repeat or sum(got) < min_total_s)]:
        for name in todo:
            call(name, warmup=False)
    return samples, scores, errors


def main():
    ap = bench_parser(__doc__, "smoke test: 20 subsets, M = 1 and 2, smaller k, 1 repeat", cuda=False)
    ap.add_argument("--settings", default="LR,MLP", help="comma-separated subset of LR,MLP")
    ap.add_argument("--ensembles", default=None, help="comma-separated M values (default 1,10; --quick 1,2)")
    ap.add_argument("--k-lr", type=int, default=None, help="proj_dim for logistic regression (default 512)")
    ap.add_argument("--k-mlp", type=int, default=None, help="proj_dim for the MLP (default 1024)")
    ap.add_argument("--subsets", type=int, default=None, help="subset models for LDS (default 50; --quick 20)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=250, help="examples per featurization batch, all methods")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per row, at least (default 3, --quick 1; median reported)")
    ap.add_argument("--kinds", default="sjlt,factored",
                    help="extra attrprims projection kinds, damping auto ('' for none)")
    ap.add_argument("--peers", default="traker,dattri", help="comma-separated peers to run ('' for none)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "attrprims-bench-cache"),
                    help="directory for the cached subset-model outputs (outside the repository)")
    args = ap.parse_args()
    _, info, slug = bench_setup(args)
    _peer_path()
    started, busy0, own0 = time.perf_counter(), cpu_jiffies()[0], _own_cpu_s()

    settings = [s for s in args.settings.split(",") if s]
    kinds = [s for s in args.kinds.split(",") if s]
    ensembles = [int(m) for m in (args.ensembles or ("1,2" if args.quick else "1,10")).split(",")]
    k_of = {"LR": args.k_lr or (256 if args.quick else 512), "MLP": args.k_mlp or (512 if args.quick else 1024)}
    n_subsets = args.subsets or (20 if args.quick else 50)
    repeat = args.repeat or (1 if args.quick else 3)
    min_total_s = 0.0 if args.quick else 6.0
    peers = {}
    for peer in [p for p in args.peers.split(",") if p]:
        try:
            quiet(lambda: __import__({"traker": "trak", "dattri": "dattri.algorithm.trak"}[peer]))
            peers[peer] = {"traker": run_traker, "dattri": run_dattri}[peer]
        except ImportError as error:
            print(f"{peer}: not importable ({error})", flush=True)
            peers[peer] = None

    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    n_train, n_test = len(x_train), len(x_test)
    train_set = torch.utils.data.TensorDataset(x_train, y_train)
    test_set = torch.utils.data.TensorDataset(x_test, y_test)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=False)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch, shuffle=False)
    masks = subset_masks(n_train, n_subsets, args.alpha, seed=0)

    rows, notes_setting = [], []
    for setting in settings:
        factory, _, _, _, recipe = SETTINGS[setting]
        k = k_of[setting]
        p = sum(t.numel() for t in factory().parameters())
        t0 = time.perf_counter()
        models = [train(setting, x_train, y_train, seed=m) for m in range(max(ensembles))]
        checkpoints = [{name: t.detach().clone() for name, t in m.state_dict().items()} for m in models]
        accuracy = statistics.mean(float((m(x_test).argmax(1) == y_test).float().mean()) for m in models)
        t_ckpt = time.perf_counter() - t0
        t0 = time.perf_counter()
        key = {"bench": "trak", "data": f"digits {n_train}/{n_test} split seed 0, /16", "setting": setting,
               "recipe": recipe, "output": "margin on all test images"}
        outputs = retrain_outputs(lambda idx, s: train(setting, x_train[idx], y_train[idx], seed=s),
                                  lambda model: margins(model, x_test, y_test), masks, seed=0, cache=args.cache,
                                  key=key, progress=False)
        t_subsets = time.perf_counter() - t0
        print(f"{setting}: p = {p}, {len(models)} checkpoints in {t_ckpt:.1f} s (mean test accuracy "
              f"{accuracy:.3f}); {n_subsets} subset outputs in {t_subsets:.1f} s (cached in {args.cache})",
              flush=True)
        notes_setting.append(f"{setting}: p = {p:,}, k = {k}; {recipe}; mean test accuracy of the checkpoints "
                             f"{accuracy:.3f}; checkpoints trained in {t_ckpt:.1f} s, subset outputs ready in "
                             f"{t_subsets:.1f} s (near 0 when cached).")

        for M in ensembles:
            ckpts = checkpoints[:M]
            table = variants(kinds, peers, k)
            runs = {name: (lambda fn=fn: fn(factory, ckpts, train_loader, test_loader, k))
                    for name, _, _, fn in table if fn is not None}
            samples, scores, errors = time_round_robin(runs, repeat, min_total_s, log=f"{setting} M={M}")
            median = {name: statistics.median(got) for name, got in samples.items() if got}
            base, traker_s = median.get("attrprims"), median.get("traker")
            reference = scores.get("traker")
            for name, label, damping, _ in table:
                row = {"setting": f"digits {setting}", "method (projection)": label, "M": M, "k": k,
                       "damping": damping}
                if name not in runs:
                    row["LDS"] = "not installed"
                elif name in errors:
                    error = errors[name]
                    row["LDS"] = "singular" if "singular" in str(error).lower() else f"error: {type(error).__name__}"
                    row["error"] = str(error)[:300]
                else:
                    s, secs = scores[name], median[name]
                    row.update({"seconds": secs, "samples_s": samples[name],
                                "× attrprims time": secs / base if base else None,
                                "traker ÷ this": traker_s / secs if traker_s else None})
                    if not bool(torch.isfinite(s).all()):
                        row["LDS"] = f"non-finite scores ({int((~torch.isfinite(s)).sum())})"
                    else:
                        result = lds(s, masks, outputs.to(s.dtype))
                        low, high = result.interval
                        row.update({"LDS": round(result.mean, 3), "LDS 95% interval": f"{low:.3f} to {high:.3f}",
                                    "lds_low": low, "lds_high": high, "n_excluded": result.n_excluded})
                        if reference is not None:
                            row["corr vs traker"] = correlation(s, reference)
                rows.append(row)
                print({c: row.get(c) for c in COLUMNS}, flush=True)

    total = time.perf_counter() - started
    others = (cpu_jiffies()[0] - busy0) / os.sysconf("SC_CLK_TCK") - (_own_cpu_s() - own0)
    versions = {name: _peer_version(name) for name in ("traker", "dattri")}
    notes = [
        f"Data: scikit-learn's bundled digits (1,797 8x8 images, pixels / 16), seeded split: {n_train} training "
        f"and {n_test} test images; every method scores all {n_test} test images against all {n_train} training "
        f"images (batches of {args.batch}, one shared unshuffled DataLoader per split).",
        *notes_setting,
        f"LDS: {n_subsets} models trained on random α = {args.alpha} subsets (subset_masks seed 0), margins on the "
        "test images; Spearman per target, mean and 95% bootstrap interval (attrprims.metrics.lds). The same "
        "checkpoints (the first M of 10, seeds 0..M−1) and subset outputs for every method.",
        "seconds: featurization of the training set under all M checkpoints plus scoring (target gradients, the "
        "kernel solve, the score matrix); no training, no LDS. Median over calls made in turn across the methods "
        f"(>= {repeat} per row, more until they total {min_total_s:.0f} s, at most 9; a warmup call is kept when "
        f">= 1 s); {args.threads} torch threads. × attrprims time: seconds / attrprims (rademacher, auto)'s, same "
        "setting and M; traker ÷ this: traker's seconds / this row's (> 1: faster than traker).",
        "attrprims: TRAK(model, MultiClassClassification(), proj_dim=k, seed=0, kind=...), layer path; damping "
        "'auto' (the default) or 0 (damping=0.0, relative=False: traker's estimator; 'singular' when ΦᵀΦ is not "
        "positive definite). rademacher is the default projection; sjlt (sparse JL) and factored (P_out ⊗ P_in on "
        "weight matrices, LoGra) are other kinds of the same TRAK.",
        f"traker {versions['traker']}: TRAKer on CPU (BasicProjector, normal entries, regenerated block by block on "
        "every batch), use_half_precision=False, lambda_reg=0, features in a temporary save_dir. "
        f"dattri {versions['dattri']}: TRAKAttributor, CPU 'normal' projector (traker's BasicProjector, rebuilt "
        "for every batch), regularization=0.",
        "corr vs traker: Pearson correlation of the flattened score matrix with traker's (same setting and M). "
        "dattri's projector draws the same matrices as traker's, so the two agree wherever ΦᵀΦ is well "
        "conditioned; the projections of attrprims are others, so 1 is not expected there.",
        "traker's BasicProjector accepts any proj_dim (blocks of 100 columns, the last one partial); fast_jl's "
        "multiple-of-512 rule is GPU-only. Batch size matters to the peers only: they regenerate the projection "
        "matrix for every batch (traker) or rebuild the projector for every batch (dattri), so smaller batches "
        "slow them down; attrprims never holds the matrix and costs the same at any batch size.",
        "Where attrprims' time goes: on the CPU its rademacher projection at k >= 256 uses sign tables (one table "
        "load and add per 8 coordinates of 8 examples, no multiplications; bench_projection.py), and it reads the "
        "data once for all M checkpoints (each batch goes through every checkpoint in turn), where the peers "
        "featurize checkpoint by checkpoint and read the data M times. On logistic regression the per-model "
        "float64 Gram (1500 × 512), Cholesky and solves, which the peers do in float32, are most of what is left.",
        "Why λ = 0 scatters on logistic regression at k = 512: the 1500 × 650 matrix of per-example margin "
        "gradients has rank exactly 512 (singular values from 56 down to 1.1e-3, then 1e-14), so ΦᵀΦ at k = 512 "
        "is barely invertible with a condition number far beyond float32's 1/eps; traker's float32 inverse and "
        "dattri's float32 solve (same projection) then disagree with each other and with attrprims' float64 solve. "
        "Damping 'auto' does not depend on that.",
        *(["--quick: 20 subset models, M up to 2, one timed call: a smoke test of this script; its LDS intervals "
           "are too wide and its timings too few to compare methods."] if args.quick else []),
        "Training runs on one torch thread (tiny batches train ~4× faster than on two); the timed part uses "
        f"{args.threads}.",
        f"Whole run {total:.0f} s (including training, retraining when not cached, and LDS); other processes "
        f"used about {max(others, 0):.0f} CPU-seconds meanwhile (of {total * (os.cpu_count() or 1):.0f}: a large "
        "share means the timings are noisy). Command: "
        f"{' '.join(['python', *sys.argv])}.",
    ]
    write_results("trak-quick" if args.quick else "trak", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
