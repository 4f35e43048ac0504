"""Benchmark every attribution method on digits: LDS, leave-one-out correlation, noisy-label AUC, time and memory.

Run from the repository root: `.bench-env/bin/python bench/bench_methods.py [--quick]` (dattri 0.3.0 from the bench
environment runs side by side; plain python3 gives "not installed" there). Writes
bench/results/methods[-quick]-<slug>.md and .json. Options: --settings, --methods, --peers, --loo, --cache.

Data: scikit-learn's bundled digits, the seeded 1500/297 split of bench_trak.py; settings LR and MLP as there (dattri's
MNIST recipes at digits' size) and a small CNN (two 3x3 convolutions, 8 and 16 channels, average-pooled to 2x2,
then Linear(64, 10); SGD lr 0.01 momentum 0.9, batch 64, 20 epochs). Every method attributes all 297 test images to
all 1500 training images from one checkpoint (seed 0; TracInCP from 5 checkpoints of that run).

Metrics:
- LDS: 50 models retrained on random halves (the subset outputs bench_trak.py caches, same key), Spearman per target.
- LOO: the models retrained without each of 40 seeded training points; effect = full − LOO margin per target;
  Pearson over the points, mean over targets (attrprims.metrics.loo). For LR the model is the optimum of the convex
  L2-regularised (1e-3) cross-entropy, found by L-BFGS in float64, so that leaving a point out has a deterministic
  effect; the methods then score that model (influence with damping equal to the L2 term is then exact up to the
  quadratic approximation). For the MLP and CNN, the SGD checkpoint retrained with the same seed: the effects mix in
  training noise.
- noisy AUC: 10% of the training labels flipped (seeded), a model trained on them with the setting's recipe, each
  method featurized on it: ROC AUC of finding the flipped points by self-score (attrprims.metrics.noisy_label_auc).
- seconds: featurize + score for the LDS run (one call); peak MiB: that call's peak RSS increase in a fresh process.
"""

import contextlib
import io
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trak  # noqa: E402
from _timing import bench_parser, bench_setup, peak_mib, write_results  # noqa: E402

from attrprims.demo import load_digits_split  # noqa: E402
from attrprims.methods import TRAK, GradCos, GradDot, InfluenceFunction, RepresenterPoints, TracInCP  # noqa: E402
from attrprims.metrics import lds, loo, noisy_label_auc, retrain_outputs, subset_masks  # noqa: E402
from attrprims.tasks import MultiClassClassification  # noqa: E402

TASK = MultiClassClassification()
COLUMNS = ["setting", "method", "LDS", "LDS 95% interval", "LOO pearson", "noisy AUC", "seconds", "peak MiB",
           "dattri LDS", "dattri seconds", "dattri ÷ attrprims time"]


def make_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


SETTINGS = {**bench_trak.SETTINGS,
            "CNN": (make_cnn, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), 64, 20,
                    "SGD lr 0.01 momentum 0.9, batch 64, 20 epochs")}
LAST_LAYER = {"LR": "0", "MLP": "6", "CNN": "7"}
LR_L2 = 1e-3  # the convex LR model's L2 term (mean loss + LR_L2/2 ‖θ‖²) for LOO
TRACIN_EPOCHS = {"LR": (4, 8, 12, 16, 20), "MLP": (10, 20, 30, 40, 50), "CNN": (4, 8, 12, 16, 20)}


def last(setting):
    return [f"{LAST_LAYER[setting]}.weight", f"{LAST_LAYER[setting]}.bias"]


# ---- the methods: name -> (label, build(setting, model, checkpoints) -> (method, checkpoints)) ---------------

def _if_explicit(setting, model, damping):
    params = None if setting == "LR" else last(setting)
    # 32 Hessian columns per vmapped pass: the CNN's convolutions make each tangent costly in memory.
    return InfluenceFunction(model, TASK, damping=damping, params=params, solver_options={"chunk": 32},
                             progress=False)


