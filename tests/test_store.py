"""attrprims.store: round trips into real .npy files, the manifest, resume = uninterrupted (in process and after
SIGKILL), concurrent writers on disjoint blocks, configuration mismatches, partial reads, errors."""

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attrprims
from attrprims import FactoredProjector, Projector, param_layout
from attrprims.store import FeatureStore
from strategies import splits

K = 6
ARRAYS = {"features": ([K], torch.float32), "out_to_loss": ([], torch.float32)}


def rows(start, stop):
    """Deterministic per-row data for rows start..stop (any blocking gives the same rows)."""
    i = torch.arange(start, stop, dtype=torch.float64)
    features = torch.sin(i[:, None] * 0.37 + torch.arange(K, dtype=torch.float64)) * (1 + i[:, None])
    return {"features": features.float(), "out_to_loss": torch.cos(i).float()}


def new_store(path, n, **config):
    return FeatureStore.open(path, **{"n": n, "arrays": ARRAYS, "projector": Projector(50, K, seed=1), **config})


def grid(n, block):
    return [(a, min(a + block, n)) for a in range(0, n, block)]


@pytest.mark.parametrize("n", [0, 1, 7, 33])
@pytest.mark.parametrize("block", [1, 5, 64])
def test_fill_round_trip_and_manifest(tmp_path, n, block):
    layout = param_layout(torch.nn.Linear(7, 7))
    projector = Projector(layout.p, K, seed=3, kind="sjlt")
    store = FeatureStore.open(tmp_path, n=n, arrays=ARRAYS, projector=projector, layout=layout, output="margin")
    assert store.models == [] and store.missing("m0", block) == grid(n, block) and store.is_complete("m0") == (n == 0)
    assert store.fill("m0", rows, block=block) == grid(n, block)
    assert store.is_complete("m0") and store.missing("m0", block) == [] and store.models == ["m0"]
    assert store.completed("m0") == ([(0, n)] if n else [])
    expected = rows(0, n)
    for name in ARRAYS:
        got = store.read("m0", name)
        assert got.dtype == torch.float32 and torch.equal(got, expected[name])
        on_disk = np.load(tmp_path / "models" / "m0" / f"{name}.npy", mmap_mode="r")
        assert on_disk.shape == (n, *ARRAYS[name][0]) and np.array_equal(on_disk, expected[name].numpy())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == attrprims.__version__ and manifest["n"] == n
    assert manifest["config"] == {"projector": projector.config(), "layout": layout.config(), "output": "margin",
                                  "extra": None}
    assert manifest["arrays"] == {"features": {"shape": [K], "dtype": "float32"},
                                  "out_to_loss": {"shape": [], "dtype": "float32"}}
    assert manifest["models"] == {"m0": {"complete": [[0, n]] if n else []}}
    assert sorted(os.listdir(tmp_path)) == [".lock", "manifest.json", "models"]  # no temp files left


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_dtypes_and_numpy_inputs(tmp_path, dtype):
    store = FeatureStore.open(tmp_path, n=9, arrays={"x": ([2, 3], dtype)})
    data = (torch.arange(9 * 6).reshape(9, 2, 3) % 5).to(dtype)
    store.write("a", 0, {"x": data[:4]})
    store.write("a", 4, {"x": data[4:].numpy()})
    assert store.read("a", "x").dtype == dtype and torch.equal(store.read("a", "x"), data)


def test_tensors_from_any_device_and_views(tmp_path, device):
    store = new_store(tmp_path, 8)
    big = rows(0, 8)
    strided = {"features": torch.cat([big["features"], big["features"]], 1)[:, :K].to(device),
               "out_to_loss": big["out_to_loss"].to(device)}
    assert not strided["features"].is_contiguous()
    store.write("m0", 0, strided)
    assert torch.equal(store.read("m0", "features"), big["features"])


