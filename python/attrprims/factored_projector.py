"""FactoredProjector: the seeded projection of whole-model gradients whose weight blocks are P_out ⊗ P_in."""

from __future__ import annotations

import numpy as np
import torch

from . import _core
from ._checks import check_int
from .projection import Projector


FACTOR_KINDS = ("rademacher", "gaussian")
_MAX_FACTOR_K = 2**15


def _factor_seed(seed: int, tag: int) -> int:
    """Seed of a factor: the first 64 bits of Philox-4x32-10 with key `seed` at counter (tag, 0, 0, "FACT")."""
    words = _core.philox4x32_10(np.array([[tag, 0, 0, 0x46414354]], dtype=np.uint32), seed)[0]
    return int(words[0]) | int(words[1]) << 32


class FactoredProjector:
    """A projection P [p, k_out·k_in] of whole-model gradients whose weight-matrix blocks are Kronecker products.

    In `project_grads`, the rows of P for the weight W [d_out, d_in] of a Linear, Conv2d (d_in = C_in/groups·kh·kw)
    or Embedding (d_out = number of embeddings) layer at flat offset o are P_out ⊗ P_in, with P_out rows o..o+d_out
    of Projector(p, k_out, seed_out, kind) and P_in rows o..o+d_in of Projector(p, k_in, seed_in, kind), so layers
    get independent factors; the layer path then projects Σ_t (δ_t P_out)ᵀ(a_t P_in) without forming W's
    gradient. Every other row (biases, norms, other parameters) is that row of `self.dense` = Projector(p,
    k_out·k_in, seed, kind). Factor seeds derive from `seed` (`_factor_seed`). A block's entries are products of
    ±1/√k_out and ±1/√k_in (or of Gaussians with those scales), so E||gP||² = ||g||² as for the dense kinds.
    """

    def __init__(self, p, k_out, k_in, seed=0, kind="rademacher"):
        if kind not in FACTOR_KINDS:
            names = ", ".join(map(repr, FACTOR_KINDS))
            raise ValueError(f"kind: expected one of {names} for the factors, got {kind!r}")
        k_out = check_int("k_out", k_out, 1, _MAX_FACTOR_K)
        k_in = check_int("k_in", k_in, 1, _MAX_FACTOR_K)
        self.dense = Projector(p, k_out * k_in, seed, kind)
        self.out_factor = Projector(p, k_out, _factor_seed(self.dense.seed, 1), kind)
        self.in_factor = Projector(p, k_in, _factor_seed(self.dense.seed, 2), kind)
        self._factors = {}

    p = property(lambda self: self.dense.p)
    k = property(lambda self: self.dense.k)
    seed = property(lambda self: self.dense.seed)
    kind = property(lambda self: self.dense.kind)
    k_out = property(lambda self: self.out_factor.k)
    k_in = property(lambda self: self.in_factor.k)

    def factors(self, offset, d_out, d_in, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out [d_out, k_out], P_in [d_in, k_in]) float32 on `device` for the weight block at `offset`; cached."""
        offset, d_out, d_in = check_int("offset", offset, 0), check_int("d_out", d_out, 1), check_int("d_in", d_in, 1)
        if offset + d_out * d_in > self.p:
            raise ValueError(f"offset: the block {offset}..{offset + d_out * d_in} ({d_out} x {d_in}) exceeds "
                             f"p = {self.p}")
        key = (offset, d_out, d_in, torch.device(device))
        if key not in self._factors:
            self._factors[key] = (self.out_factor.matrix(slice(offset, offset + d_out), device=device),
                                  self.in_factor.matrix(slice(offset, offset + d_in), device=device))
        return self._factors[key]

    def config(self) -> dict:
        """A JSON-serialisable description that determines P completely (given the model's layer types)."""
        dense = self.dense.config()
        return {**dense, "kind": "factored", "factor_kind": self.kind, "k_out": self.k_out, "k_in": self.k_in}

    @classmethod
    def from_config(cls, config: dict) -> "FactoredProjector":
        """Rebuild the projector `config()` describes; refuses an unknown RNG or matrix format."""
        if config.get("kind") != "factored":
            raise ValueError(f"config: expected kind 'factored', got {config.get('kind')!r}")
        Projector.from_config({**config, "kind": config["factor_kind"]})  # checks rng and format
        return cls(config["p"], config["k_out"], config["k_in"], config["seed"], config["factor_kind"])

    def __eq__(self, other) -> bool:
        return isinstance(other, FactoredProjector) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    def __repr__(self) -> str:
        return (f"FactoredProjector(p={self.p}, k_out={self.k_out}, k_in={self.k_in}, seed={self.seed}, "
                f"kind={self.kind!r})")
