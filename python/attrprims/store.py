"""Feature store: per-model `.npy` arrays of n rows in a directory, filled block by block and resumable.

Layout of a store at `path`:
    manifest.json                  format, library version, n, config (projector, layout, output, extra), the
                                   arrays (trailing shape, dtype) and, per model id, its completed row ranges
    models/<model_id>/<name>.npy   one [n, *shape] array per name: plain .npy, `np.load(..., mmap_mode="r")` reads it
    .lock                          the lock every manifest update holds (fcntl.flock; POSIX only)

A block of rows is written, flushed and fsynced before the manifest marks it complete, and the manifest is
replaced atomically (temp file + os.replace) under the lock by read-merge-write, so a writer killed at any point
leaves only rows that are not marked complete, and writers in several processes on disjoint rows never lose each
other's entries. `fill` computes only the blocks still missing, on a grid of `block` rows, so a resumed run
computes the same blocks as an uninterrupted one and no completed block twice. A store refuses to be opened
with another n, arrays, projector, parameter layout, output function or extra config; the library version is
recorded, not compared (a projector's config already pins the matrix format).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from . import _core
from ._checks import check_int
from ._progress import Progress

FORMAT = "attrprims-feature-store/1"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# The dtypes .npy files and torch.from_numpy both hold (no bfloat16: numpy has none).
_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "complex64",
           "complex128")


def _check_name(name: str, value) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{name}: expected a string of letters, digits, '_', '.', '-' (not starting with '.' or "
                         f"'-', at most 128 characters), got {value!r}")
    return value


def _numpy_dtype(name: str, dtype) -> np.dtype:
    """A native-order numpy dtype from a numpy or torch dtype or its name; raises naming `name` otherwise."""
    try:
        out = np.dtype(str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype)
    except (TypeError, ValueError):
        out = None
    if out is None or out.name not in _DTYPES or out != np.dtype(out.name):
        raise ValueError(f"{name}: expected a dtype that .npy and torch share ({', '.join(_DTYPES)}; native byte "
                         f"order), got {dtype}")
    return np.dtype(out.name)


def _array_specs(arrays) -> dict:
    """{name: {"shape": [trailing dims], "dtype": name}} from {name: (shape, dtype)}, validated."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(f"arrays: expected a non-empty dict {{name: (trailing shape, dtype)}}, got {arrays!r}")
    specs = {}
    for name, spec in arrays.items():
        _check_name("arrays", name)
        if not isinstance(spec, (tuple, list)) or len(spec) != 2 or not isinstance(spec[0], (tuple, list)):
            raise ValueError(f"arrays[{name!r}]: expected (trailing shape, dtype), e.g. ([k], torch.float32), got "
                             f"{spec!r}")
        shape = [check_int(f"arrays[{name!r}] shape", d, 0) for d in spec[0]]
        specs[name] = {"shape": shape, "dtype": _numpy_dtype(f"arrays[{name!r}]", spec[1]).name}
    return specs


def _as_config(name: str, value):
    """`value` as JSON data (objects with .config() give that), as the manifest will hold it."""
    if hasattr(value, "config") and callable(value.config):
        value = value.config()
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected JSON-serialisable data or an object with .config(), got {value!r}") from err


def _differences(stored, given, key: str) -> list[str]:
    """'key: store has A, got B' for each leaf where two JSON values differ."""
    if isinstance(stored, dict) and isinstance(given, dict):
        return [d for k in sorted(stored.keys() | given.keys(), key=str)
                for d in _differences(stored.get(k), given.get(k), f"{key}.{k}")]
    return [] if stored == given else [f"{key}: store has {stored!r}, got {given!r}"]


def _merge(ranges) -> list[list[int]]:
    """Sorted, disjoint, non-adjacent [start, stop) ranges covering the same rows as `ranges`."""
    out: list[list[int]] = []
    for start, stop in sorted(ranges):
        if start >= stop:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def _subtract(ranges, start: int, stop: int) -> list[list[int]]:
    """`ranges` without the rows [start, stop)."""
    return _merge([r for a, b in ranges for r in ([a, min(b, start)], [max(a, stop), b])])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, data: dict) -> None:
    """Replace `path` with `data` atomically: write a temp file, fsync it, os.replace, fsync the directory."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _create_npy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A zero-filled (sparse) C-order .npy file of `shape` and `dtype`, made under a temp name then renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + int(np.prod(shape)) * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_manifest(path: str) -> dict | None:
    """The manifest of the store at `path`, or None if there is none."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@contextmanager
