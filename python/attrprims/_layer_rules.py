"""Per-example parameter gradients of single layers from their input a and output gradient δ.

One ordinary forward/backward over a batch gives each layer's a [n, ...] and δ [n, ...]; a layer's
per-example gradient is a small function of the two (a Linear weight's is Σ_t δ_t a_tᵀ over the
tokens t of an example). Each rule returns that gradient as pieces (local parameter name, element
offset inside the flattened parameter, [n, c] values), so an Embedding can hand over only the rows
its examples used, and, for weight matrices, its factored projection Σ_t (δ_t P_out)ᵀ(a_t P_in).
Given `rows` (a GroupRows), pieces hold one row per group, the sum of its members' gradients: Linear and
Conv2d weights lay a group's tokens end to end before the product, so no per-example weight gradient
is formed (unless the batch's groups are so uneven that padding them costs more); the other (small)
pieces are summed per group.

A layer is supported only when its class keeps the stock forward (a subclass that overrides forward,
as LoRA layers do, is not) and its direct parameters are the stock weight/bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import kernel_float
from ._group_rows import per_group
from .factored_projection import project_factored


def _tokens(t: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """[n, T, width] view (or copy) of a batch-first activation with `width` as its last dimension."""
    return t.reshape(n, -1, width)


class _LinearRule:
    factored = True

    @staticmethod
    def pieces(m: nn.Linear, a, delta, n, wanted, rows=None):
        d = _tokens(delta, n, m.out_features)
        if "weight" in wanted:
            x = _tokens(a, n, m.in_features)
            if rows is not None and rows.concatenates:
                d_g, x_g = rows.concat(d, 1), rows.concat(x, 1)
                yield "weight", 0, torch.bmm(d_g.transpose(1, 2), x_g).reshape(rows.count, -1)
            else:
                yield "weight", 0, per_group(torch.bmm(d.transpose(1, 2), x).reshape(n, -1), rows)
        if "bias" in wanted:
            yield "bias", 0, per_group(d.sum(1), rows)

    @staticmethod
    def project_weight(m: nn.Linear, a, delta, n, p_out, p_in):
        a3 = kernel_float(_tokens(a, n, m.in_features))
        d3 = kernel_float(_tokens(delta, n, m.out_features)).to(a3.dtype)
        return project_factored(a3, d3, p_out, p_in)


class _Conv2dRule:
    """Conv2d as a Linear over output positions: a_t is the unfolded receptive field at position t."""

    factored = True

    @staticmethod
    def _unfold(m: nn.Conv2d, a, n):
        a = F.pad(a, m._reversed_padding_repeated_twice)
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, stride=m.stride)  # [n, C_in·kh·kw, L]
        g = m.groups
        return u.reshape(n, g, u.shape[1] // g, u.shape[2])

    @staticmethod
    def pieces(m: nn.Conv2d, a, delta, n, wanted, rows=None):
        d = delta.reshape(n, m.groups, m.out_channels // m.groups, -1)
        if "weight" in wanted:
            u = _Conv2dRule._unfold(m, a, n)
            if rows is not None and rows.concatenates:
                d_g, u_g = rows.concat(d, 3), rows.concat(u, 3)
                yield "weight", 0, torch.einsum("ngol,ngil->ngoi", d_g, u_g).reshape(rows.count, -1)
            else:
                yield "weight", 0, per_group(torch.einsum("ngol,ngil->ngoi", d, u).reshape(n, -1), rows)
        if "bias" in wanted:
            yield "bias", 0, per_group(d.sum(3).reshape(n, -1), rows)

    @staticmethod
    def project_weight(m: nn.Conv2d, a, delta, n, p_out, p_in):
        u = kernel_float(_Conv2dRule._unfold(m, a, n))
        d = kernel_float(delta).to(u.dtype).reshape(n, m.groups, m.out_channels // m.groups, -1)
        rows = m.out_channels // m.groups
        out = None
        for g in range(m.groups):
            a3, d3 = u[:, g].transpose(1, 2), d[:, g].transpose(1, 2)
            out = project_factored(a3, d3, p_out[g * rows:(g + 1) * rows], p_in, out=out, accumulate=out is not None)
        return out


class _EmbeddingRule:
    """The weight's per-example gradient is nonzero only in the rows of the ids an example uses."""

    factored = True

    @staticmethod
    def _masked(m: nn.Embedding, ids, delta, n):
        ids = ids.reshape(n, -1)
        d = _tokens(delta, n, m.embedding_dim)
        if m.padding_idx is not None:
            d = d * (ids != m.padding_idx).unsqueeze(-1).to(d.dtype)
        return ids, d

    @staticmethod
    def pieces(m: nn.Embedding, ids, delta, n, wanted, rows=None):
        ids, d = _EmbeddingRule._masked(m, ids, delta, n)
        if "weight" not in wanted or ids.numel() == 0:
            return
        used, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        width = m.embedding_dim
        grads = d.new_zeros(n, used.numel(), width)
        grads.scatter_add_(1, inverse.unsqueeze(-1).expand(-1, -1, width), d)
        grads = per_group(grads, rows)
        # Consecutive ids are contiguous rows of the weight: one piece per run.
        used = used.tolist()
        start = 0
        for j in range(1, len(used) + 1):
            if j == len(used) or used[j] != used[j - 1] + 1:
                yield "weight", used[start] * width, grads[:, start:j].reshape(grads.shape[0], -1)
                start = j

    @staticmethod
    def project_weight(m: nn.Embedding, ids, delta, n, p_out, p_in):
        ids, d = _EmbeddingRule._masked(m, ids, delta, n)
        left = p_out[ids]                                  # [n, T, k_out]: P_outᵀ one_hot(id_t)
        right = d.float() @ p_in                           # [n, T, k_in]
        return torch.bmm(left.transpose(1, 2), right).reshape(n, -1)