METHODS = {
    "IF explicit": (lambda s: "IF explicit (all p)" if s == "LR" else "IF explicit (last layer)",
                    lambda s, model, damping: _if_explicit(s, model, damping)),
    "IF cg": (lambda s: "IF cg (all p, 30 iterations)",
              lambda s, model, damping: InfluenceFunction(model, TASK, solver="cg", damping=damping,
                                                          solver_options={"max_iter": 30, "tol": 1e-6},
                                                          progress=False)),
    "IF datainf": (lambda s: "IF datainf (all p)",
                   lambda s, model, damping: InfluenceFunction(model, TASK, solver="datainf", curvature="ggn",
                                                               progress=False)),
    "IF fisher k=512": (lambda s: "IF projected Fisher (k = 512)",
                        lambda s, model, damping: InfluenceFunction(model, TASK, proj_dim=512, damping=damping,
                                                                    progress=False)),
    "TracInCP": (lambda s: "TracInCP (5 checkpoints, k = 512)",
                 lambda s, model, damping: TracInCP(model, TASK, learning_rates=[0.01] * 5, proj_dim=512,
                                                    progress=False)),
    "Grad-Dot": (lambda s: "Grad-Dot (k = 512)",
                 lambda s, model, damping: GradDot(model, TASK, proj_dim=512, progress=False)),
    "Grad-Cos": (lambda s: "Grad-Cos (k = 512)",
                 lambda s, model, damping: GradCos(model, TASK, proj_dim=512, progress=False)),
    "RPS": (lambda s: "RPS-L2 (λ = 3e-3)",
            lambda s, model, damping: RepresenterPoints(model, TASK, last_layer=LAST_LAYER[s], l2=3e-3,
                                                        progress=False)),
    "TRAK": (lambda s: "TRAK (k = 512, 1 model)",
             lambda s, model, damping: TRAK(model, TASK, proj_dim=512, progress=False)),
}
DAMPING = {"LR": LR_L2, "MLP": 1e-2, "CNN": 1e-2}


def attribute(name, setting, checkpoints, loaders, damping=None):
    """(method after featurize, scores [n_test, n_train]) of method `name` on `setting`'s checkpoints."""
    method = METHODS[name][1](setting, SETTINGS[setting][0](), DAMPING[setting] if damping is None else damping)
    ckpts = checkpoints if name == "TracInCP" else checkpoints[-1:]
    method.featurize(loaders[0], ckpts)
    return method, (method.score(loaders[1]) if loaders[1] is not None else None)


def _peak_setup(name, setting, checkpoints, batch):
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    return name, setting, checkpoints, _loaders(x_train, y_train, x_test, y_test, batch)


def _peak_run(state):
    name, setting, checkpoints, loaders = state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribute(name, setting, checkpoints, loaders)


def _loaders(x_train, y_train, x_test, y_test, batch):
    dataset = torch.utils.data.TensorDataset
    return (torch.utils.data.DataLoader(dataset(x_train, y_train), batch_size=batch, shuffle=False),
            torch.utils.data.DataLoader(dataset(x_test, y_test), batch_size=batch, shuffle=False))


# ---- dattri: the same methods where it has them ----------------------------------------------------------------

