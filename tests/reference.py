"""Plain references for the kernels: NumPy (uint64 / float32) for the matrix definition, float64 for products.

Written from the definitions in src/cpp/attrprims/projection.h, the obvious way, with no tiling: slow and
small, but each line can be checked by eye. Every float32 step is one IEEE-rounded NumPy op, as in C++.
"""

from __future__ import annotations

import numpy as np
import torch

MUL0, MUL1 = 0xD2511F53, 0xCD9E8D57
WEYL0, WEYL1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TAGS = {"rademacher": 0x52414431, "gaussian": 0x47415531, "sjlt": 0x534A4C31}
F32 = np.float32


def philox4x32_10(counters: np.ndarray, key: int) -> np.ndarray:
    """Philox-4x32-10 of each row of counters [N, 4] (uint32) under a 64-bit key."""
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key & MASK32), np.uint64(key >> 32)
    m32 = np.uint64(MASK32)
    for _ in range(10):
        p0, p1 = np.uint64(MUL0) * c[0], np.uint64(MUL1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(WEYL0)) & m32, (k1 + np.uint64(WEYL1)) & m32
    return np.stack(c, axis=1).astype(np.uint32)


def projection_words(seed: int, kind: str, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Philox words for (row, block) pairs of the stream of `kind`: [N, 4] uint32."""
    rows, blocks = np.asarray(rows, dtype=np.uint64), np.asarray(blocks, dtype=np.uint64)
    counters = np.stack([blocks, rows & np.uint64(MASK32), rows >> np.uint64(32),
                         np.full_like(rows, TAGS[kind])], axis=1).astype(np.uint32)
    return philox4x32_10(counters, seed)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def _float(u: np.ndarray) -> np.ndarray:
    return u.astype(np.uint32).view(F32)


def unit_log(u: np.ndarray) -> np.ndarray:
    """ln(u) for float32 u in (0, 1], by the same float32 steps as the C++ definition."""
    bits = _bits(u)
    mbits = (bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F800000)
    big = mbits > np.uint32(0x3FB504F3)
    m = np.where(big, _float(mbits) * F32(0.5), _float(mbits))
    e = (bits >> np.uint32(23)).astype(np.int64) - 127 + big
    s = (m - F32(1.0)) / (m + F32(1.0))
    s2 = s * s
    poly = F32(1.0) + s2 * (F32(0.333333333) + s2 * (F32(0.2) + s2 * (F32(0.142857143) + s2 * F32(0.111111111))))
    return e.astype(F32) * F32(0.693147181) + (F32(2.0) * s) * poly


def box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 normals per pair of words (radius from a, angle from b), as defined in C++."""
    u = ((a >> np.uint32(8)) + np.uint32(1)).astype(F32) * F32(2.0**-24)
    radius = np.sqrt(F32(-2.0) * unit_log(u))
    q = b >> np.uint32(30)
    t = ((b >> np.uint32(8)) & np.uint32(0x3FFFFF)).astype(F32) * F32(2.0**-22) * F32(1.57079637)
    t2 = t * t
    sp = F32(1.0) + t2 * (F32(-1.66666667e-01) + t2 * (F32(8.33333333e-03) + t2 * (
        F32(-1.98412698e-04) + t2 * (F32(2.75573192e-06) + t2 * F32(-2.50521084e-08)))))
    sn = t * sp
    cs = F32(1.0) + t2 * (F32(-0.5) + t2 * (F32(4.16666667e-02) + t2 * (F32(-1.38888889e-03) + t2 * (
        F32(2.48015873e-05) + t2 * (F32(-2.75573192e-07) + t2 * F32(2.08767570e-09))))))
    odd = (q & np.uint32(1)).astype(bool)
    co, si = np.where(odd, sn, cs), np.where(odd, cs, sn)
    co = np.where((q == 1) | (q == 2), -co, co)
    si = np.where(q >= 2, -si, si)
    return radius * co, radius * si


def matrix(seed: int, kind: str, k: int, rows: range, s: int = 1) -> np.ndarray:
    """P[rows, :] as float32 [len(rows), k], entry by entry from the definition."""
    r = np.repeat(np.arange(rows.start, rows.stop, dtype=np.uint64), k)
    col = np.tile(np.arange(k, dtype=np.uint64), len(rows))
    if kind == "rademacher":
        words = projection_words(seed, kind, r, col >> np.uint64(7))
        word = words[np.arange(len(col)), ((col >> np.uint64(5)) & np.uint64(3)).astype(np.int64)]
        negative = (word >> (col & np.uint64(31)).astype(np.uint32)) & np.uint32(1)
        scale = F32(1.0 / np.sqrt(float(k)))
        return np.where(negative == 1, -scale, scale).astype(F32).reshape(len(rows), k)
    if kind == "gaussian":
        words = projection_words(seed, kind, r, col >> np.uint64(2))
        z0, z1 = box_muller(words[:, 0], words[:, 1])
        z2, z3 = box_muller(words[:, 2], words[:, 3])
        z = np.stack([z0, z1, z2, z3], axis=1)[np.arange(len(col)), (col & np.uint64(3)).astype(np.int64)]
        return (z * F32(1.0 / np.sqrt(float(k)))).astype(F32).reshape(len(rows), k)
    out = np.zeros((len(rows), k), dtype=F32)
    value = F32(1.0 / np.sqrt(float(s)))
    for j in range(s):
        rr = np.arange(rows.start, rows.stop, dtype=np.uint64)
        word = projection_words(seed, "sjlt", rr, np.full_like(rr, j // 4))[:, j % 4]
        lo, width = j * k // s, (j + 1) * k // s - j * k // s
        cols = lo + (((word >> np.uint32(1)).astype(np.uint64) * np.uint64(width)) >> np.uint64(31)).astype(np.int64)
        out[np.arange(len(rows)), cols] = np.where(word & np.uint32(1), -value, value)
    return out


def project(x: torch.Tensor, k: int, *, seed: int, kind: str, s: int = 1, offset: int = 0) -> torch.Tensor:
    """x @ P[offset:offset+c] in float64 (on the CPU)."""
    p = torch.from_numpy(matrix(seed, kind, k, range(offset, offset + x.shape[1]), s)).double()
    return x.detach().cpu().double() @ p


def project_transpose(y: torch.Tensor, p_chunk: int, *, seed: int, kind: str, s: int = 1, offset: int = 0) -> torch.Tensor:
    """y @ P[offset:offset+p_chunk]^T in float64 (on the CPU)."""
    p = torch.from_numpy(matrix(seed, kind, y.shape[1], range(offset, offset + p_chunk), s)).double()
    return y.detach().cpu().double() @ p.T


def per_sample_grads(model, output_fn, batch, names, model_args) -> torch.Tensor:
    """[n, p] float64: one backward per example, the example sliced out of every tensor of the batch."""
    tensors = dict(model.named_parameters())
    n = next(t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)).shape[0]
    rows = []
    for i in range(n):
        example = torch.utils._pytree.tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) else t, batch)
        args, kwargs = model_args(example)
        out = output_fn(model(*args, **kwargs), example)
        grads = torch.autograd.grad(out[0], [tensors[name] for name in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(tensors[name]) if g is None else g).reshape(-1).double()
                               for name, g in zip(names, grads)]))
    return torch.stack(rows) if rows else torch.zeros((0, sum(tensors[m].numel() for m in names)), dtype=torch.float64)