def test_models_are_independent_and_reopen_resumes(tmp_path):
    store = new_store(tmp_path, 20)
    store.write("ckpt-1", 5, rows(5, 12))
    store.fill("ckpt.2", rows, block=6)
    again = new_store(tmp_path, 20)
    plain = FeatureStore(tmp_path)
    assert plain.config == again.config and plain.arrays == {"features": ((K,), np.dtype("float32")),
                                                             "out_to_loss": ((), np.dtype("float32"))}
    assert again.models == ["ckpt-1", "ckpt.2"] and again.is_complete("ckpt.2") and not again.is_complete("ckpt-1")
    assert again.completed("ckpt-1") == [(5, 12)] and again.missing("ckpt-1", 8) == [(0, 5), (12, 16), (16, 20)]
    assert plain.fill("ckpt-1", rows, block=8) == [(0, 5), (12, 16), (16, 20)]
    for model in again.models:
        assert torch.equal(again.read(model, "features"), rows(0, 20)["features"])
    assert "ckpt-1" in repr(again) and "features: [6] float32" in repr(again)


class Interrupt(Exception):
    pass


@given(n=st.integers(0, 40), block=st.integers(1, 9), budgets=st.lists(st.integers(0, 6), max_size=3))
def test_interrupted_fills_resume_to_the_uninterrupted_result(n, block, budgets):
    computed = []
    with tempfile.TemporaryDirectory() as path:
        store = new_store(path, n)
        for budget in budgets:
            calls = []

            def compute(start, stop):
                if len(calls) == budget:
                    raise Interrupt
                calls.append(start)
                computed.append((start, stop))
                return rows(start, stop)
            with contextlib.suppress(Interrupt):
                store.fill("m0", compute, block=block)
            store = new_store(path, n)
        store.fill("m0", lambda a, b: computed.append((a, b)) or rows(a, b), block=block)
        assert computed == grid(n, block)  # the uninterrupted run's blocks, each once
        assert torch.equal(store.read("m0", "features"), rows(0, n)["features"])


@given(data=st.data(), n=st.integers(0, 60), block=st.integers(1, 16))
def test_missing_is_the_complement_on_the_grid(data, n, block):
    cuts = data.draw(splits(n))
    written = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    with tempfile.TemporaryDirectory() as path:
        store = new_store(path, n)
        for a, b in written:
            store.write("m0", a, rows(a, b))
        todo = store.missing("m0", block)
    covered = np.zeros(n, dtype=int)
    for a, b in written:
        covered[a:b] += 1
    for a, b in todo:
        assert a < b and a // block == (b - 1) // block  # one grid cell each
        covered[a:b] += 1
    assert (covered == 1).all() and todo == sorted(todo)


def test_rows_written_but_not_marked_are_recomputed(tmp_path, monkeypatch):
    store = new_store(tmp_path, 12)
    store.write("m0", 0, rows(0, 4))
    marks = FeatureStore._update_complete

    def killed_before_marking(self, model_id, change):
        raise Interrupt

    monkeypatch.setattr(FeatureStore, "_update_complete", killed_before_marking)
    garbage = {name: torch.full_like(t, 99) for name, t in rows(4, 8).items()}
    with pytest.raises(Interrupt):
        store.write("m0", 4, garbage)
    monkeypatch.setattr(FeatureStore, "_update_complete", marks)
    assert store.read("m0", "out_to_loss", partial=True)[4].item() == 99 and store.completed("m0") == [(0, 4)]
    assert new_store(tmp_path, 12).fill("m0", rows, block=4) == [(4, 8), (8, 12)]
    assert torch.equal(store.read("m0", "out_to_loss"), rows(0, 12)["out_to_loss"])