def run_dattri(name, setting, checkpoints, loaders):
    """dattri's scores [n_test, n_train] (its output transposed) for `name`, or None where it has no counterpart."""
    from dattri.task import AttributionTask

    model = SETTINGS[setting][0]().eval()

    def loss(params, data):  # one example (per-example gradients) or a batch (dattri's Hessians): mean loss
        image, label = data
        if label.dim() == 0:
            image, label = image.unsqueeze(0), label.unsqueeze(0)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, image), label)

    state = checkpoints[-1]
    if name == "IF explicit" and setting == "CNN":
        return None  # its torch.func Hessian over the one batch of 1500 it needs went past 24 GB (killed)
    if name in ("IF explicit", "IF cg"):
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit

        task = AttributionTask(loss_func=loss, model=model, checkpoints=[state])
        layer = None if setting == "LR" or name == "IF cg" else last(setting)
        if name == "IF explicit":
            attributor = IFAttributorExplicit(task=task, layer_name=layer, regularization=DAMPING[setting])
        else:
            attributor = IFAttributorCG(task=task, max_iter=30, regularization=DAMPING[setting])
        # One batch: dattri sums the inverse-HVPs of the cache loader's batches instead of inverting their sum.
        full = torch.utils.data.DataLoader(loaders[0].dataset, batch_size=len(loaders[0].dataset), shuffle=False)
        attributor.cache(full)
        return attributor.attribute(loaders[0], loaders[1]).T.float()
    if name in ("TracInCP", "Grad-Dot", "Grad-Cos"):
        from dattri.algorithm.tracin import TracInAttributor

        ckpts = checkpoints if name == "TracInCP" else [state]
        task = AttributionTask(loss_func=loss, model=model, checkpoints=list(ckpts))
        weights = torch.full((len(ckpts),), 0.01 if name == "TracInCP" else 1.0)
        attributor = TracInAttributor(task=task, weight_list=weights, normalized_grad=name == "Grad-Cos",
                                      projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0,
                                                        "device": "cpu"})
        return attributor.attribute(loaders[0], loaders[1]).T.float()
    if name == "RPS":
        from dattri.algorithm.rps import RPSAttributor

        def target(pre_activation_list, label_list):
            return nn.functional.cross_entropy(pre_activation_list, label_list)

        task = AttributionTask(loss_func=loss, model=model, checkpoints=[state], target_func=target)
        attributor = RPSAttributor(task=task, final_linear_layer_name=LAST_LAYER[setting], l2_strength=3e-3)
        attributor.cache(loaders[0])
        return attributor.attribute(loaders[0], loaders[1]).T.float()
    if name == "TRAK":
        return bench_trak.run_dattri(SETTINGS[setting][0], [state], loaders[0], loaders[1], 512)
    return None


# ---- models ----------------------------------------------------------------------------------------------------

def train_convex(x, y):
    """Logistic regression at the optimum of mean cross-entropy + LR_L2/2 ‖θ‖² (L-BFGS, float64)."""
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    params = list(model.parameters())
    optimizer = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                                  history_size=50, line_search_fn="strong_wolfe")
    x = x.double()

    def objective():
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(model(x), y) + LR_L2 / 2 * sum((p ** 2).sum() for p in params)
        value.backward()
        return value

    optimizer.step(objective)
    return nn.Sequential(model.float()).eval()


def trained(setting, x, y, seed=0):
    """(the model after training, the TracIn snapshots' state_dicts with the final one last)."""
    snapshots = []
    epochs = set(TRACIN_EPOCHS[setting])

    def keep(epoch, model):
        if epoch in epochs:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    model = bench_trak.train(setting, x, y, seed, on_epoch=keep, settings=SETTINGS)
    return model, snapshots


# ---- the run -----------------------------------------------------------------------------------------------

def quiet(fn):
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn()