def project_factored(a: torch.Tensor, delta: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """[n, k_out·k_in] float64: the per-example weight gradients Σ_t δ_t a_tᵀ, flattened, times P_out ⊗ P_in."""
    g = torch.einsum("nto,nti->noi", delta.double(), a.double()).reshape(a.shape[0], delta.shape[2] * a.shape[2])
    return g @ torch.kron(p_out.double(), p_in.double())


def factored_matrix(projector, blocks) -> torch.Tensor:
    """[p, k] float64 of a FactoredProjector: its dense rows, with P_out ⊗ P_in over each (offset, d_out, d_in) block."""
    m = projector.dense.matrix().double()
    for offset, d_out, d_in in blocks:
        p_out, p_in = projector.factors(offset, d_out, d_in)
        m[offset:offset + d_out * d_in] = torch.kron(p_out.double(), p_in.double())
    return m


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = xᵀx in float64."""
    x = x.cpu().double()
    return x.T @ x


def damped_solve(g: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """Rows of (G + λI)⁻¹ rhsᵀ in float64: solve(G + λI, rhs.T).T."""
    g = g.cpu().double()
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    return torch.linalg.solve(g + damping * eye, rhs.cpu().double().reshape(-1, g.shape[0]).T).T.reshape(rhs.shape)


def scores(phi_test: torch.Tensor, K, phi_train: torch.Tensor, weights=None) -> torch.Tensor:
    """φ_test K Φ_trainᵀ (columns times weights) in float64."""
    a = phi_test.cpu().double()
    if K is not None:
        a = a @ K.cpu().double()
    s = a @ phi_train.cpu().double().T
    return s * weights.cpu().double() if weights is not None else s


def ranked(s: torch.Tensor, t: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the t best (value, index) of s: by value, ties to the smaller index."""
    values = s.numpy()
    order = np.stack([np.lexsort((np.arange(s.shape[1]), -row if largest else row))[:t] for row in values]) \
        if s.shape[0] else np.zeros((0, t), dtype=np.int64)
    idx = torch.from_numpy(order.astype(np.int64)).reshape(s.shape[0], t)
    return s.gather(1, idx), idx


def _loss_of_flat(model, loss_fn, names, model_args, weight):
    """θ [p] -> (batch -> weight · Σ_i loss_fn(model(θ), batch)[i]), the parameters `names` taken from θ."""
    tensors = dict(model.named_parameters())

    def at(theta, batch):
        params, start = {}, 0
        for name in names:
            params[name] = theta[start:start + tensors[name].numel()].reshape(tensors[name].shape)
            start += tensors[name].numel()
        args, kwargs = model_args(batch)
        return torch.func.functional_call(model, params, args, kwargs)

    return at, lambda o, batch: weight * loss_fn(o, batch).sum()


def _flat(model, names) -> torch.Tensor:
    tensors = dict(model.named_parameters())
    return torch.cat([tensors[name].detach().reshape(-1) for name in names]).double()


def _weight(batches, reduction):
    leaves = [next(t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)) for b in batches]
    return 1 / sum(t.shape[0] for t in leaves) if reduction == "mean" else 1.0


