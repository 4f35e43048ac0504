"""The main job until TRAK lands: project real per-example gradients and show what the projection preserves.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images; no download). A small MLP is trained for a
few seconds; the per-example gradients of its loss (p = 9,610 parameters) are projected to k dimensions on the
layer path (one ordinary forward/backward, each layer's gradient projected at its offset of one seeded P, or
with Kronecker factors that never form it), and compared with the exact gradients on the quantities
attribution uses: gradient inner products (TracIn/Grad-Dot scores), cosine nearest neighbours (Grad-Cos) and
pairwise distances (the JL guarantee).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .factored_projector import FactoredProjector
from .per_sample_grads import per_sample_grads, project_grads
from .projection import Projector

KINDS = ("rademacher", "gaussian", "sjlt", "factored")


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1] as float32 [1797, 64] and labels [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, seed: int = 0) -> nn.Module:
    """A 64-128-10 MLP trained with Adam on (x, y); a few seconds on two cores."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def loss_per_example(outputs: torch.Tensor, batch) -> torch.Tensor:
    """Cross-entropy of each example: the output whose gradients are compared."""
    return nn.functional.cross_entropy(outputs, batch[1], reduction="none")


def projector_for(kind: str, p: int, k: int, seed: int):
    """A dense Projector, or for "factored" a FactoredProjector with k_out·k_in = k (k_out >= k_in, powers of 2)."""
    if kind != "factored":
        return Projector(p, k, seed=seed, kind=kind)
    k_in = 2 ** ((k.bit_length() - 1) // 2)
    return FactoredProjector(p, k // k_in, k_in, seed=seed)


def preservation(exact: torch.Tensor, projected: torch.Tensor, queries: int = 32, top: int = 10) -> dict[str, float]:
    """How well `projected` keeps the inner products, cosine neighbours and distances of `exact` (float64)."""
    exact, projected = exact.double(), projected.double()
    g = torch.Generator().manual_seed(0)
    q = torch.randperm(len(exact), generator=g)[:queries]
    dots, dots_p = exact[q] @ exact.T, projected[q] @ projected.T
    corr = torch.corrcoef(torch.stack([dots.flatten(), dots_p.flatten()]))[0, 1].item()
    cos = nn.functional.normalize(exact, dim=1)
    cos_p = nn.functional.normalize(projected, dim=1)
    sim, sim_p = cos[q] @ cos.T, cos_p[q] @ cos_p.T
    sim[torch.arange(queries), q] = sim_p[torch.arange(queries), q] = -2.0  # exclude the query itself
    nn_exact, nn_proj = sim.topk(top, dim=1).indices, sim_p.topk(top, dim=1).indices
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nn_exact, nn_proj)) / (queries * top)
    i, j = torch.randint(len(exact), (4000,), generator=g), torch.randint(len(exact), (4000,), generator=g)
    keep = i != j
    ratio = (projected[i[keep]] - projected[j[keep]]).norm(dim=1) ** 2 / (exact[i[keep]] - exact[j[keep]]).norm(dim=1) ** 2
    return {"dot_corr": corr, "nn_recall": recall, "dist_med": (ratio - 1).abs().median().item(),
            "dist_p95": (ratio - 1).abs().quantile(0.95).item()}


def run(ks=(64, 256, 1024, 4096), examples: int = 1024, epochs: int = 30, seed: int = 0) -> list[dict]:
    """Train, extract gradients, project at each k and kind; print and return one row per (kind, k)."""
    start = time.perf_counter()
    x, y = load_digits_tensors()
    model = train_mlp(x, y, epochs=epochs, seed=seed)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:examples]
    batch = (x[sub], y[sub])
    flat = per_sample_grads(model, loss_per_example, batch, flat=True)
    p = flat.shape[1]
    print(f"digits: {len(x)} images, MLP 64-128-10 trained to {accuracy:.1%} train accuracy; "
          f"{examples} per-example loss gradients, p = {p:,} parameters "
          f"({time.perf_counter() - start:.1f} s)\n")
    header = f"{'kind':<11}{'k':>6}  {'dot corr':>9}  {'top-10 cos NN':>13}  {'|dist ratio-1| med':>18}  {'p95':>6}  {'ms':>7}"
    print(header + "\n" + "-" * len(header))
    rows, layer_path = [], None
    for kind in KINDS:
        for k in ks:
            projector = projector_for(kind, p, k, seed)
            t0 = time.perf_counter()
            projected = project_grads(model, loss_per_example, batch, projector, path="layer")
            ms = (time.perf_counter() - t0) * 1e3
            if (kind, k) == (KINDS[0], ks[-1]):
                layer_path = projected  # compared below with projecting the materialised gradients
            row = {"kind": kind, "k": k, "ms": ms, **preservation(flat, projected)}
            rows.append(row)
            print(f"{kind:<11}{k:>6}  {row['dot_corr']:>9.4f}  {row['nn_recall']:>13.1%}  {row['dist_med']:>18.3f}  "
                  f"{row['dist_p95']:>6.3f}  {ms:>7.1f}")
    whole = projector_for(KINDS[0], p, ks[-1], seed)(flat)
    print(f"\nlayer path (gradients formed and projected layer by layer, ms above includes the backward) vs "
          f"projecting the materialised gradients (k={ks[-1]}): max |diff| = "
          f"{(whole - layer_path).abs().max().item():.2e}")
    print(f"total {time.perf_counter() - start:.1f} s. Distortion falls like 1/sqrt(k); sjlt does O(p*s) work per "
          "example instead of O(p*k); factored (k_out x k_in Kronecker factors per weight) never forms the "
          "weight gradients.")
    return rows
