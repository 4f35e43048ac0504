"""One model under several checkpoints: per-batch computations for every checkpoint in one pass over the data."""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .._batches import batch_size, to_device
from .._group_rows import Groups
from .._progress import Progress
from ..store import FeatureStore
from ..tasks import Task


class CheckpointRunner:
    """A private copy of a model that takes every batch of a loader through each checkpoint's weights in turn.

    Equivalent to, for each checkpoint m, loading its weights and running compute(task_m, batch) over the loader;
    but the loader is read once, each batch visiting every checkpoint before the next is read, so data loading
    (often the bottleneck) is paid once instead of M times. Every checkpoint's state_dict is held in memory, and
    each has its own deep copy of the task, prepared under its weights (CLIP's reference embeddings).

    Args:
        model: nn.Module (the architecture; copied, never modified). task: a Task. device: where the copy lives.
        progress: tqdm bars over batches when stderr is a terminal.
    """

    def __init__(self, model, task: Task, device, progress: bool):
        if not isinstance(task, Task):
            raise TypeError(f"task: expected an attrprims.tasks.Task, got {type(task).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress: expected True or False, got {type(progress).__name__}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.task, self.progress = task, progress
        self.states: list[dict] = []
        self.tasks: list[Task] = []
        self._loaded = None  # the state_dict now in self.model

    def load(self, checkpoints: Sequence, train_loader: Iterable) -> None:
        """Take the checkpoints (state_dicts or paths) and prepare a copy of the task under each."""
        if not checkpoints:
            raise ValueError("checkpoints: expected at least one state_dict or path, got none")
        self.states = [_load(checkpoint, self.device) for checkpoint in checkpoints]
        self._loaded = None
        self.tasks = []
        for m in range(len(self.states)):
            self.use(m)
            task = copy.deepcopy(self.task)
            task.prepare(self.model, train_loader)
            self.tasks.append(task)

    def use(self, m: int) -> None:
        """Load checkpoint m's weights into the model unless they are the ones loaded last."""
        if self._loaded is not self.states[m]:
            self.model.load_state_dict(self.states[m])
            self.model.eval()
            self._loaded = self.states[m]

    def collect(self, loader: Iterable, compute: Callable, *, desc: str, argument: str, leave: bool = False,
                groups: Groups | None = None):
        """Per checkpoint, {name: [n, ...] on the CPU}: compute(task, batch) -> {name: [b, ...]} over all batches.

        argument: the loader's argument name, for errors about the loader.
        groups: sum rows into groups instead: compute(task, batch, local) gets the batch's group ids renumbered
            0..s-1 ([b] on the device) and returns {name: [s, ...]} sums, added into the result's G rows.
        """
        parts = [{} for _ in self.states]
        start = 0
        with Progress(self.progress, _len(loader), desc, "batch", leave=leave) as bar:
            for batch in loader:
                batch = to_device(batch, self.device)
                if groups is not None:
                    used, local = groups.of_batch(start, batch_size(batch), argument)
                    start += local.shape[0]
                    local = local.to(self.device)
                for m, task in enumerate(self.tasks):
                    self.use(m)
                    if groups is None:
                        for name, value in compute(task, batch).items():
                            parts[m].setdefault(name, []).append(value.cpu())
                        continue
                    for name, value in compute(task, batch, local).items():  # summed as they come: [G, ...] each
                        value = value.cpu()
                        if name not in parts[m]:
                            parts[m][name] = value.new_zeros((groups.count, *value.shape[1:]))
                        parts[m][name].index_add_(0, used, value)
                bar.update()
        if not parts[0]:
            raise ValueError(f"{argument}: expected at least one batch, got none")
        if groups is not None:
            groups.check_end(start, argument)
            return parts
        return [{name: torch.cat(values) for name, values in columns.items()} for columns in parts]

    def fill_store(self, loader: Iterable, compute: Callable, open_store: Callable, groups: Groups | None = None):
        """Per checkpoint, the store's arrays after computing the batches it lacks (batches are its blocks).

        open_store(n) opens the store for n training rows: the loader's length for a plain sequential DataLoader,
        else counted in a pass over it. Each checkpoint's rows live under its position and a hash of its weights,
        so a store never mixes two checkpoints' rows.
        groups: as `collect`; the store then holds one row per (batch, group in it), its partial sum, and
        open_store(n, groups) also gets the Groups (to record them); the rows are summed into G on reading.
        """
        sizes = _batch_sizes(loader)
        starts = list(itertools.accumulate(sizes, initial=0))
        if groups is None:
            store, spans = open_store(starts[-1]), None
        else:  # the rows of batch b: one per group it holds
            spans = [groups.of_batch(start, size, "train_loader") for start, size in zip(starts, sizes)]
            store = open_store(sum(used.numel() for used, _ in spans), groups)
        rows = list(itertools.accumulate(sizes if spans is None else [used.numel() for used, _ in spans], initial=0))
        ids = [f"model-{m}-{_digest(state)}" for m, state in enumerate(self.states)]
        done = [store.completed(model_id) for model_id in ids]
        count = 0
        with Progress(self.progress, len(sizes), "featurize", "batch") as bar:
            for b, batch in enumerate(loader):
                if b >= len(sizes) or batch_size(batch) != sizes[b]:
                    raise ValueError("train_loader: yielded other batches than when the store was sized (it must "
                                     "yield the same batches in the same order every time)")
                lo, hi = rows[b], rows[b + 1]
                todo = [m for m in range(len(ids)) if hi > lo and not any(a <= lo and hi <= e for a, e in done[m])]
                if todo:
                    batch = to_device(batch, self.device)
                    extra = () if spans is None else (spans[b][1].to(self.device),)
                for m in todo:
                    self.use(m)
                    store.write(ids[m], lo, compute(self.tasks[m], batch, *extra))
                count = b + 1
                bar.update()
        if count != len(sizes):
            raise ValueError(f"train_loader: yielded {count} batches, expected {len(sizes)} (as when the store was "
                             "sized)")
        arrays = [{name: store.read(model_id, name) for name in store.arrays} for model_id in ids]
        if spans is None:
            return arrays
        used = torch.cat([used for used, _ in spans])
        return [{name: value.new_zeros((groups.count, *value.shape[1:])).index_add_(0, used, value)
                 for name, value in column.items()} for column in arrays]


def _load(checkpoint, device):
    """A state_dict from a dict or a path (torch.load with weights_only)."""
    if isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return torch.load(checkpoint, map_location=device, weights_only=True)
    raise TypeError(f"checkpoints: expected state_dicts or paths, got {type(checkpoint).__name__}")


def _digest(state: dict) -> str:
    """16 hex digits of sha256 over a state_dict's names and bytes."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _batch_sizes(loader) -> list[int]:
    """Sizes of the batches a loader yields: from its sampler for a plain sequential DataLoader, else one pass."""
    batches = loader.batch_sampler if isinstance(loader, DataLoader) else None
    if isinstance(batches, BatchSampler) and isinstance(batches.sampler, SequentialSampler) and not batches.drop_last:
        n, b = len(batches.sampler), batches.batch_size
        return [min(b, n - start) for start in range(0, n, b)]
    return [batch_size(batch) for batch in loader]


def _len(loader):
    try:
        return len(loader)
    except TypeError:
        return None
