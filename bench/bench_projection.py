"""Benchmark attrprims.project against a GEMM with a pre-made P and, when installed, traker's projector.

Run from the repository root: `python bench/bench_projection.py [--device cpu|cuda] [--quick]`.
Writes bench/results/projection[-quick]-<slug>.md and .json (see bench/README.md).
"""

import math
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

import attrprims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    bench_parser, bench_setup, build_times, cpu_jiffies, free_bytes, other_cpu_builds, time_cpu_many, time_cuda,
    under_cpu_build, write_results)

SEED = 20240
KINDS = ("rademacher", "gaussian", "sjlt")
TRAKER_TYPE = {"rademacher": "rademacher", "gaussian": "normal"}  # traker has no sparse kind
CHECK_ROWS, CHECK_COLS = 2, 4096
COLUMNS = ["kind", "n", "p", "k", "dtype", "ours ms", "ours GFLOP/s", "matmul ms", "speed vs matmul", "traker ms",
           "speedup vs traker", "rel err (ref)", "ours ms by CPU build"]


def shapes(device, quick):
    """(dense (p, k), their ns, ours-only (n, p, k), half-precision (n, p, k)) for a device."""
    if device == "cpu":
        if quick:
            return [(2**16, 512), (2**16, 2048)], (16,), [], [(16, 2**16, 2048)]
        dense = [(2**16, 512), (2**16, 2048), (2**16, 8192), (2**20, 512), (2**20, 2048)]
        return dense, (16, 128), [(16, 2**22, 512), (16, 2**22, 2048)], [(128, 2**16, 2048)]
    if quick:
        return [(2**20, 2048)], (16, 1024), [(16, 2**24, 2048)], [(1024, 2**20, 2048)]
    dense = [(2**16, 512), (2**16, 2048), (2**16, 8192), (2**20, 512), (2**20, 2048), (2**20, 8192)]
    return dense, (16, 128, 1024), [(16, 2**24, 2048), (16, 2**24, 8192)], [(1024, 2**20, 2048)]


def pow2(v):
    """'2^e' for a power of two, else the number."""
    return f"2^{v.bit_length() - 1}" if v & (v - 1) == 0 else str(v)


def make_timer(device, repeat):
    """A function {name: fn} -> {name: samples in seconds}: round-robin on CPU, CUDA events on a GPU."""
    if device.type == "cuda":
        return lambda fns: {name: time_cuda(fn, warmup=3, repeat=repeat, samples=True) for name, fn in fns.items()}
    return lambda fns: time_cpu_many(fns, warmup=1, repeat=repeat)


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def reference_check(x, p, k, kind):
    """Relative error of ours on x[:2, :4096] against float64 x @ Projector(p, k, SEED, kind).matrix()."""
    xs = x[:CHECK_ROWS, :CHECK_COLS]
    ours = attrprims.project(xs, k, seed=SEED, kind=kind)
    P = attrprims.Projector(p, k, SEED, kind).matrix(slice(0, xs.shape[1]))
    return rel_err(ours, xs.double().cpu() @ P.double())


class Once:
    """Wraps a peer's call: the first exception is kept and later calls do nothing, so timing goes on."""

    def __init__(self, fn):
        self.fn, self.error = fn, None

    def __call__(self):
        if self.error is None:
            try:
                self.fn()
            except Exception as e:  # a peer failure is a result to report, not a crash of the benchmark
                self.error = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