def test_overlap_and_overwrite(tmp_path):
    store = new_store(tmp_path, 10)
    store.write("m0", 2, rows(2, 6))
    with pytest.raises(ValueError, match=r"start: rows \[5, 7\) of model 'm0' overlap completed rows \[\(2, 6\)\]"):
        store.write("m0", 5, rows(5, 7))
    twice = {name: t * 2 for name, t in rows(3, 8).items()}
    store.write("m0", 3, twice, overwrite=True)
    assert store.completed("m0") == [(2, 8)]
    got = store.read("m0", "features", partial=True)
    assert torch.equal(got[2:3], rows(2, 3)["features"]) and torch.equal(got[3:8], twice["features"])
    store.write("m0", 10, {name: t[:0] for name, t in rows(0, 1).items()})  # empty block: nothing to do
    assert store.completed("m0") == [(2, 8)]


def test_partial_read(tmp_path):
    store = new_store(tmp_path, 10)
    store.write("m0", 3, rows(3, 5))
    with pytest.raises(ValueError, match=r"model_id: 'm0' is incomplete \(rows \[\(0, 3\), \(5, 10\)\]"):
        store.read("m0", "features")
    got = store.read("m0", "features", partial=True)
    assert torch.equal(got[3:5], rows(3, 5)["features"]) and not got[:3].any() and not got[5:].any()
    got[0] = 1.0  # copy-on-write: the file is untouched
    assert not store.read("m0", "features", partial=True)[0].any()


def test_progress_callback_and_bar(tmp_path, monkeypatch):
    store = new_store(tmp_path, 10)
    seen = []
    store.fill("m0", rows, block=4, progress=lambda a, b: seen.append((a, b, store.completed("m0")[-1][1])))
    assert seen == [(0, 4, 4), (4, 8, 8), (8, 10, 10)]  # each reported once marked complete

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    store.fill("m1", rows, block=4)
    assert "10/10" in sys.stderr.getvalue()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar, no error
    monkeypatch.setattr(sys, "stderr", Terminal())
    store.fill("m2", rows, block=4)
    assert sys.stderr.getvalue() == "" and store.is_complete("m2")


@pytest.mark.parametrize("change, message", [
    ({"n": 11}, "n: store has 10, got 11"),
    ({"arrays": {**ARRAYS, "features": ([K + 1], torch.float32)}},
     rf"arrays.features.shape: store has \[{K}\], got \[{K + 1}\]"),
    ({"arrays": {**ARRAYS, "features": ([K], torch.float16)}},
     "arrays.features.dtype: store has 'float32', got 'float16'"),
    ({"arrays": {**ARRAYS, "extra": ([], torch.int64)}}, "arrays.extra: store has None, got"),
    ({"projector": Projector(50, K, seed=2)}, "config.projector.seed: store has 1, got 2"),
    ({"projector": Projector(50, K, seed=1, kind="gaussian")},
     "config.projector.kind: store has 'rademacher', got 'gaussian'"),
    ({"projector": FactoredProjector(50, 2, 3, seed=1)},
     "config.projector.factor_kind: store has None, got 'rademacher'"),
    ({"layout": param_layout(torch.nn.Linear(9, 5))}, "config.layout: store has None, got"),
    ({"output": "loss"}, "config.output: store has None, got 'loss'"),
    ({"extra": {"task": "clip"}}, "config.extra: store has None, got {'task': 'clip'}"),
])
def test_configuration_mismatch(tmp_path, change, message):
    store = new_store(tmp_path, 10)
    store.write("m0", 0, rows(0, 2))
    with pytest.raises(ValueError, match=message):
        new_store(tmp_path, **{"n": 10, **change})
    assert new_store(tmp_path, 10).completed("m0") == [(0, 2)]


def test_layout_digest_mismatch(tmp_path):
    a, b = param_layout(torch.nn.Linear(6, 7)), param_layout(torch.nn.Sequential(torch.nn.Linear(6, 7)))
    assert a.p == b.p
    FeatureStore.open(tmp_path, n=3, arrays=ARRAYS, layout=a, output="margin")
    with pytest.raises(ValueError, match=f"config.layout.digest: store has '{a.digest()}', got '{b.digest()}'"):
        FeatureStore.open(tmp_path, n=3, arrays=ARRAYS, layout=b, output="margin")


