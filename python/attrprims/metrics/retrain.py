"""Retraining harness: train models on random α-subsets of the training set, record and cache their target outputs.

These are the `subset_masks` and `subset_outputs` that `lds` compares attribution scores against (Park et al.
2023, TRAK, Section 2). `subset_masks` draws the subsets; `retrain_outputs` trains one model per subset with the
user's `train_fn(indices, seed)` and records `output_fn(model)` ([m] outputs on the targets).

Cache layout (one directory can hold many experiments):
    <cache>/retrain-<entry>/manifest.json   format, key, seed, s, n, the masks' sha256, m (once known)
    <cache>/retrain-<entry>/subset-<j>.npy  [m] float64: outputs of the model trained on subset j
`entry` is a hash of (key, seed, masks), so another key, seed or set of masks is another entry (never an error
and never a stale hit), and experiments that share one of them share one entry. Each subset's file is written to
a temp file, fsynced and renamed into place, so an interrupted run leaves whole files only and a rerun trains only
the subsets whose file is missing. Concurrent runs of one entry are safe but may train a subset twice. The key is
the caller's promise: it must change whenever the data, model, training recipe or output function does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from .._checks import check_int, check_matrix, check_seed
from .._progress import Progress

FORMAT = "attrprims-retrain/1"


def subset_masks(n_train: int, n_subsets: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """Draw `n_subsets` random subsets of `round(alpha · n_train)` training examples each, without replacement.

    Equivalent to `mask[j, torch.randperm(n_train)[:round(alpha * n_train)]] = True` for j in order, from one
    torch.Generator seeded with `seed` (Python's round: half to even).

    Args:
        n_train: n, the number of training examples, >= 1. n_subsets: s, >= 1. alpha: fraction kept, in (0, 1].
        seed: seed of the draw.
    Returns: [s, n] bool on the CPU, exactly round(alpha · n) True per row.
    Raises: TypeError/ValueError naming the argument; ValueError when round(alpha · n) is 0.
    Determinism: bit-identical for the same arguments and torch version; the first rows do not depend on s, so
    drawing more subsets extends the same experiment.
    """
    n = check_int("n_train", n_train, 1)
    s = check_int("n_subsets", n_subsets, 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"alpha: expected a fraction in (0, 1], got {alpha!r}")
    size = round(alpha * n)
    if size == 0:
        raise ValueError(f"alpha: expected round(alpha · n_train) >= 1, got round({alpha} · {n}) = 0")
    generator = torch.Generator().manual_seed(check_seed(seed))
    masks = torch.zeros(s, n, dtype=torch.bool)
    for j in range(s):
        masks[j, torch.randperm(n, generator=generator)[:size]] = True
    return masks


def subset_seed(seed: int, index: int) -> int:
    """Derive the training seed of subset `index` of an experiment seeded with `seed`.

    Equivalent to the first 8 bytes (little-endian) of sha256(b"attrprims.retrain" + seed + index), each as
    8 little-endian bytes, shifted right by 1: in [0, 2^63), so torch.manual_seed and numpy both take it.
    """
    digest = hashlib.sha256(b"attrprims.retrain" + check_seed(seed).to_bytes(8, "little")
                            + check_int("index", index, 0, 2**64 - 1).to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _key_text(key) -> str:
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"key: expected a string or JSON data (str, number, list, dict) naming the experiment, got "
                        f"{type(key).__name__} ({error})") from None


def _masks_hash(masks: np.ndarray) -> str:
    digest = hashlib.sha256(f"{list(masks.shape)}".encode())
    digest.update(np.packbits(masks, axis=1).tobytes())
    return digest.hexdigest()


def _replace(path: str, write: Callable) -> None:
    """Write `path` atomically: `write(file)` into a temp file beside it, fsync, os.replace, fsync the directory."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Entry:
    """One experiment's directory in the cache: its manifest and one .npy of outputs per finished subset."""

    def __init__(self, cache, key, seed: int, masks: np.ndarray):
        key_text = _key_text(key)
        self.manifest = {"format": FORMAT, "key": json.loads(key_text), "seed": seed, "n_subsets": masks.shape[0],
                         "n_train": masks.shape[1], "masks_sha256": _masks_hash(masks), "n_targets": None}
        name = hashlib.sha256(json.dumps([key_text, seed, self.manifest["masks_sha256"]]).encode()).hexdigest()
        self.path = os.path.join(os.fspath(cache), f"retrain-{name[:16]}")
        os.makedirs(self.path, exist_ok=True)
        manifest_path = os.path.join(self.path, "manifest.json")
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                found = json.load(f)
            if {k: v for k, v in found.items() if k != "n_targets"} != \
                    {k: v for k, v in self.manifest.items() if k != "n_targets"}:
                raise ValueError(f"cache: expected {manifest_path} to describe this experiment (key, seed, masks), "
                                 f"got {found}")
            self.manifest["n_targets"] = found["n_targets"]
        else:
            self._write_manifest()

    @property
    def n_targets(self) -> int | None:
        return self.manifest["n_targets"]

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=1).encode()
        _replace(os.path.join(self.path, "manifest.json"), lambda f: f.write(data))

    def _file(self, j: int) -> str:
        return os.path.join(self.path, f"subset-{j:06d}.npy")

    def load(self, j: int) -> torch.Tensor | None:
        """Subset j's outputs [m] float64, or None if not computed yet."""
        try:
            values = np.load(self._file(j))
        except FileNotFoundError:
            return None
        if values.dtype != np.float64 or values.shape != (self.n_targets,):
            raise ValueError(f"cache: expected {self._file(j)} to hold [{self.n_targets}] float64, got "
                             f"{list(values.shape)} {values.dtype}")
        return torch.from_numpy(values)

    def save(self, j: int, outputs: torch.Tensor) -> None:
        if self.n_targets is None:
            self.manifest["n_targets"] = outputs.shape[0]
            self._write_manifest()
        _replace(self._file(j), lambda f: np.save(f, outputs.numpy()))