class Peer:
    """traker's projector on the benchmark device, with per-call estimates used to skip slow shapes on CPU."""

    def __init__(self, device, max_s):
        self.device, self.max_s, self.measured, self.error = device, max_s, {}, None
        try:
            from trak.projectors import BasicProjector, ProjectionType
        except ImportError as e:
            self.error = f"not installed ({e.name})"
            return
        self.basic, self.ptype, self.cuda_projector = BasicProjector, ProjectionType, None
        if device.type == "cuda":
            try:
                import fast_jl  # noqa: F401
                from trak.projectors import CudaProjector
                self.cuda_projector = CudaProjector
            except ImportError:
                pass
        self.name = "CudaProjector (fast_jl)" if self.cuda_projector else f"BasicProjector on {device.type}"

    @staticmethod
    def work(p, k, block=100):
        """Entries of P that traker generates per call (whole blocks of `block` columns)."""
        return p * math.ceil(k / block) * block

    def estimate(self, n, p, k, ptype):
        """Estimated seconds of one call, scaled from the largest measured shape of this n and type."""
        done = [(self.work(p0, k0), t) for (n0, p0, k0, t0), t in self.measured.items() if (n0, t0) == (n, ptype)]
        if not done:
            return None
        w0, t = max(done)
        return t * self.work(p, k) / w0

    def prepare(self, x, k, kind):
        """(callable to time or None, text for the cell when None) for traker's kind matching `kind`."""
        if self.error:
            return None, self.error
        if kind not in TRAKER_TYPE:
            return None, "n/a (no sjlt)"
        n, p = x.shape
        ptype = TRAKER_TYPE[kind]
        est = self.estimate(n, p, k, ptype)
        if self.device.type == "cpu" and est is not None and est > self.max_s:
            return None, f"skipped (>{self.max_s:g} s est.: {est:.0f} s)"
        try:
            if self.cuda_projector is not None:
                proj = self.cuda_projector(grad_dim=p, proj_dim=k, seed=0, proj_type=self.ptype(ptype),
                                           device=self.device, max_batch_size=32)
            else:
                proj = self.basic(grad_dim=p, proj_dim=k, seed=0, proj_type=self.ptype(ptype), device=self.device,
                                  dtype=torch.float32)
        except Exception as e:
            return None, f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
        return Once(lambda: proj.project(x, model_id=0)), None

    def record(self, n, p, k, kind, seconds):
        """Remember a measured call for later estimates."""
        self.measured[(n, p, k, TRAKER_TYPE[kind])] = seconds


