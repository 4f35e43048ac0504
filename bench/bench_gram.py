"""Benchmark GramAccumulator.update against torch.matmul(X.T, X) accumulated, on synthetic Gaussian features.

Run from the repository root: `python bench/bench_gram.py [--device cpu|cuda] [--quick]`.
Writes bench/results/gram[-quick]-<slug>.md and .json. Both sides accumulate G over n rows in batches of b;
GFLOP/s count 2·n·k² (the full product) for both, so the ratio is the speed-up at equal output.
"""

import statistics
import sys
from pathlib import Path

import torch

import attrprims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    bench_parser, bench_setup, build_times, other_cpu_builds, time_cpu_many, time_cuda, under_cpu_build, write_results)

COLUMNS = ["n", "k", "b", "input", "ours_acc", "ours_ms", "ours_GFLOP/s", "torch_fp64_ms", "torch_fp32_ms",
           "x_vs_torch_fp64", "x_vs_torch_fp32", "rel_err", "torch_fp32_rel_err", "ours_ms by CPU build"]


def shapes(device, quick):
    if quick:
        return [(2048, 256, 512), (2048, 1024, 512)]
    if device == "cuda":
        return [(65536, 2048, 512), (65536, 2048, 4096), (65536, 4096, 4096), (262144, 8192, 8192)]
    return [(8192, 512, 512), (8192, 2048, 512), (8192, 2048, 4096)]


def rel_err(g, ref):
    return float((g.double() - ref).abs().max() / ref.abs().max())


def main():
    args = bench_parser(__doc__, "small shapes (a smoke test)").parse_args()
    device, info, slug = bench_setup(args)
    inputs = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    builds, best = other_cpu_builds(device), info["attrprims"]["cpu_kernels"]
    rows = []
    for n, k, b in shapes(args.device, args.quick):
        for dtype in inputs:
            x = torch.randn(n, k, device=device).to(dtype)
            ref = None
            fns, outs = {}, {}

            def ours(acc_dtype=torch.float64):
                acc = attrprims.GramAccumulator(k, dtype=acc_dtype, device=device)
                for s in range(0, n, b):
                    acc.update(x[s:s + b])
                outs["ours"] = acc

            def torch_sum(mm_dtype):
                g = torch.zeros(k, k, dtype=torch.float64, device=device)
                for s in range(0, n, b):
                    xb = x[s:s + b].to(mm_dtype)
                    g += (xb.T @ xb).double()
                outs[f"torch_{mm_dtype}"] = g

            fns["ours"] = ours
            fns.update({("ours", isa): under_cpu_build(isa, ours) for isa in builds})
            fns["fp64"] = lambda: torch_sum(torch.float64)
            fns["fp32"] = lambda: torch_sum(torch.float32)
            if device.type == "cuda":
                med = {name: time_cuda(fn, warmup=1, repeat=5) for name, fn in fns.items()}
            else:
                samples = time_cpu_many(fns, warmup=1, repeat=3, min_total_s=2.0)
                med = {name: statistics.median(s) for name, s in samples.items()}
            ref = outs["torch_torch.float64"]
            flops = 2 * n * k * k
            rows.append({
                "n": n, "k": k, "b": b, "input": str(dtype).removeprefix("torch."), "ours_acc": "float64",
                "ours_ms": med["ours"] * 1e3, "ours_GFLOP/s": flops / med["ours"] / 1e9,
                "torch_fp64_ms": med["fp64"] * 1e3, "torch_fp32_ms": med["fp32"] * 1e3,
                "x_vs_torch_fp64": med["fp64"] / med["ours"], "x_vs_torch_fp32": med["fp32"] / med["ours"],
                "rel_err": rel_err(outs["ours"].finalize(), ref),
                "torch_fp32_rel_err": rel_err(outs["torch_torch.float32"], ref),
                "ours_ms by CPU build": build_times(med, builds, "ours", best) if builds else None,
            })
            print(rows[-1], flush=True)
    notes = [
        "Data: synthetic standard-normal features, generated on the device.",
        "ours: GramAccumulator(k, float64).update per batch of b rows (one triangle, fp64 products and sums on the CPU; "
        "on CUDA fp64 FMAs for float32 input and tensor cores with fp32 slices of 256 rows for bfloat16).",
        "torch_fp64: G += X_b.double().T @ X_b.double() (equal accuracy to ours); torch_fp32: G += (X_b.T @ X_b).double() "
        "(fp32 sums within a batch: faster where fp32 GEMM is, less accurate, see torch_fp32_rel_err).",
        "rel_err: max |G - G_torch_fp64| / max |G_torch_fp64|. GFLOP/s count 2·n·k² for every column.",
        f"{args.threads} torch threads; medians of >= 3 round-robin calls (CPU) or 5 CUDA-event timings.",
        "ours_ms by CPU build: the same update with each build of the CPU kernels this machine runs "
        "(attrprims.set_cpu_kernels), timed in the same round-robin; ours_ms is the default (the best).",
    ]
    name = "gram-quick" if args.quick else "gram"
    write_results(name, slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
