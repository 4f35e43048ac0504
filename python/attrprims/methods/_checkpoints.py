"""One model under several checkpoints: per-batch computations for every checkpoint in one pass over the data."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .._batches import batch_size
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

    def collect(self, loader: Iterable, compute: Callable, *, desc: str, argument: str, leave: bool = False):
        """Per checkpoint, {name: [n, ...] on the CPU}: compute(task, batch) -> {name: [b, ...]} over all batches.

        argument: the loader's argument name, for the error on an empty loader.
        """
        parts = [{} for _ in self.states]
        with Progress(self.progress, _len(loader), desc, "batch", leave=leave) as bar:
            for batch in loader:
                batch = _to(batch, self.device)
                for m, task in enumerate(self.tasks):
                    self.use(m)
                    for name, value in compute(task, batch).items():
                        parts[m].setdefault(name, []).append(value.cpu())
                bar.update()
        if not parts[0]:
            raise ValueError(f"{argument}: expected at least one batch, got none")
        return [{name: torch.cat(values) for name, values in columns.items()} for columns in parts]

    def fill_store(self, loader: Iterable, compute: Callable, open_store: Callable[[int], FeatureStore]):
        """Per checkpoint, the store's arrays after computing the batches it lacks (batches are its blocks).

        open_store(n) opens the store for n training rows: the loader's length for a plain sequential DataLoader,
        else counted in a pass over it. Each checkpoint's rows live under its position and a hash of its weights,
        so a store never mixes two checkpoints' rows.
        """
        n = _rows(loader)
        store = open_store(n)
        ids = [f"model-{m}-{_digest(state)}" for m, state in enumerate(self.states)]
        done = [store.completed(model_id) for model_id in ids]
        start = 0
        with Progress(self.progress, _len(loader), "featurize", "batch") as bar:
            for batch in loader:
                stop = start + batch_size(batch)
                if stop > n:
                    raise ValueError(f"train_loader: yielded more than the {n} rows it had when the store was opened")
                todo = [m for m in range(len(ids))
                        if stop > start and not any(a <= start and stop <= b for a, b in done[m])]
                if todo:
                    batch = _to(batch, self.device)
                for m in todo:
                    self.use(m)
                    store.write(ids[m], start, compute(self.tasks[m], batch))
                start = stop
                bar.update()
        if start != n:
            raise ValueError(f"train_loader: yielded {start} rows, expected {n} (its length when the store was opened)")
        return [{name: store.read(model_id, name) for name in store.arrays} for model_id in ids]


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


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _rows(loader) -> int:
    """Rows a loader yields: its sampler's length for a plain sequential DataLoader, else counted in one pass."""
    batches = loader.batch_sampler if isinstance(loader, DataLoader) else None
    if isinstance(batches, BatchSampler) and isinstance(batches.sampler, SequentialSampler) and not batches.drop_last:
        return len(batches.sampler)
    return sum(batch_size(batch) for batch in loader)


def _len(loader):
    try:
        return len(loader)
    except TypeError:
        return None