def _locked(path: str):
    """Hold the exclusive lock of the store at `path`: manifest updates in other processes (or threads) wait."""
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FeatureStore:
    """Per-model arrays of n rows (features, out-to-loss terms, ...) on disk, written block by block, resumable.

    Equivalent to a dict {model_id: {name: array [n, *shape]}} that persists, remembers which rows are done,
    and refuses features made under another configuration.

    `FeatureStore(path)` opens an existing store; `FeatureStore.open(path, ...)` creates one or checks that an
    existing one has the same configuration. A model id is registered by its first write or fill.
    Determinism: the arrays hold exactly the bytes written; `fill` calls `compute` on the same blocks
    whatever the interruptions, so a deterministic `compute` gives bit-identical arrays after any resume.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        manifest = _read_manifest(self.path)
        if manifest is None or manifest.get("format") != FORMAT:
            raise ValueError(f"path: expected a feature store (manifest.json with format {FORMAT!r}), got "
                             f"{self.path!r}")
        self.n: int = manifest["n"]
        self.version: str = manifest["version"]
        self.config: dict = manifest["config"]
        self.arrays: dict = {name: (tuple(spec["shape"]), np.dtype(spec["dtype"]))
                             for name, spec in manifest["arrays"].items()}
        self._offsets: dict[tuple[str, str], int] = {}

    @classmethod
    def open(cls, path, *, n, arrays, projector=None, layout=None, output=None, extra=None) -> "FeatureStore":
        """Create a store at `path` (an empty or absent directory), or open the one there if it matches.

        Args:
            path: the store's directory. n: rows (training examples) per array.
            arrays: {name: (trailing shape, dtype)}, e.g. {"features": ([k], torch.float32), "out_to_loss":
                ([], torch.float32)}; dtypes are numpy or torch dtypes or their names (no bfloat16).
            projector: a Projector or FactoredProjector (or its config() dict), or None. layout: the ParamLayout of
                the projected parameters (or its config() dict), or None. output: the output function's name.
            extra: any other JSON data that must match (task, dataset version, ...).
        Returns: the FeatureStore.
        Raises: ValueError naming the argument: bad values, projector and layout disagreeing on p, a non-empty
            directory that is not a store, or an existing store whose configuration differs (listing each
            differing key with the store's value and the given one).
        """
        n = check_int("n", n, 0)
        specs = _array_specs(arrays)
        config = {"projector": _as_config("projector", projector), "layout": _as_config("layout", layout),
                  "output": output, "extra": _as_config("extra", extra)}
        if output is not None and (not isinstance(output, str) or not output):
            raise ValueError(f"output: expected the output function's name (a non-empty string) or None, got "
                             f"{output!r}")
        p_sources = [(name, config[name].get("p")) for name in ("projector", "layout")
                     if isinstance(config[name], dict)]
        if len(p_sources) == 2 and p_sources[0][1] != p_sources[1][1]:
            raise ValueError(f"layout: expected p == {p_sources[0][1]} (from projector), got p == {p_sources[1][1]}")
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with _locked(path):
            manifest = _read_manifest(path)
            if manifest is None:
                others = sorted(set(os.listdir(path)) - {".lock"})
                if others:
                    raise ValueError(f"path: expected an empty directory or a feature store, got {path!r} holding "
                                     f"{others[:5]} and no manifest.json")
                manifest = {"format": FORMAT, "version": _core.build_info["version"], "n": n, "config": config,
                            "arrays": specs, "models": {}}
                _write_json(os.path.join(path, "manifest.json"), manifest)
            if manifest.get("format") != FORMAT:
                raise ValueError(f"path: expected a feature store of format {FORMAT!r}, got {manifest.get('format')!r}")
            wanted = {"n": n, "arrays": specs, "config": config}
            differ = [d for key in wanted for d in _differences(manifest.get(key), wanted[key], key)]
            if differ:
                raise ValueError(f"FeatureStore at {path!r} was made with another configuration: " + "; ".join(differ))
        return cls(path)

    @property
    def models(self) -> list[str]:
        """The registered model ids, sorted."""
        return sorted(_read_manifest(self.path)["models"])

    def completed(self, model_id: str) -> list[tuple[int, int]]:
        """The rows of `model_id` marked complete, as sorted disjoint [start, stop) ranges ([] for an unknown id)."""
        entry = _read_manifest(self.path)["models"].get(_check_name("model_id", model_id))
        return [(a, b) for a, b in entry["complete"]] if entry else []

    def is_complete(self, model_id: str) -> bool:
        """Whether every row 0..n of `model_id` is marked complete."""
        return self.completed(model_id) == ([(0, self.n)] if self.n else [])

    def missing(self, model_id: str, block: int) -> list[tuple[int, int]]:
        """The blocks still to compute: pieces of the grid [i·block, (i+1)·block) ∩ [0, n) not marked complete.

        Equivalent to, for each grid block in order, its sub-ranges that `completed(model_id)` does not cover.
        """
        block = check_int("block", block, 1)
        todo, gaps, previous = [], [], 0
        for a, b in [*self.completed(model_id), (self.n, self.n)]:
            gaps.append((previous, a))
            previous = b
        for a, b in gaps:
            while a < b:
                stop = min(b, (a // block + 1) * block)
                todo.append((a, stop))
                a = stop
        return todo

    def write(self, model_id: str, start: int, arrays: Mapping, *, overwrite: bool = False) -> None:
        """Write rows [start, start + b) of every array for `model_id`, fsync them, then mark them complete.

        Args:
            model_id: the model (ensemble member or checkpoint); registered on its first write.
            start: the first row. arrays: {name: [b, *shape]} for every array of the store, each a torch tensor
                (any device) or numpy array of the store's dtype, finite.
            overwrite: allow rows already marked complete (they are unmarked until the new data is on disk).
        Raises: ValueError naming the argument or the array: unknown or missing names, wrong shape, dtype or
            row count, NaN/Inf, rows beyond n, or rows already complete without overwrite.
        """
        _check_name("model_id", model_id)
        start = check_int("start", start, 0, self.n)
        blocks, rows, first = self._validate(start, arrays)
        if start + rows > self.n:
            raise ValueError(f"start: expected start + b <= n == {self.n}, got start {start} with b == {rows} (from "
                             f"{first})")
        self._write_block(model_id, start, start + rows, blocks, overwrite)

    def _write_block(self, model_id: str, start: int, stop: int, blocks: dict, overwrite: bool) -> None:
        """Write validated blocks into rows [start, stop), fsync, then mark them complete (see `write`)."""
        if stop == start:
            return
        self._register(model_id)
        if overwrite:
            self._update_complete(model_id, lambda done: _subtract(done, start, stop))
        else:
            clash = [(a, b) for a, b in self.completed(model_id) if a < stop and start < b]
            if clash:
                raise ValueError(f"start: rows [{start}, {stop}) of model {model_id!r} overlap completed rows {clash}; "
                                 f"pass overwrite=True to rewrite them")
        for name, data in blocks.items():
            row_bytes = data.itemsize * int(np.prod(self.arrays[name][0]))
            fd = os.open(self._array_path(model_id, name), os.O_WRONLY)
            try:
                _pwrite_all(fd, memoryview(data.reshape(-1).view(np.uint8)),
                            self._data_offset(model_id, name) + start * row_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._update_complete(model_id, lambda done: _merge([*done, [start, stop]]))

    def read(self, model_id: str, name: str, *, partial: bool = False) -> torch.Tensor:
        """Array `name` of `model_id` as a CPU tensor [n, *shape] over a copy-on-write memmap (read lazily).

        Raises: ValueError naming model_id (unknown, or incomplete without partial=True: rows not marked complete
        then hold zeros or unfinished data) or name (not an array of the store).
        """
        models = self.models
        if model_id not in models:
            raise ValueError(f"model_id: expected one of {models} (the store's models), got {model_id!r}")
        if name not in self.arrays:
            raise ValueError(f"name: expected one of {sorted(self.arrays)}, got {name!r}")
        if not partial and not self.is_complete(model_id):
            raise ValueError(f"model_id: {model_id!r} is incomplete (rows {self.missing(model_id, self.n)[:4]} are "
                             f"missing); pass partial=True to read it anyway")
        return torch.from_numpy(np.load(self._array_path(model_id, name), mmap_mode="c"))

    def fill(self, model_id: str, compute: Callable[[int, int], Mapping], *, block: int, shard=(0, 1),
             progress=True) -> list[tuple[int, int]]:
        """Compute and write every missing block of `model_id` (resuming where an earlier fill stopped).

        Equivalent to `for start, stop in missing(model_id, block): write(model_id, start, compute(start, stop))`,
        restricted to this shard's blocks.

        Args:
            compute: (start, stop) -> {name: [stop - start, *shape]}, as `write` takes them.
            block: rows per block (grid-aligned). shard: (rank, world): this process takes the grid blocks with
                start // block % world == rank, so `world` processes fill one model together.
            progress: True for a tqdm bar when stderr is a terminal and tqdm is installed, False for none, or a
                callable (start, stop) run after each block is marked complete.
        Returns: the blocks computed, in order. `model_id` is registered even when there is nothing to compute.
        """
        block = check_int("block", block, 1)
        if not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress: expected True, False or a callable (start, stop), got "
                            f"{type(progress).__name__}")
        if not isinstance(shard, (tuple, list)) or len(shard) != 2:
            raise ValueError(f"shard: expected (rank, world), got {shard!r}")
        world = check_int("shard world", shard[1], 1)
        rank = check_int("shard rank", shard[0], 0, world - 1)
        todo = [(a, b) for a, b in self.missing(model_id, block) if a // block % world == rank]
        self._register(model_id)
        with Progress(progress, sum(b - a for a, b in todo), model_id, "row") as bar:
            for start, stop in todo:
                blocks, rows, first = self._validate(start, compute(start, stop))
                if rows != stop - start:
                    raise ValueError(f"compute: expected {stop - start} rows for block [{start}, {stop}), got {rows} "
                                     f"in {first}")
                self._write_block(model_id, start, stop, blocks, overwrite=False)
                bar.update(stop - start)
                if callable(progress):
                    progress(start, stop)
        return todo

    def __repr__(self) -> str:
        arrays = ", ".join(f"{name}: {list(shape)} {dtype.name}" for name, (shape, dtype) in self.arrays.items())
        return f"FeatureStore({self.path!r}, n={self.n}, arrays={{{arrays}}}, models={self.models})"

    def _array_path(self, model_id: str, name: str) -> str:
        return os.path.join(self.path, "models", model_id, f"{name}.npy")

    def _update_complete(self, model_id: str, change: Callable[[list], list]) -> None:
        """Read-merge-write `model_id`'s completed ranges under the lock."""
        with _locked(self.path):
            manifest = _read_manifest(self.path)
            entry = manifest["models"][model_id]
            entry["complete"] = change(entry["complete"])
            _write_json(os.path.join(self.path, "manifest.json"), manifest)

    def _register(self, model_id: str) -> None:
        """Create `model_id`'s zero-filled arrays and its manifest entry, once across all processes."""
        if model_id in _read_manifest(self.path)["models"]:
            return
        with _locked(self.path):
            manifest = _read_manifest(self.path)
            if model_id in manifest["models"]:
                return
            os.makedirs(os.path.join(self.path, "models", model_id), exist_ok=True)
            for name, (shape, dtype) in self.arrays.items():
                _create_npy(self._array_path(model_id, name), (self.n, *shape), dtype)
            _fsync_dir(os.path.join(self.path, "models", model_id))
            manifest["models"][model_id] = {"complete": []}
            _write_json(os.path.join(self.path, "manifest.json"), manifest)

    def _data_offset(self, model_id: str, name: str) -> int:
        """Byte offset of row 0 in the array file, after checking its header against the manifest."""
        key = (model_id, name)
        if key not in self._offsets:
            path = self._array_path(model_id, name)
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                self._offsets[key] = f.tell()
            shape_, dtype_ = (self.n, *self.arrays[name][0]), self.arrays[name][1]
            if (shape, fortran, dtype) != (shape_, False, dtype_):
                raise ValueError(f"name: {path!r} holds {list(shape)} {dtype} (fortran order {fortran}), expected "
                                 f"{list(shape_)} {dtype_} in C order from the manifest")
        return self._offsets[key]

    def _validate(self, start: int, arrays) -> tuple[dict[str, np.ndarray], int, str]:
        """C-contiguous numpy copies or views of a block's arrays, checked against the store's specs; also the
        row count b and the label of the array it was taken from."""
        if not isinstance(arrays, Mapping) or set(arrays) != set(self.arrays):
            got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
            raise ValueError(f"arrays: expected a dict with keys {sorted(self.arrays)}, got {got}")
        out, rows = {}, None
        for name, (shape, dtype) in self.arrays.items():
            label, x = f"arrays[{name!r}]", arrays[name]
            if isinstance(x, torch.Tensor):
                expected = torch.from_numpy(np.empty(0, dtype)).dtype
                if x.dtype != expected:
                    raise ValueError(f"{label}: expected dtype {dtype.name} (from the store), got {x.dtype}")
                x = x.numpy(force=True)
            elif not isinstance(x, np.ndarray):
                raise TypeError(f"{label}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
            if x.dtype != dtype:
                raise ValueError(f"{label}: expected dtype {dtype.name} (from the store), got {x.dtype}")
            if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape:
                raise ValueError(f"{label}: expected shape {['b', *shape]} (trailing dims from the store), got "
                                 f"{list(x.shape)}")
            if rows is None:
                rows, first = x.shape[0], label
            elif x.shape[0] != rows:
                raise ValueError(f"{label}: expected b == {rows} rows (those of {first}), got {x.shape[0]}")
            if dtype.kind in "fc" and not np.isfinite(x).all():
                index = [int(i) for i in np.argwhere(~np.isfinite(x))[0]]
                raise ValueError(f"{label}: expected finite values, found {x[tuple(index)]} at {index} (row "
                                 f"{start + index[0]} of the store)")
            out[name] = np.ascontiguousarray(x)
        return out, rows, first
