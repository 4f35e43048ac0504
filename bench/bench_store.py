"""Benchmark FeatureStore.fill (atomic, resumable blocks) against one np.save of the whole array, and reads.

Run from the repository root: `python bench/bench_store.py [--quick] [--dir DIR]`. Writes
bench/results/store[-quick]-<slug>.md and .json. Synthetic float32 features; every write path ends with
fsync, so both sides pay for durability.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attrprims import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_parser, bench_setup, write_results  # noqa: E402

COLUMNS = ["n", "k", "block", "MiB", "fill_s", "fill_MiB/s", "np_save_s", "np_save_MiB/s", "fill_vs_np_save",
           "resume_check_ms", "read_MiB/s"]


def np_save(path, data):
    with open(path, "wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())


def timed(fn, repeat):
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main():
    ap = bench_parser(__doc__, "one small case (a smoke test)", cuda=False)
    ap.add_argument("--dir", default=None, help="where the stores are written (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _, info, slug = bench_setup(args)
    cases = [(20000, 128, 1024)] if args.quick else [(100000, 256, 1024), (100000, 256, 8192), (20000, 2048, 1024)]
    root = tempfile.mkdtemp(dir=args.dir, prefix="bench-store-")
    rows = []
    try:
        for n, k, block in cases:
            data = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
            q = torch.rand(n, generator=torch.Generator().manual_seed(1))
            counter = [0]

            def fill():
                counter[0] += 1
                path = os.path.join(root, f"store-{counter[0]}")
                store = FeatureStore.open(path, n=n, arrays={"features": ([k], torch.float32),
                                                              "out_to_loss": ([], torch.float32)})
                store.fill("model-0", lambda a, b: {"features": data[a:b], "out_to_loss": q[a:b]}, block=block,
                           progress=False)
                return store

            t_fill = timed(fill, args.repeat)
            t_np = timed(lambda: np_save(os.path.join(root, "plain.npy"), data.numpy()), args.repeat)
            store = fill()
            t_check = timed(lambda: FeatureStore(store.path).missing("model-0", block), 20)
            t_read = timed(lambda: store.read("model-0", "features").sum(), args.repeat)
            assert torch.equal(store.read("model-0", "features"), data)
            mib = (data.numel() + q.numel()) * 4 / 2**20
            rows.append({"n": n, "k": k, "block": block, "MiB": mib, "fill_s": t_fill, "fill_MiB/s": mib / t_fill,
                         "np_save_s": t_np, "np_save_MiB/s": data.numel() * 4 / 2**20 / t_np,
                         "fill_vs_np_save": t_np / t_fill, "resume_check_ms": t_check * 1e3,
                         "read_MiB/s": data.numel() * 4 / 2**20 / t_read})
            print(rows[-1], flush=True)
            for entry in Path(root).iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes = ["Data: synthetic N(0,1) float32 features [n, k] and an out-to-loss column [n].",
             "fill: FeatureStore.open + fill of one model in blocks (pwrite + fsync per array and block, then an atomic "
             "manifest update under a file lock). np_save: np.save of the features alone + fsync (no resumability).",
             "resume_check: reopen the store and list its missing blocks (what a restarted job does first).",
             "read: store.read(...).sum() over the memmap (page cache warm).",
             f"Filesystem of {args.dir or tempfile.gettempdir()}; medians of {args.repeat} runs."]
    write_results("store-quick" if args.quick else "store", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
