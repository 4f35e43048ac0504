"""Group ids, checked, and the two ways a batch's per-example rows become per-group sums.

A group's gradient is the sum of its members' gradients (GGDA, Ley et al. 2024). Inside one batch that sum is taken
either after the fact (`sum`: per-example rows added into their group's row) or before the product that forms a
gradient (`concat`: a group's members laid end to end along a token axis, so that Σ_t δ_t a_tᵀ over the longer
axis is the group's weight gradient and the per-example ones are never formed).
"""

from __future__ import annotations

import hashlib

import torch

_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def group_ids(groups, n: int | None, name: str = "groups", *, every_id: bool = True) -> tuple[torch.Tensor, int]:
    """(ids LongTensor [n] on the CPU, G) from a tensor or sequence of group ids 0..G-1 (n None: any length).

    every_id: require each of 0..G-1 to be used (a partition into G groups); else G = max + 1, empty groups allowed.
    Raises: TypeError/ValueError naming `name`: not integers, a shape other than [n], negative ids, unused ids.
    """
    if not isinstance(groups, torch.Tensor):
        try:
            groups = torch.as_tensor(groups)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a LongTensor [n] of group ids, got {type(groups).__name__}") from None
    if groups.dtype not in _INTEGERS:
        raise ValueError(f"{name}: expected integer group ids (a LongTensor), got dtype "
                         f"{str(groups.dtype).removeprefix('torch.')}")
    if groups.dim() != 1 or (n is not None and groups.shape[0] != n):
        raise ValueError(f"{name}: expected shape [{'n' if n is None else n}] (one group id per example), got "
                         f"{list(groups.shape)}")
    ids = groups.detach().to("cpu", torch.long)
    if ids.shape[0] == 0:
        return ids, 0
    low = int(ids.min())
    if low < 0:
        raise ValueError(f"{name}: expected ids >= 0, got {low}")
    count = int(ids.max()) + 1
    if every_id:
        missing = (torch.bincount(ids, minlength=count) == 0).nonzero().flatten().tolist()
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"{name}: expected every id in 0..{count - 1} to be used (ids 0..G-1 of G groups), "
                             f"ids {missing[:10]}{more} are not")
    return ids, count


class GroupRows:
    """Rows of a batch of n examples summed into `count` groups by `ids` [n] (groups may be empty).

    `sum(x)` and `concat(x, axis)` are the two ways (see the module docstring); both put group j in row j.
    `concatenates` says whether concat is the cheaper one here (groups of similar sizes in this batch).
    """

    def __init__(self, ids: torch.Tensor, count: int):
        self.count = count
        self._ids = ids
        n = ids.shape[0]
        sizes = torch.bincount(ids, minlength=count)
        self.width = int(sizes.max()) if n else 0  # the largest group: concat pads every group to it
        order = torch.sort(ids, stable=True).indices
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(ids)
        rank[order] = torch.arange(n, device=ids.device) - starts[ids[order]]
        self._slot = ids * self.width + rank  # example i's place in the [count · width] padded layout
        # Padding to the largest group costs rows; past twice the examples', summing per-example products is cheaper.
        self.concatenates = count * self.width <= 2 * n

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[count, ...]: row j is the sum of the rows of x [n, ...] whose id is j."""
        return x.new_zeros((self.count, *x.shape[1:])).index_add_(0, self._ids, x)

    def concat(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """x [n, ..., L, ...] with each group's members laid end to end along `axis` (>= 1), padded with zeros:
        [count, ..., width·L, ...]. Zero padding adds nothing to a sum of products with δ, so a rule that sums over
        that axis gives each group's sum."""
        padded = x.new_zeros((self.count * self.width, *x.shape[1:]))
        padded[self._slot] = x
        padded = padded.reshape(self.count, self.width, *x.shape[1:]).movedim(1, axis)
        shape = list(padded.shape)
        return padded.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def per_group(values: torch.Tensor, rows: GroupRows | None) -> torch.Tensor:
    """Per-example values [n, ...] as they are, or their per-group sums [count, ...] when `rows` is given."""
    return values if rows is None else rows.sum(values)


class Groups:
    """A training set's group ids as the methods read them, batch by batch in loader order.

    Args: groups: ids [n] of a partition into G groups (every id in 0..G-1 used); n must be the loader's row count.
    Attributes: ids [n] (CPU), count G, sizes [G], digest (sha256 of the ids, for stores).
    """

    def __init__(self, groups):
        self.ids, self.count = group_ids(groups, None)
        if self.count == 0:
            raise ValueError("groups: expected one id per training example, got none")
        self.sizes = torch.bincount(self.ids, minlength=self.count)
        self.digest = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()

    def of_batch(self, start: int, size: int, argument: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the groups of rows start..start+size [s], their ids renumbered 0..s-1 [size])."""
        if start + size > self.ids.shape[0]:
            raise ValueError(f"{argument}: yields more rows than groups has ids ({self.ids.shape[0]})")
        return torch.unique(self.ids[start:start + size], return_inverse=True)

    def check_end(self, rows: int, argument: str) -> None:
        if rows != self.ids.shape[0]:
            raise ValueError(f"{argument}: yielded {rows} rows, but groups has {self.ids.shape[0]} ids (one per "
                             "training example)")
