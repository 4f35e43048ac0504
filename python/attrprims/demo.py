"""The main job: TRAK on scikit-learn's bundled handwritten digits, end to end, in well under two minutes on 2 cores.

Trains a small ensemble of MLPs, attributes test predictions to training images with TRAK (attrprims.methods),
draws the most helpful and most harmful training images of a few test images into a PNG, and measures the
attribution's quality with the linear datamodeling score (LDS) against models retrained on random halves of
the training set. Data: the 1,797 8x8 digits that ship with scikit-learn (no download).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .methods import TRAK
from .metrics.lds import lds
from .metrics.retrain import retrain_outputs, subset_masks
from .tasks import MultiClassClassification

TASK = MultiClassClassification()


def load_digits_split(n_train: int = 1500, seed: int = 0):
    """Digits scaled to [0, 1]: (x_train [n_train, 64], y_train, x_test, y_test), a seeded random split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_mlp(x, y, seed: int, steps: int = 60) -> nn.Module:
    """A 64-64-10 MLP, full-batch Adam: a fraction of a second on two cores."""
    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def draw(path, x_train, y_train, x_test, y_test, shown, ranked, k):
    """One row per shown test image: the image, its k most helpful and k most harmful training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.3 * len(shown)), squeeze=False)
    for row, t in enumerate(shown):
        cells = [(x_test[t], f"test {y_test[t].item()}", "black")]
        cells += [(x_train[i], f"+ {y_train[i].item()}", "green") for i in ranked.top_indices[t, :k].tolist()]
        cells += [(x_train[i], f"− {y_train[i].item()}", "red") for i in ranked.bottom_indices[t, :k].tolist()]
        for ax, (image, title, color) in zip(axes[row], cells):
            ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r")
            ax.set_title(title, color=color, fontsize=8)
            ax.axis("off")
    fig.suptitle("TRAK on digits: each test image, its most helpful (+) and most harmful (−) training images",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, models: int = 5, proj_dim: int = 1024, subsets: int = 50, alpha: float = 0.5, shown: int = 4,
        top: int = 5, out="attrprims_demo.png", seed: int = 0, progress: bool = True) -> dict:
    """Run the demo, print its summary and return its numbers (LDS, times, the PNG's path)."""
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    n = len(x_train)
    print(f"digits: {n} training and {len(x_test)} test images (8x8, bundled with scikit-learn)")

    t0 = time.perf_counter()
    ensemble = [train_mlp(x_train, y_train, seed=seed * 1000 + m) for m in range(models)]
    accuracy = sum(float((m(x_test).argmax(1) == y_test).float().mean()) for m in ensemble) / models
    t_train = time.perf_counter() - t0
    print(f"trained {models} MLPs (64-64-10) in {t_train:.1f} s; mean test accuracy {accuracy:.3f}")

    t0 = time.perf_counter()
    train_loader = [(x_train[i:i + 250], y_train[i:i + 250]) for i in range(0, n, 250)]
    test_loader = [(x_test, y_test)]
    trak = TRAK(make_mlp(), TASK, proj_dim=proj_dim, seed=seed, progress=progress)
    trak.featurize(train_loader, [m.state_dict() for m in ensemble])
    targets = trak.target_features(test_loader)
    scores = trak.score(None, targets=targets)
    ranked = trak.score(None, targets=targets, topk=top, bottomk=top)
    t_trak = time.perf_counter() - t0
    print(f"TRAK (k = {proj_dim}, {models} models, damping auto): {len(x_test)} x {n} scores in {t_trak:.1f} s")

    t0 = time.perf_counter()
    masks = subset_masks(n, subsets, alpha, seed=seed)
    outputs = retrain_outputs(lambda idx, s: train_mlp(x_train[idx], y_train[idx], seed=s),
                              lambda model: TASK.output(model(x_test).detach(), (x_test, y_test)), masks,
                              progress=progress)
    result = lds(scores, masks, outputs)
    t_lds = time.perf_counter() - t0
    low, high = result.interval
    print(f"LDS over {subsets} models trained on random {alpha:.0%} subsets: {result.mean:.3f} "
          f"(95% interval {low:.3f} to {high:.3f}; {t_lds:.1f} s to retrain and evaluate)")

    same_label = float((y_train[ranked.top_indices] == y_test[:, None]).float().mean())
    print(f"{same_label:.0%} of each test image's {top} most helpful training images share its label (chance: 10%)")
    picks = torch.linspace(0, len(x_test) - 1, shown).long().tolist()
    for t in picks:
        helpful = y_train[ranked.top_indices[t]].tolist()
        harmful = y_train[ranked.bottom_indices[t]].tolist()
        print(f"  test image {t} (label {y_test[t].item()}): most helpful training labels {helpful}, "
              f"most harmful {harmful}")
    path = Path(out).resolve()
    draw(path, x_train, y_train, x_test, y_test, picks, ranked, top)
    total = time.perf_counter() - started
    print(f"wrote {path}")
    print(f"total {total:.1f} s")
    return {"lds": result.mean, "lds_low": low, "lds_high": high, "accuracy": accuracy,
            "same_label_helpful": same_label, "png": str(path), "seconds": total}