def test_open_errors(tmp_path):
    with pytest.raises(ValueError, match="n: expected an integer >= 0"):
        FeatureStore.open(tmp_path, n=-1, arrays=ARRAYS)
    with pytest.raises(ValueError, match="arrays: expected a non-empty dict"):
        FeatureStore.open(tmp_path, n=1, arrays={})
    with pytest.raises(ValueError, match="arrays: expected a string of letters"):
        FeatureStore.open(tmp_path, n=1, arrays={"../x": ([], "float32")})
    with pytest.raises(ValueError, match=r"arrays\['x'\]: expected a dtype that .npy and torch .* got torch.bfloat16"):
        FeatureStore.open(tmp_path, n=1, arrays={"x": ([], torch.bfloat16)})
    for bad in (object, ">f4", "uint32", np.longdouble):
        with pytest.raises(ValueError, match=r"arrays\['x'\]: expected a dtype that .npy and torch share"):
            FeatureStore.open(tmp_path, n=1, arrays={"x": ([], bad)})
    with pytest.raises(ValueError, match=r"arrays\['x'\]: expected \(trailing shape, dtype\)"):
        FeatureStore.open(tmp_path, n=1, arrays={"x": "float32"})
    with pytest.raises(ValueError, match=r"arrays\['x'\] shape: expected an integer >= 0, got -2"):
        FeatureStore.open(tmp_path, n=1, arrays={"x": ([-2], "float32")})
    with pytest.raises(ValueError, match="output: expected the output function's name"):
        FeatureStore.open(tmp_path, n=1, arrays=ARRAYS, output="")
    with pytest.raises(ValueError, match="extra: expected JSON-serialisable"):
        FeatureStore.open(tmp_path, n=1, arrays=ARRAYS, extra={"f": float("nan")})
    with pytest.raises(ValueError, match=r"layout: expected p == 50 \(from projector\), got p == 56"):
        FeatureStore.open(tmp_path, n=1, arrays=ARRAYS, projector=Projector(50, 4), layout=param_layout(
            torch.nn.Linear(7, 7)))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"path: expected an empty directory or a feature store, .*'notes.txt'"):
        FeatureStore.open(tmp_path, n=1, arrays=ARRAYS)
    with pytest.raises(ValueError, match="path: expected a feature store"):
        FeatureStore(tmp_path)