class _NormRule:
    """y = weight ⊙ x̂ + bias, with x̂ recomputed from the input by `normalize`: the per-example gradients are
    the sums of δ ⊙ x̂ and of δ over every axis but the parameters' own (the trailing normalised axes for
    LayerNorm/RMSNorm, the channel axis 1 for BatchNorm/GroupNorm)."""

    factored = False

    def __init__(self, normalize, trailing: bool):
        self.normalize, self.trailing = normalize, trailing

    def pieces(self, m, a, delta, n, wanted, rows=None):
        width = (m.weight if m.weight is not None else m.bias).numel()
        shape, axis = ((n, -1, width), 1) if self.trailing else ((n, width, -1), 2)
        if "weight" in wanted:
            yield "weight", 0, per_group((delta * self.normalize(m, a)).reshape(shape).sum(axis), rows)
        if "bias" in wanted:
            yield "bias", 0, per_group(delta.reshape(shape).sum(axis), rows)


def _batch_norm_x_hat(m, a):
    if uses_batch_statistics(m):
        return F.batch_norm(a, None, None, None, None, True, 0.0, m.eps)
    return F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def uses_batch_statistics(m: nn.Module) -> bool:
    """True for a BatchNorm layer that normalises with the batch's statistics, coupling the examples."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


_RULES = [
    (nn.Linear, _LinearRule, {"weight", "bias"}),
    (nn.Conv2d, _Conv2dRule, {"weight", "bias"}),
    (nn.Embedding, _EmbeddingRule, {"weight"}),
    (nn.LayerNorm, _NormRule(lambda m, a: F.layer_norm(a, m.normalized_shape, None, None, m.eps), True),
     {"weight", "bias"}),
    (nn.RMSNorm, _NormRule(lambda m, a: F.rms_norm(a, m.normalized_shape, None, m.eps), True), {"weight"}),
    (nn.GroupNorm, _NormRule(lambda m, a: F.group_norm(a, m.num_groups, None, None, m.eps), False),
     {"weight", "bias"}),
    (nn.modules.batchnorm._BatchNorm, _NormRule(_batch_norm_x_hat, False), {"weight", "bias"}),
]


def rule_for(m: nn.Module):
    """The rule computing `m`'s per-example parameter gradients, or None if the layer path cannot."""
    for cls, rule, names in _RULES:
        if isinstance(m, cls):
            own = {name for name, _ in m.named_parameters(recurse=False)}
            supported = type(m).forward is cls.forward and own <= names and _supported_options(m)
            return rule if supported else None
    return None


def _supported_options(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros"
    if isinstance(m, nn.Embedding):
        return not m.scale_grad_by_freq
    return True
