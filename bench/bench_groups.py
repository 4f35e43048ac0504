"""Group attribution (GGDA) on digits: grouping method × group size → time, speedup over per-point, fidelity.

Run from the repository root: `python3 bench/bench_groups.py [--quick]` (about 15 min on the 2-core CPU machine;
`--quick`, TRAK at group size 16 with one retraining seed, about 2 min). Writes bench/results/groups[-quick]-<slug>.md
and .json. Options: --methods, --groupings, --sizes, --k, --models, --seeds, --fraction, --repeat.

Data: scikit-learn's bundled digits, the seeded 1500/297 split of bench_trak.py, and its MLP setting (64-128-64-10,
dropout 0.1, dattri's MNIST MLP recipe). Every method attributes all 297 test images to the 1500 training images,
projected to k = 2048: TRAK over 3 independently trained models (seeds 0-2), Grad-Dot and influence functions
(the empirical Fisher of the projected gradients, damping 1e-2) on model 0.

Rows: random removal (the baseline of the fidelity columns); per method, per-point attribution, then each grouping
(attrprims.groups) at each group size s, G = ⌈n/s⌉ groups: `random`, `by_class` (split to the size), `input_kmeans`,
`representation_kmeans` (inputs of the last Linear), `grad_kmeans` (its defaults: the last layer's loss gradients,
650 per example, projected to 64), all from model 0; K-means sizes vary around s, except in "grad_kmeans balanced" (at most ⌈n/G⌉
members).

Columns:
- grouping s: computing the group ids (once). featurize s, score s: median of --repeat calls of featurize (the
  training side: gradients, projection, Gram/curvature) and of score (297 targets: their gradients, solve, product).
  featurize ×: per-point featurize ÷ this (grouping not included); total ×: per-point (featurize + score) ÷ this
  (grouping + featurize + score).
- acc −top f: fidelity (Ley et al.): each training point's importance is Σ over the 297 targets of its score (a group's
  score divided among its members, `expand(..., reduce="mean")`), the top --fraction (20%) of points are removed and
  the MLP is retrained on the rest (--seeds seeds, the mean test accuracy reported). Lower = more faithful.
  fidelity kept = (random − this) / (random − per-point): the share of per-point attribution's accuracy drop beyond
  random removal that the grouping keeps. acc −bottom f: pruning, the lowest-valued 20% removed instead.
- noisy AUC: 10% of the training labels flipped (seeded), one model trained on them, the method featurized on it with
  the grouping recomputed on the noisy data: ROC AUC of finding the flipped points by their group's self-score (each
  member gets its group's, divided by its size).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trak  # noqa: E402
from _timing import bench_parser, bench_setup, write_results  # noqa: E402

from attrprims import groups as grouping  # noqa: E402
from attrprims.demo import load_digits_split  # noqa: E402
from attrprims.methods import TRAK, GradDot, InfluenceFunction  # noqa: E402
from attrprims.metrics import noisy_label_auc  # noqa: E402
from attrprims.tasks import MultiClassClassification  # noqa: E402

TASK = MultiClassClassification()
LAST = "6"  # the MLP's last Linear
DAMPING = 1e-2
METHODS = {
    "TRAK": lambda k, seed: TRAK(bench_trak.make_mlp(), TASK, proj_dim=k, seed=seed, progress=False),
    "Grad-Dot": lambda k, seed: GradDot(bench_trak.make_mlp(), TASK, proj_dim=k, seed=seed, progress=False),
    "IF (projected Fisher)": lambda k, seed: InfluenceFunction(bench_trak.make_mlp(), TASK, proj_dim=k, seed=seed,
                                                               damping=DAMPING, progress=False),
}
GROUPINGS = {
    "random": lambda n, x, y, model, loader, size: grouping.random(n, size=size),
    "by_class": lambda n, x, y, model, loader, size: grouping.by_class(y, size=size),
    "input_kmeans": lambda n, x, y, model, loader, size: grouping.input_kmeans(x, size=size),
    "representation_kmeans": lambda n, x, y, model, loader, size: grouping.representation_kmeans(
        model, loader, layer=LAST, size=size),
    "grad_kmeans": lambda n, x, y, model, loader, size: grouping.grad_kmeans(model, TASK, loader, size=size),
    "grad_kmeans balanced": lambda n, x, y, model, loader, size: grouping.grad_kmeans(
        model, TASK, loader, size=size, balanced=True),
}
COLUMNS = ["method", "grouping", "size", "G", "grouping s", "featurize s", "score s", "featurize ×", "total ×",
           "acc −top", "fidelity kept", "acc −bottom", "noisy AUC"]


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def main():
    ap = bench_parser(__doc__, "TRAK at group size 16, one retraining seed: a smoke test", cuda=False)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--groupings", default=",".join(GROUPINGS))
    ap.add_argument("--sizes", default="4,16,64")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--models", type=int, default=3, help="TRAK's ensemble")
    ap.add_argument("--seeds", type=int, default=3, help="retraining seeds per removal")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    _, info, slug = bench_setup(args)
    started = time.perf_counter()
    methods = ["TRAK"] if args.quick else [m for m in args.methods.split(",") if m]
    sizes = [16] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    seeds = 1 if args.quick else args.seeds
    names = [g for g in args.groupings.split(",") if g]

    x, y, x_test, y_test = load_digits_split(seed=0)
    n = len(x)
    train_loader, test_loader = batches(x, y, args.batch), batches(x_test, y_test, args.batch)
    flip = torch.Generator().manual_seed(2)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=flip)[:n // 10]] = True
    noisy_y = y.clone()
    noisy_y[flipped] = (y[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=flip)) % 10
    noisy_loader = batches(x, noisy_y, args.batch)
    models = [bench_trak.train("MLP", x, y, seed) for seed in range(args.models)]
    noisy_model = bench_trak.train("MLP", x, noisy_y, 0)
    removed = round(args.fraction * n)

    def accuracy(kept):
        """Mean test accuracy of the MLP retrained on the kept points, over the retraining seeds."""
        accs = []
        for seed in range(seeds):
            model = bench_trak.train("MLP", x[kept], y[kept], seed)
            with torch.no_grad():
                accs.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        return statistics.mean(accs)

    full = accuracy(torch.arange(n))
    rand = torch.Generator().manual_seed(3)
    random_acc = statistics.mean(accuracy(torch.randperm(n, generator=rand)[removed:]) for _ in range(3))
    print(f"models ready; test accuracy {full:.3f} on everything, {random_acc:.3f} without random "
          f"{args.fraction:.0%} ({time.perf_counter() - started:.0f} s)", flush=True)

    def attribute(method, ids, checkpoints, loader):
        """(median featurize s, median score s, scores, self-scores) of one method under one grouping."""
        featurize_s, score_s = [], []
        for _ in range(args.repeat):
            attributor = METHODS[method](args.k, 0)
            t0 = time.perf_counter()
            attributor.featurize(loader, checkpoints, groups=ids)
            t1 = time.perf_counter()
            scores = attributor.score(test_loader)
            featurize_s.append(t1 - t0)
            score_s.append(time.perf_counter() - t1)
        return statistics.median(featurize_s), statistics.median(score_s), scores, attributor.self_score()

    rows = [{"method": "(none)", "grouping": "random removal", "acc −top": random_acc, "acc −bottom": random_acc,
             "fidelity kept": 0.0}]
    for method in methods:
        checkpoints = [m.state_dict() for m in (models if method == "TRAK" else models[:1])]
        noisy_checkpoints = [noisy_model.state_dict()] * len(checkpoints)
        configs = [("per point", 1)] + [(g, size) for g in names for size in sizes]
        base = None
        for name, size in configs:
            t0 = time.perf_counter()
            if name == "per point":
                ids = noisy_ids = None
            else:
                ids = GROUPINGS[name](n, x, y, models[0], train_loader, size)
                grouping_s = time.perf_counter() - t0
                noisy_ids = GROUPINGS[name](n, x, noisy_y, noisy_model, noisy_loader, size)
            featurize_s, score_s, scores, _ = attribute(method, ids, checkpoints, train_loader)
            _, _, _, noisy_self = attribute(method, noisy_ids, noisy_checkpoints, noisy_loader)
            importance = scores.double().sum(0)
            if ids is not None:
                importance = grouping.expand(importance, ids, reduce="mean")
                noisy_self = grouping.expand(noisy_self.double(), noisy_ids, reduce="mean")
            # Ties (members of one group) by the smaller index, as remove_and_retrain does.
            ranking = torch.sort(-importance, stable=True).indices
            top, bottom = accuracy(ranking[removed:].sort().values), accuracy(ranking[:-removed].sort().values)
            row = {"method": method, "grouping": name, "size": size, "G": n if ids is None else int(ids.max()) + 1,
                   "featurize s": featurize_s, "score s": score_s, "acc −top": top, "acc −bottom": bottom,
                   "noisy AUC": noisy_label_auc(noisy_self.double(), flipped)}
            if ids is None:
                base = row
                row.update({"featurize ×": 1.0, "total ×": 1.0, "fidelity kept": 1.0})
            else:
                row.update({"grouping s": grouping_s, "featurize ×": base["featurize s"] / featurize_s,
                            "total ×": (base["featurize s"] + base["score s"]) / (grouping_s + featurize_s + score_s),
                            "fidelity kept": (random_acc - top) / (random_acc - base["acc −top"])})
            rows.append(row)
            print(f"{method:22s} {name:22s} {size:3d}: featurize {featurize_s:.3f} s, score {score_s:.3f} s, "
                  f"acc -top {top:.3f}, -bottom {bottom:.3f}, noisy AUC {row['noisy AUC']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    notes = [
        f"Data: scikit-learn digits (bundled), {n} training / {len(x_test)} test images (seeded split), MLP "
        f"64-128-64-10 with dropout (dattri's MNIST MLP recipe: SGD lr 0.01 momentum 0.9, batch 64, 50 epochs). Test accuracy "
        f"{full:.3f} trained on everything, {random_acc:.3f} without a random {args.fraction:.0%} (mean of 3 random "
        f"sets), each the mean over {seeds} retraining seed(s).",
        f"Attribution: k = {args.k} (rademacher), batches of {args.batch}; TRAK over {args.models} models (damping "
        f"'auto'), Grad-Dot and influence functions (empirical Fisher of the projected gradients, damping {DAMPING}) "
        "on model 0; every method scores all 297 test images. Groupings from model 0 (grad_kmeans on the last "
        "layer's loss gradients projected to 64; K-means unbalanced except where named).",
        f"acc −top / −bottom: test accuracy after removing the {args.fraction:.0%} most / least important training "
        "points and retraining (importance: the score summed over the test images; a group's divided among its "
        "members). fidelity kept = (random − acc −top) / (random − per-point acc −top). noisy AUC: 10% labels "
        "flipped, model retrained on them, AUC of the group self-score (per member) against the flips.",
        "Speedups are measured side by side in one run: featurize × compares the training side alone; total × "
        "also counts the grouping and scoring the 297 targets, whose per-target gradients grouping does not reduce.",
        f"Total wall time {(time.perf_counter() - started) / 60:.1f} min.",
    ]
    write_results("groups-quick" if args.quick else "groups", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