def test_write_read_fill_errors(tmp_path):
    store = new_store(tmp_path, 10)
    good = rows(0, 3)
    with pytest.raises(ValueError, match="model_id: expected a string of letters"):
        store.write("a/b", 0, good)
    with pytest.raises(ValueError, match="model_id: expected a string of letters"):
        store.write(".hidden", 0, good)
    with pytest.raises(ValueError, match=r"start: expected an integer in \[0, 10\], got 11"):
        store.write("m0", 11, good)
    with pytest.raises(ValueError, match=r"start: expected start \+ b <= n == 10, got start 8 with b == 3"):
        store.write("m0", 8, good)
    with pytest.raises(ValueError, match=r"arrays: expected a dict with keys \['features', 'out_to_loss'\], "
                                         r"got \['features'\]"):
        store.write("m0", 0, {"features": good["features"]})
    with pytest.raises(ValueError, match=r"arrays\['features'\]: expected dtype float32 \(from the store\), got "
                                         r"torch.float64"):
        store.write("m0", 0, {**good, "features": good["features"].double()})
    with pytest.raises(ValueError, match=r"arrays\['features'\]: expected dtype float32 \(from the store\), got "
                                         r"float64"):
        store.write("m0", 0, {**good, "features": good["features"].double().numpy()})
    with pytest.raises(ValueError, match=r"arrays\['features'\]: expected shape \['b', 6\] .* got \[3, 5\]"):
        store.write("m0", 0, {**good, "features": good["features"][:, :5]})
    with pytest.raises(ValueError, match=r"arrays\['out_to_loss'\]: expected b == 3 rows \(those of "
                                         r"arrays\['features'\]\), got 2"):
        store.write("m0", 0, {**good, "out_to_loss": good["out_to_loss"][:2]})
    bad = good["features"].clone()
    bad[2, 4] = float("inf")
    with pytest.raises(ValueError, match=r"arrays\['features'\]: expected finite values, found inf at \[2, 4\] "
                                         r"\(row 7 of the store\)"):
        store.write("m0", 5, {**good, "features": bad})
    with pytest.raises(TypeError, match=r"arrays\['features'\]: expected a torch.Tensor or numpy array, got list"):
        store.write("m0", 0, {**good, "features": good["features"].tolist()})
    assert store.models == []  # nothing invalid registered a model
    store.write("m0", 0, good)
    with pytest.raises(ValueError, match=r"model_id: expected one of \['m0'\] \(the store's models\), got 'm1'"):
        store.read("m1", "features")
    with pytest.raises(ValueError, match=r"name: expected one of \['features', 'out_to_loss'\], got 'grads'"):
        store.read("m0", "grads")
    with pytest.raises(ValueError, match="block: expected an integer >= 1, got 0"):
        store.missing("m0", 0)
    with pytest.raises(ValueError, match="shard rank: expected an integer in \\[0, 1\\], got 2"):
        store.fill("m0", rows, block=2, shard=(2, 2))
    with pytest.raises(ValueError, match="shard: expected \\(rank, world\\)"):
        store.fill("m0", rows, block=2, shard=3)
    with pytest.raises(TypeError, match="progress: expected True, False or a callable"):
        store.fill("m0", rows, block=2, progress="yes")
    with pytest.raises(ValueError, match=r"compute: expected 1 rows for block \[3, 4\), got 2 in arrays\['features'\]"):
        store.fill("m0", lambda a, b: rows(a, b + 1), block=2)
    assert store.completed("m0") == [(0, 3)]


# Run as a script: featurizes the synthetic job below into a store, logging "compute <start>" before computing a
# block and "done <start>" once it is marked complete; with a stage ("write": after the first array's data is on
# disk, "mark": after all of it, before marking) and a block index, it logs "stalled" there and hangs, waiting
# for SIGKILL. Imported: the same job, for the uninterrupted reference.
JOB = """
import os, sys, time
import torch
import attrprims.store
from attrprims import Projector
from attrprims.store import FeatureStore

N, P, BLOCK = 96, 300, 4
PROJECTOR = Projector(P, 16, seed=7)
ARRAYS = {"features": ([16], torch.float32), "out_to_loss": ([], torch.float32)}
GRADS = torch.randn(N, P, generator=torch.Generator().manual_seed(1234))


def compute(start, stop):
    x = GRADS[start:stop]
    return {"features": PROJECTOR(x), "out_to_loss": torch.sigmoid(x[:, 0])}


def open_store(path):
    return FeatureStore.open(path, n=N, arrays=ARRAYS, projector=PROJECTOR, output="margin")


def log(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    path, log_path, rank, world, stage, stall_block = sys.argv[1:]
    rank, world, stall_block, current = int(rank), int(world), int(stall_block), [None]

    def stall(where):
        if where == stage and current[0] // BLOCK == stall_block:
            log(log_path, "stalled")
            time.sleep(600)

    pwrite, mark = attrprims.store._pwrite_all, FeatureStore._update_complete
    attrprims.store._pwrite_all = lambda *args: (pwrite(*args), stall("write"))
    FeatureStore._update_complete = lambda *args: (stall("mark"), mark(*args))
    store = open_store(path)
    log(log_path, "ready")
    while not os.path.exists(path + ".go"):
        time.sleep(0.005)

    def logged(start, stop):
        log(log_path, f"compute {start}")
        current[0] = start
        time.sleep(0.005)
        return compute(start, stop)

    store.fill("m0", logged, block=BLOCK, shard=(rank, world), progress=lambda a, b: log(log_path, f"done {a}"))
"""