def main():
    ap = bench_parser(__doc__, "a few small shapes (a smoke test)")
    ap.add_argument("--repeat", type=int, default=None, help="minimum timed calls (default 3 on CPU, 20 on CUDA)")
    ap.add_argument("--peers", choices=("on", "off"), default="on", help="time traker's projector when installed")
    ap.add_argument("--peer-max-s", type=float, default=10.0,
                    help="CPU: skip a traker shape whose call is estimated (from a smaller shape) to take longer")
    args = ap.parse_args()
    device, info, slug = bench_setup(args)
    repeat = args.repeat or (20 if device.type == "cuda" else 3)
    timer = make_timer(device, repeat)
    peer = Peer(device, args.peer_max_s) if args.peers == "on" else None
    dense, ns, big, halves = shapes(args.device, args.quick)
    gen = torch.Generator(device=device).manual_seed(0)
    builds, best = other_cpu_builds(device), info["attrprims"]["cpu_kernels"]
    rows, checks, started, steal0 = [], [], time.perf_counter(), cpu_jiffies()[1:]

    def measure(x, k, kinds, dtype, P=None, x_mm=None, matmul_text=None, peer_on=True):
        """Time ours for `kinds`, the matmul x_mm @ P and traker in one round-robin; append one row per kind."""
        n, p = x.shape
        outs, fns, peer_cells = {}, {}, {}
        for kind in kinds:
            fns[kind] = lambda kind=kind: outs.__setitem__(kind, attrprims.project(x, k, seed=SEED, kind=kind))
            fns.update({(kind, isa): under_cpu_build(isa, fns[kind]) for isa in builds})
        if P is not None:
            fns["matmul"] = lambda: outs.__setitem__("matmul", torch.matmul(x_mm, P))
        for kind in kinds:
            if peer is None or not peer_on:
                peer_cells[kind] = "off" if peer is None else matmul_text[1]
                continue
            fn, peer_cells[kind] = peer.prepare(x, k, kind)
            if fn is not None:
                fns["traker " + kind] = fn
        samples = timer(fns)
        med = {name: statistics.median(s) for name, s in samples.items()}
        if P is not None and "rademacher" in kinds and dtype == "fp32":
            checks.append({"n": n, "p": p, "k": k, "rel_err_vs_matmul": rel_err(outs["rademacher"], outs["matmul"])})
        t_mm = med.get("matmul")
        for kind in kinds:
            t = med[kind]
            t_peer = None
            if "traker " + kind in fns:
                error = fns["traker " + kind].error
                if error:
                    peer_cells[kind] = error
                else:
                    t_peer = med["traker " + kind]
                    peer_cells[kind] = t_peer * 1e3
                    peer.record(n, p, k, kind, t_peer)
            err = reference_check(x, p, k, kind)
            gflops = 2 * n * p * k / t / 1e9
            mm_cell = t_mm * 1e3 if t_mm is not None else matmul_text[0]
            if t_mm is not None and dtype != "fp32":
                mm_cell = f"{t_mm * 1e3:.2f} (fp32 x)"
            row = {"kind": kind, "n": n, "p": pow2(p), "k": k, "dtype": dtype, "ours ms": t * 1e3,
                   "ours GFLOP/s": f"{gflops:.1f}" + (" (dense-eq.)" if kind == "sjlt" else ""),
                   "matmul ms": mm_cell, "speed vs matmul": f"{t_mm / t:.2f}x" if t_mm else "",
                   "traker ms": peer_cells[kind], "speedup vs traker": f"{t_peer / t:.1f}x" if t_peer else "",
                   "rel err (ref)": f"{err:.1e}" + ("" if err < 1e-4 else " FAIL"),
                   "ours ms by CPU build": build_times(med, builds, kind, best) if builds else None,
                   "p_int": p, "ours_s": t, "ours_min_max_s": [min(samples[kind]), max(samples[kind])],
                   "ours_calls": len(samples[kind]), "matmul_s": t_mm, "traker_s": t_peer, "ref_rel_err": err}
            rows.append(row)
            cells = [c if isinstance(c, str) else f"{c:.1f} ms" for c in (mm_cell, peer_cells[kind])]
            print(f"[{time.perf_counter() - started:4.0f} s] {kind:10s} n={n:<4d} p={pow2(p):4s} k={k:<4d} {dtype}: "
                  f"ours {t * 1e3:.1f} ms, matmul {cells[0]}, traker {cells[1]}, err {err:.1e}", flush=True)

    def randn(n, p):
        return torch.randn(n, p, generator=gen, device=device)

    # Dense shapes: ours, matmul with a pre-made P, traker, timed in turn.
    xs = {}
    for p, k in dense:
        if p not in xs:
            xs = {p: {n: randn(n, p) for n in ns}}
        need = 4 * p * k
        # attrprims' own rademacher P of the same seed: its product doubles as a full-size check of ours.
        P = attrprims.Projector(p, k, SEED, "rademacher").matrix(device=device) if need < 0.7 * free_bytes(
            device) else None
        for n in ns:
            measure(xs[p][n], k, KINDS, "fp32", P=P, x_mm=xs[p][n], matmul_text=(f"skipped (P: {need / 2**30:.3g} "
                                                                                 "GiB, too big)", None))
        del P
    xs = {}

    # Half-precision inputs against the fp32 GEMM of the same shape.
    for n, p, k in halves:
        x32 = randn(n, p)
        P = attrprims.Projector(p, k, SEED, "rademacher").matrix(device=device)
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            measure(x32.to(dtype), k, ("rademacher",), name, P=P, x_mm=x32, matmul_text=(None, "not run (fp32 rows)"),
                    peer_on=False)
        del x32, P

    # Ours only: P is not held.
    for n, p, k in big:
        measure(randn(n, p), k, KINDS, "fp32", matmul_text=(f"not run (P: {4 * p * k / 2**30:.3g} GiB)",
                                                            "ours-only row"), peer_on=False)

    elapsed = time.perf_counter() - started
    steal = [b - a for a, b in zip(steal0, cpu_jiffies()[1:])]
    worst = max((c["rel_err_vs_matmul"] for c in checks), default=None)
    if device.type == "cuda":
        timing = (f"CUDA events, median of >= {max(repeat, 20)} calls after 3 warmups, one function after the other; "
                  f"TF32 for matmul: {torch.backends.cuda.matmul.allow_tf32}")
    else:
        timing = (f"time.perf_counter, median of >= {repeat} calls (more until >= 1 s) after 1 warmup (a warmup "
                  "call of >= 1 s is kept as a sample); ours for each kind, matmul and traker of one (n, p, k) are "
                  "called round-robin, so that drifts in machine speed hit them alike")
    if peer is None or peer.error:
        peer_note = "traker: " + ("off (--peers off)" if peer is None else peer.error) + "."
    else:
        peer_note = (f"traker {version('traker')} {peer.name}: the whole .project(x, model_id=0) call is timed; it "
                     "regenerates its P in blocks of 100 columns on every call (normal for gaussian, rademacher for "
                     "rademacher, unscaled entries; no sparse kind); construction not timed.")
        if device.type == "cpu":
            peer_note += (f" Shapes whose call is estimated above {args.peer_max_s:g} s (linear in p·ceil(k/100), "
                          "from a measured smaller shape of the same n and type) are skipped.")
    notes = [
        f"Data: synthetic N(0,1) x (torch.randn, seed 0); projection seed {SEED}; output [n, k] float32.",
        f"Timing: {timing}; torch threads {torch.get_num_threads()} (attrprims uses the same count).",
        "ours GFLOP/s = 2·n·p·k / time for every kind; for sjlt it is a dense-equivalent rate (sjlt does "
        "2·n·p·s flops, s = 4), and so it is for rademacher on the CPU at k >= 256, which goes by sign tables: "
        "one table load and add per 8 coordinates of 8 examples, no multiplications (see "
        "src/cpp/projection_cpu_sign_tables_impl.h), so it can beat the GEMM ceiling below.",
        "matmul = torch.matmul(x, P) with a float32 P [p, k] made once outside the timing (attrprims' rademacher P: "
        "the GEMM ceiling for a stored matrix; the same time on the three kind rows of a shape); speed vs matmul = "
        "matmul time / ours time (> 1: ours faster). Half-precision rows: x fp16/bf16 for ours, fp32 x for matmul.",
        "ours ms by CPU build: the same call with each build of the CPU kernels this machine runs "
        "(attrprims.set_cpu_kernels), in the same round-robin; ours ms is the default (the best).",
        f"rel err (ref) = ||ours - ref|| / ||ref|| on x[:{CHECK_ROWS}, :{CHECK_COLS}], ref = x.double() @ "
        "Projector(p, k, seed, kind).matrix().double() (FAIL above 1e-4).",
        f"Full-size check: ours (rademacher) against the matmul output on all {len(checks)} dense (n, p, k): "
        f"largest relative error {worst:.1e}." if worst is not None else "Full-size check: no matmul was run.",
        peer_note,
        f"Total wall time {elapsed / 60:.1f} min; CPU steal (time taken by the VM host) "
        f"{100 * steal[0] / max(steal[1], 1):.1f}% of CPU time.",
    ]
    name = "projection-quick" if args.quick else "projection"
    write_results(name, slug, rows, COLUMNS, info, notes)
    bad = [r for r in rows if r["ref_rel_err"] >= 1e-4] + [c for c in checks if c["rel_err_vs_matmul"] >= 1e-4]
    if bad:
        sys.exit(f"reference check failed on {len(bad)} row(s): {bad}")


if __name__ == "__main__":
    main()
