"""Benchmark streaming ensemble combination (attrprims.ensemble.combine) against stacking every member.

Run from the repository root: `python bench/bench_ensemble.py [--quick]`. Writes
bench/results/ensemble[-quick]-<slug>.md and .json. Members are synthetic per-model score matrices produced
one at a time (as a method produces them), so the streaming side holds one member and the running total.
"""

import statistics
import sys
from pathlib import Path

import torch

from attrprims.ensemble import combine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_parser, bench_setup, peak_mib, time_cpu_many, write_results  # noqa: E402

COLUMNS = ["members", "shape", "stream_ms", "stack_ms", "speedup", "stream_peak_MiB", "stack_peak_MiB",
           "member_MiB", "max_abs_diff"]


def member(i, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(i))


def stream(count, shape):
    return combine(lambda i=i: member(i, shape) for i in range(count))


def stack(count, shape):
    return torch.stack([member(i, shape) for i in range(count)]).double().mean(0)


def _setup(variant, count, shape):
    return variant, count, shape


def _run(state):
    variant, count, shape = state
    (stream if variant == "stream" else stack)(count, shape)


def main():
    args = bench_parser(__doc__, "one small shape (a smoke test)", cuda=False).parse_args()
    _, info, slug = bench_setup(args)
    cases = [(4, (200, 5000))] if args.quick else [(10, (1000, 20000)), (50, (200, 20000))]
    rows = []
    for count, shape in cases:
        outs = {}
        fns = {"stream": lambda: outs.__setitem__("stream", stream(count, shape)),
               "stack": lambda: outs.__setitem__("stack", stack(count, shape))}
        med = {name: statistics.median(s) for name, s in time_cpu_many(fns, repeat=3, min_total_s=2.0).items()}
        rows.append({"members": count, "shape": "x".join(map(str, shape)), "stream_ms": med["stream"] * 1e3,
                     "stack_ms": med["stack"] * 1e3, "speedup": med["stack"] / med["stream"],
                     "stream_peak_MiB": peak_mib("cpu", _setup, _run, "stream", count, shape),
                     "stack_peak_MiB": peak_mib("cpu", _setup, _run, "stack", count, shape),
                     "member_MiB": shape[0] * shape[1] * 4 / 2**20,
                     "max_abs_diff": float((outs["stream"] - outs["stack"]).abs().max())})
        print(rows[-1], flush=True)
    notes = ["Data: synthetic N(0,1) float32 member matrices, generated one at a time (seeded per member).",
             "stream: attrprims.ensemble.combine over callables (float64 running total); "
             "stack: torch.stack(all members).double().mean(0).",
             "peak_MiB: VmHWM increase during one call in a fresh process; member_MiB: one member's size.",
             f"{args.threads} torch threads; medians of >= 3 round-robin calls."]
    write_results("ensemble-quick" if args.quick else "ensemble", slug, rows, COLUMNS, info,
                  notes)


if __name__ == "__main__":
    main()