def hessian(model, loss_fn, batches, names, model_args, reduction="mean") -> torch.Tensor:
    """[p, p] float64 Hessian of w Σ_batches Σ_i loss_fn[i] (w = 1/N or 1) in the flat θ of `names`, row by row."""
    theta = _flat(model, names).requires_grad_(True)
    outputs, loss = _loss_of_flat(model, loss_fn, names, model_args, _weight(batches, reduction))
    total = sum(loss(outputs(theta, b), b) for b in batches)
    g = torch.autograd.grad(total, theta, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[j], theta, retain_graph=True)[0] for j in range(theta.numel())])


def ggn(model, loss_fn, batches, names, model_args, reduction="mean") -> torch.Tensor:
    """[p, p] float64 Σ_batches Jᵀ H_o J: J = ∂outputs/∂θ, H_o = ∇²_o of w Σ_i loss_fn[i] (dense jacobian/hessian)."""
    theta = _flat(model, names)
    outputs, loss = _loss_of_flat(model, loss_fn, names, model_args, _weight(batches, reduction))
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for b in batches:
        o = outputs(theta, b).detach()
        jac = torch.autograd.functional.jacobian(lambda t: outputs(t, b), theta).reshape(o.numel(), -1)
        h_o = torch.autograd.functional.hessian(lambda flat: loss(flat.reshape(o.shape), b), o.reshape(-1))
        total += jac.T @ h_o @ jac
    return total


def empirical_fisher(grads: torch.Tensor, reduction="mean") -> torch.Tensor:
    """[p, p] float64 w Σ_i g_i g_iᵀ of per-example gradients [N, p] (w = 1/N or 1)."""
    g = grads.double()
    return g.T @ g / (g.shape[0] if reduction == "mean" else 1)