def _outputs(value, j: int, n_targets: int | None) -> torch.Tensor:
    """output_fn's result as [m] float64 on the CPU, checked against the m seen so far."""
    try:
        out = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"output_fn: expected a 1-D tensor or array [m] of outputs on the targets, got "
                        f"{type(value).__name__} (subset {j})") from None
    if out.dim() != 1 or (n_targets is not None and out.shape[0] != n_targets):
        expected = "[m]" if n_targets is None else f"[m] with m == {n_targets} (from the earlier subsets)"
        raise ValueError(f"output_fn: expected shape {expected}, got {list(out.shape)} (subset {j})")
    out = out.to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"output_fn: expected finite outputs, got {out.tolist()} (subset {j})")
    return out


def retrain_outputs(train_fn: Callable, output_fn: Callable, masks: torch.Tensor, *, seed: int = 0, cache=None,
                    key=None, progress: bool = True) -> torch.Tensor:
    """Train one model per subset and record its outputs on the targets, reusing cached results.

    Equivalent to `torch.stack([output_fn(train_fn(masks[j].nonzero().flatten(), subset_seed(seed, j)))
    for j in range(s)]).double()`.

    Args:
        train_fn: (indices [|S|] int64 CPU, ascending; seed int) -> a model trained from scratch on those examples.
        output_fn: model -> [m] outputs on the targets (tensor, array or list), e.g. the margins.
        masks: [s, n] bool, CPU or CUDA, as `subset_masks` draws them.
        seed: experiment seed; subset j trains with `subset_seed(seed, j)`.
        cache: a directory (created if absent) keeping each subset's outputs (see the module docstring), or None.
        key: with `cache`, a string or JSON data naming the experiment (data, model, recipe, output function).
        progress: a tqdm bar over the subsets when stderr is a terminal and tqdm is installed; False for none.
    Returns: [s, m] float64 on the CPU.
    Raises: TypeError/ValueError naming the argument (output_fn for a bad result, cache for a foreign entry).
    Determinism: cached rows are the bytes first recorded; fresh rows are as deterministic as train_fn.
    """
    check_matrix("masks", masks, "[s, n]", (torch.bool,))
    if masks.shape[0] < 1:
        raise ValueError(f"masks: expected at least one subset (row), got {list(masks.shape)}")
    seed = check_seed(seed)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected True or False, got {type(progress).__name__}")
    if cache is None and key is not None:
        raise ValueError("key: only used with cache=, which is None")
    if cache is not None and key is None:
        raise ValueError("key: expected a string or JSON data naming the experiment when cache= is given, got None")
    masks_np = masks.cpu().numpy()
    entry = _Entry(cache, key, seed, masks_np) if cache is not None else None
    rows: list[torch.Tensor | None] = [entry.load(j) if entry is not None else None for j in range(len(masks_np))]
    todo = [j for j, row in enumerate(rows) if row is None]
    n_targets = entry.n_targets if entry is not None else None
    with Progress(progress, len(rows), "retrain", "model", initial=len(rows) - len(todo), leave=False) as bar:
        for j in todo:
            model = train_fn(torch.from_numpy(np.flatnonzero(masks_np[j]).astype(np.int64)), subset_seed(seed, j))
            rows[j] = _outputs(output_fn(model), j, n_targets)
            del model
            n_targets = rows[j].shape[0]
            if entry is not None:
                entry.save(j, rows[j])
            bar.update()
    return torch.stack(rows)