def main():
    ap = bench_parser(__doc__, "LR only, Grad-Dot/IF explicit/TRAK, 20 LOO points: a smoke test", cuda=False)
    ap.add_argument("--settings", default="LR,MLP,CNN")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--peers", default="dattri", help="'' for none")
    ap.add_argument("--loo", type=int, default=None, help="left-out training points for LOO (default 40)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "attrprims-bench-cache"))
    args = ap.parse_args()
    _, info, slug = bench_setup(args)
    bench_trak._peer_path()
    started = time.perf_counter()
    settings = ["LR"] if args.quick else [s for s in args.settings.split(",") if s]
    methods = ["IF explicit", "Grad-Dot", "TRAK"] if args.quick else [m for m in args.methods.split(",") if m]
    n_loo = args.loo or (20 if args.quick else 40)
    dattri = False
    if "dattri" in args.peers.split(","):
        try:
            quiet(lambda: __import__("dattri.algorithm.tracin"))
            dattri = True
        except ImportError as error:
            print(f"dattri: not importable ({error})", flush=True)

    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    n_train, n_test = len(x_train), len(x_test)
    loaders = _loaders(x_train, y_train, x_test, y_test, args.batch)
    masks = subset_masks(n_train, 50, 0.5, seed=0)
    left_out = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))[:n_loo].sort().values
    loo_masks = torch.ones(n_loo, n_train, dtype=torch.bool)
    loo_masks[torch.arange(n_loo), left_out] = False
    flip_gen = torch.Generator().manual_seed(2)
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=flip_gen)[:n_train // 10]] = True
    noisy_y = y_train.clone()
    noisy_y[flipped] = (y_train[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=flip_gen)) % 10
    rows, notes_setting = [], []

    for setting in settings:
        t0 = time.perf_counter()
        recipe = SETTINGS[setting][4]
        model, snapshots = trained(setting, x_train, y_train)
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        key = {"bench": "trak", "data": f"digits {n_train}/{n_test} split seed 0, /16", "setting": setting,
               "recipe": recipe, "output": "margin on all test images"}

        def train_fn(idx, s, setting=setting):
            return bench_trak.train(setting, x_train[idx], y_train[idx], seed=s, settings=SETTINGS)

        subsets = retrain_outputs(train_fn, lambda m: bench_trak.margins(m, x_test, y_test), masks, seed=0,
                                  cache=args.cache, key=key, progress=False)
        if setting == "LR":
            loo_model = train_convex(x_train, y_train)
            full = bench_trak.margins(loo_model, x_test, y_test)
            loo_outputs = retrain_outputs(lambda idx, s: train_convex(x_train[idx], y_train[idx]),
                                          lambda m: bench_trak.margins(m, x_test, y_test), loo_masks, seed=0,
                                          cache=args.cache, key={**key, "loo": "convex L2 1e-3 L-BFGS"},
                                          progress=False)
            loo_ckpts = [loo_model.state_dict()]
        else:
            full = bench_trak.margins(model, x_test, y_test)
            # Every LOO model is trained with the full model's seed (0), not a per-subset seed.
            loo_outputs = retrain_outputs(lambda idx, s: train_fn(idx, 0),
                                          lambda m: bench_trak.margins(m, x_test, y_test), loo_masks, seed=0,
                                          cache=args.cache, key={**key, "loo": "seed 0"}, progress=False)
            loo_ckpts = None
        noisy_model, noisy_snapshots = trained(setting, x_train, noisy_y)
        noisy_loaders = _loaders(x_train, noisy_y, x_test, y_test, args.batch)
        notes_setting.append(f"{setting}: {recipe}; test accuracy {accuracy:.3f}; models (checkpoint, 50 subsets "
                             f"cached, {n_loo} LOO, noisy) ready in {time.perf_counter() - t0:.0f} s.")
        print(notes_setting[-1], flush=True)

        for name in methods:
            if name == "IF cg" and setting != "LR":
                continue  # 30 batched HVP passes per solve, and self_score solves all 1500 training gradients
            label = METHODS[name][0](setting)
            row = {"setting": f"digits {setting}", "method": label}
            try:
                t0 = time.perf_counter()
                _, scores = quiet(lambda: attribute(name, setting, snapshots, loaders))
                row["seconds"] = time.perf_counter() - t0
                result = lds(scores, masks, subsets)
                row["LDS"], row["LDS 95% interval"] = result.mean, f"{result.interval[0]:.3f} to {result.interval[1]:.3f}"
                if loo_ckpts is not None:
                    _, loo_scores = quiet(lambda: attribute(name, setting, loo_ckpts * 5, loaders))
                else:
                    loo_scores = scores
                row["LOO pearson"] = loo(loo_scores[:, left_out], loo_outputs, full).pearson
                noisy, _ = quiet(lambda: attribute(name, setting, noisy_snapshots, (noisy_loaders[0], None)))
                row["noisy AUC"] = noisy_label_auc(noisy.self_score().double(), flipped)
                row["peak MiB"] = peak_mib("cpu", _peak_setup, _peak_run, name, setting, snapshots, args.batch)
            except (ValueError, RuntimeError, torch.linalg.LinAlgError) as error:
                row["LDS"] = f"error: {type(error).__name__}: {str(error)[:120]}"
            if dattri:
                try:
                    t0 = time.perf_counter()
                    theirs = quiet(lambda: run_dattri(name, setting, snapshots, loaders))
                    if theirs is not None:
                        row["dattri seconds"] = time.perf_counter() - t0
                        row["dattri LDS"] = lds(theirs.contiguous(), masks, subsets).mean
                        if isinstance(row.get("seconds"), float):
                            row["dattri ÷ attrprims time"] = row["dattri seconds"] / row["seconds"]
                except Exception as error:  # a peer's failure is a result to report, whatever its type
                    row["dattri LDS"] = f"error: {type(error).__name__}: {str(error)[:120]}"
            rows.append(row)
            print({c: row.get(c) for c in COLUMNS}, flush=True)

    total = time.perf_counter() - started
    notes = [
        f"Data: scikit-learn's bundled digits (1,797 8x8 images, pixels / 16), seeded split: {n_train} training and "
        f"{n_test} test images; all methods score all test images against all training images (batches of "
        f"{args.batch}).",
        *notes_setting,
        "Methods: one checkpoint (seed 0); TracInCP uses 5 checkpoints of that run (epochs "
        f"{', '.join(f'{s} {TRACIN_EPOCHS[s]}' for s in settings)}) at learning rate 0.01. Damping of the influence "
        f"rows: {', '.join(f'{s} {DAMPING[s]:g}' for s in settings)} (LR: the convex model's L2 term). IF explicit "
        "uses all parameters on LR and the last Linear layer elsewhere (p Hessian-vector products); IF cg runs 30 "
        "iterations on all parameters (LR only: elsewhere its self-scores would need 1500 such solves); datainf on the GGN; the projected-Fisher IF and Grad-Dot/Cos/TracInCP use "
        "a Rademacher projection to k = 512, the dimension dattri's TracIn projects to by default.",
        "LDS: 50 models retrained on random α = 0.5 halves (bench_trak.py's cached outputs), Spearman per target, mean "
        "and 95% bootstrap interval. LOO pearson: attrprims.metrics.loo over "
        f"{n_loo} seeded left-out points (LR: the convex L2-regularised optimum, retrained exactly; MLP/CNN: SGD with "
        "the full model's seed). noisy AUC: 10% labels flipped to another class (seeded), one model trained on them "
        "by the setting's recipe (and its 5 snapshots for TracInCP), ROC AUC of self_score against the flips.",
        "seconds: featurize + score of the LDS run, one call, 2 torch threads; peak MiB: that call's peak RSS "
        "increase (VmHWM) in a fresh process.",
        "dattri 0.3.0 (bench environment): IFAttributorExplicit (same parameters and regularization), IFAttributorCG "
        "(max_iter 30), TracInAttributor (its default projection to 512; normalized_grad for Grad-Cos), "
        "RPSAttributor (l2_strength 3e-3), TRAKAttributor (as bench_trak.py); the same checkpoint and loaders (the IF attributors cache one batch of all 1500 "
        "examples, since dattri sums the inverse-HVPs of the cache loader's batches; not on the CNN, where its "
        "explicit Hessian of that batch needed more than the machine's 24 GB); LDS only. RPS self-scores (α of the "
        "own label times ‖f‖², fitted to the model's own probabilities as Yeh et al. and dattri do) are lowest for "
        "flipped labels, hence its AUC near 0; Grad-Cos self-scores are all 1 (AUC 0.5 up to ties). Its scores are [n_train, n_test] and transposed; their sign convention (positive = helpful) is ours.",
        f"Whole run {total:.0f} s. Command: {' '.join(['python', *sys.argv])}.",
    ]
    write_results("methods-quick" if args.quick else "methods", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