def ekfac(model, loss_fn, batches, names, model_args, reduction="mean") -> torch.Tensor:
    """[p, p] float64 EK-FAC matrix of the Linear layers owning `names`: per layer (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ
    on [weight | bias], Q the eigenvectors of A = Σ ã ãᵀ and S = Σ δ δᵀ, Λ = w Σ_i (Q_Sᵀ G_i Q_A)²."""
    offsets, p = {}, 0
    tensors = dict(model.named_parameters())
    for name in names:
        offsets[name], p = p, p + tensors[name].numel()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and any(f"{n}.{local}".lstrip(".") in offsets for local in ("weight", "bias"))]
    grads = torch.cat([per_sample_grads(model, loss_fn, b, names, model_args) for b in batches])
    w = 1 / grads.shape[0] if reduction == "mean" else 1.0
    out = torch.zeros(p, p, dtype=torch.float64)
    for layer_name, m in layers:
        weight, bias = (offsets.get(f"{layer_name}.{local}".lstrip(".")) for local in ("weight", "bias"))
        a_sum, s_sum = 0, 0
        for b in batches:
            seen = []

            def probe(module, args, output):
                zero = torch.zeros_like(output, requires_grad=True)
                seen.append((args[0].detach(), zero))
                return output + zero

            handle = m.register_forward_hook(probe)
            args, kwargs = model_args(b)
            total = loss_fn(model(*args, **kwargs), b).sum()
            handle.remove()
            deltas = torch.autograd.grad(total, [z for _, z in seen])
            for (a, _), delta in zip(seen, deltas):
                a = a.reshape(-1, m.in_features).double()
                ones = torch.ones(a.shape[0], 1, dtype=torch.float64)
                a = torch.cat(([a] if weight is not None else []) + ([ones] if bias is not None else []), 1)
                delta = delta.reshape(-1, m.out_features).double()
                a_sum, s_sum = a_sum + a.T @ a, s_sum + delta.T @ delta
        q_a, q_s = torch.linalg.eigh(a_sum)[1], torch.linalg.eigh(s_sum)[1]
        index = []  # flat position of each entry of [weight | bias] [d_out, width], row-major
        for o in range(m.out_features):
            if weight is not None:
                index += [weight + o * m.in_features + i for i in range(m.in_features)]
            if bias is not None:
                index.append(bias + o)
        g = grads[:, index].reshape(-1, m.out_features, q_a.shape[0])
        values = w * ((q_s.T @ g @ q_a) ** 2).sum(0)
        k, index = torch.kron(q_s, q_a), torch.tensor(index)
        out[index[:, None], index[None, :]] = k @ torch.diag(values.reshape(-1)) @ k.T
    return out


def datainf(grads: torch.Tensor, blocks, v: torch.Tensor, reduction="mean") -> torch.Tensor:
    """Rows of DataInf's estimate of (F + λI)⁻¹v, F = (c/N) Σ g gᵀ (c = 1 or N) per block (offset, size, λ):
    (1/c) mean_i (g_i g_iᵀ + (λ/c) I)⁻¹ v, each inverse by torch.linalg.inv."""
    g, v = grads.double(), v.double()
    n = g.shape[0]
    c = n if reduction == "sum" else 1
    out = torch.zeros_like(v)
    for offset, size, lam in blocks:
        gl = g[:, offset:offset + size]
        eye = torch.eye(size, dtype=torch.float64)
        mean_inverse = sum(torch.linalg.inv(gl[i:i + 1].T @ gl[i:i + 1] + lam / c * eye) for i in range(n)) / n
        out[:, offset:offset + size] = v[:, offset:offset + size] @ mean_inverse / c
    return out


def combine(xs, weights=None, reduce: str = "mean") -> torch.Tensor:
    """Weighted mean (or sum) of the stacked members in float64."""
    x = torch.stack([t.cpu().double() for t in xs])
    w = torch.ones(len(xs), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    total = (x * w.reshape(-1, *[1] * (x.dim() - 1))).sum(0)
    return total / w.sum() if reduce == "mean" else total


def trak_combine(scores_per_model, out_to_loss_per_model) -> torch.Tensor:
    """mean_m(scores_m) [m_test, n_train] times mean_m(Q_m) [n_train] per column, in float64."""
    return combine(scores_per_model) * combine(out_to_loss_per_model)[None, :]


def average_ranks(x) -> list[float]:
    """Rank of each value from 1 by counting: #smaller + (#equal + 1) / 2 (ties share their mean position)."""
    return [sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x]


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """[m] float64: per target t, Pearson of the average ranks of Σ_{i∈S} scores[t, i] and outputs[S, t] over
    subsets S (the rows of masks), NaN where either is constant; one target and one subset at a time."""
    scores, masks, outputs = scores.cpu().double(), masks.cpu(), outputs.cpu().double()
    out = []
    for t in range(scores.shape[0]):
        predicted = [float(scores[t][row].sum()) for row in masks]
        a = torch.tensor(average_ranks(predicted), dtype=torch.float64)
        b = torch.tensor(average_ranks(outputs[:, t].tolist()), dtype=torch.float64)
        a, b = a - a.mean(), b - b.mean()
        den = float((a @ a).sqrt() * (b @ b).sqrt())
        out.append(float(a @ b) / den if den > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)