@pytest.fixture
def job(tmp_path):
    script = tmp_path / "featurize_job.py"
    script.write_text(JOB)
    spec = importlib.util.spec_from_file_location("featurize_job", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.script = str(script)
    return module


def start_job(job, path, log, rank=0, world=1, stage="none", stall_block=-1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(f"{log}.err", "w") as errors:
        return subprocess.Popen([sys.executable, job.script, str(path), str(log), str(rank), str(world), stage,
                                 str(stall_block)], env=env, stderr=errors)


def log_lines(log):
    return log.read_text().split("\n")[:-1] if log.exists() else []


def wait_for(condition, procs, what):
    deadline = time.monotonic() + 120
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a job exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def computed_starts(lines):
    return [int(line.split()[1]) for line in lines if line.startswith("compute ")]


def assert_bit_identical(store, reference):
    for name in store.arrays:
        a, b = store.read("m0", name).numpy(), reference.read("m0", name).numpy()
        assert a.tobytes() == b.tobytes(), name


def test_sigkill_then_resume_is_bit_identical(tmp_path, job):
    reference = job.open_store(tmp_path / "uninterrupted")
    reference.fill("m0", job.compute, block=job.BLOCK, progress=False)
    path = tmp_path / "store"
    store = job.open_store(path)
    (tmp_path / "store.go").touch()
    # Killed with half a block's arrays on disk, then with all of them but not marked, then run to the end.
    for run, (stage, stall_block) in enumerate([("write", 3), ("mark", 6), ("none", -1)]):
        done_before = store.completed("m0")
        todo = [a for a, _ in store.missing("m0", job.BLOCK)]
        log = tmp_path / f"run{run}.log"
        proc = start_job(job, path, log, stage=stage, stall_block=stall_block)
        if stage == "none":
            assert proc.wait(timeout=120) == 0, (tmp_path / f"{log.name}.err").read_text()
        else:
            wait_for(lambda: "stalled" in log_lines(log), [proc], f"the {stage} stage of block {stall_block}")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
        computed = computed_starts(log_lines(log))
        assert computed == todo[:len(computed)]  # only blocks not complete, in order, each once
        assert not any(start <= a < stop for a in computed for start, stop in done_before)
        if stage != "none":
            assert computed[-1] == stall_block * job.BLOCK and store.completed("m0") == [(0, computed[-1])]
            rows_in_flight = slice(computed[-1], computed[-1] + job.BLOCK)
            written = [name for name in store.arrays if store.read("m0", name, partial=True)[rows_in_flight].any()]
            assert written == (["features"] if stage == "write" else ["features", "out_to_loss"])
    assert store.is_complete("m0")
    assert_bit_identical(store, reference)


def test_concurrent_writers_on_disjoint_blocks(tmp_path, job):
    path = tmp_path / "store"
    logs = [tmp_path / f"rank{r}.log" for r in range(3)]
    procs = [start_job(job, path, logs[r], rank=r, world=3) for r in (1, 2)]
    wait_for(lambda: all(log_lines(logs[r])[:1] == ["ready"] for r in (1, 2)), procs, "the writers to start")
    (tmp_path / "store.go").touch()  # all three (two jobs and this process) register m0 and fill at once
    job.open_store(path).fill("m0", lambda a, b: job.log(logs[0], f"compute {a}") or job.compute(a, b),
                              block=job.BLOCK, shard=(0, 3), progress=False)
    for proc, log in zip(procs, logs[1:]):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"{log.name}.err").read_text()
    starts = [computed_starts(log_lines(log)) for log in logs]
    for r in range(3):
        assert starts[r] == list(range(r * job.BLOCK, job.N, 3 * job.BLOCK))
    store = job.open_store(path)
    assert store.is_complete("m0") and store.completed("m0") == [(0, job.N)]
    reference = job.open_store(tmp_path / "serial")
    reference.fill("m0", job.compute, block=job.BLOCK, progress=False)
    assert_bit_identical(store, reference)
    assert sorted(os.listdir(path)) == [".lock", "manifest.json", "models"]
