"""Benchmark attrprims.project against a GEMM with a pre-made P and, when installed, traker's projector.

Run from the repository root: `python bench/bench_projection.py [--device cpu|cuda] [--quick]`.
Writes bench/results/projection[-quick]-<slug>.md and .json (see bench/README.md).
"""

import argparse
import math
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

import attrprims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, time_cpu, time_cuda, write_results  # noqa: E402

SEED = 20240
KINDS = ("rademacher", "gaussian", "sjlt")
TRAKER_TYPE = {"rademacher": "rademacher", "gaussian": "normal"}  # traker has no sparse kind
CHECK_ROWS, CHECK_COLS = 2, 4096
COLUMNS = ["kind", "n", "p", "k", "dtype", "ours ms", "ours GFLOP/s", "matmul ms", "speed vs matmul", "traker ms",
           "speedup vs traker", "rel err (ref)"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def shapes(device, quick):
    """(dense shapes, ns, ours-only shapes, half-precision shapes) for a device: lists of (n, p, k)."""
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


def gib(nbytes):
    """Bytes as a short GiB string."""
    return f"{nbytes / 2**30:.3g} GiB"


def free_bytes(device):
    """Bytes that can still be allocated on `device` (MemAvailable on CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_steal_jiffies():
    """(steal, total) jiffies of all CPUs from /proc/stat (a VM's time taken by the host); (0, 0) elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def make_timer(device, repeat):
    """fn -> median seconds, with the timer matching the device."""
    if device.type == "cuda":
        return lambda fn: time_cuda(fn, warmup=3, repeat=repeat)
    return lambda fn: time_cpu(fn, warmup=1, repeat=repeat)


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


class Peer:
    """traker's projector on the benchmark device, with per-call estimates used to skip slow shapes."""

    def __init__(self, device, max_s):
        self.device, self.max_s, self.measured = device, max_s, {}
        self.error = None
        try:
            from trak.projectors import BasicProjector, ProjectionType
        except ImportError as e:
            self.error = f"not installed ({e.name})"
            return
        self.basic, self.ptype = BasicProjector, ProjectionType
        self.cuda_projector = None
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
        """Entries of P traker generates per call (whole blocks of `block` columns)."""
        return p * math.ceil(k / block) * block

    def estimate(self, n, p, k, ptype):
        """Estimated seconds of one call, scaled from the largest measured shape of this n and type."""
        done = [(self.work(p0, k0), t) for (n0, p0, k0, t0), t in self.measured.items() if (n0, t0) == (n, ptype)]
        if not done:
            return None
        w0, t = max(done)
        return t * self.work(p, k) / w0

    def make(self, p, k, ptype):
        """A traker projector of P [p, k] (seed 0, float32)."""
        if self.cuda_projector is not None:
            return self.cuda_projector(grad_dim=p, proj_dim=k, seed=0, proj_type=self.ptype(ptype),
                                       device=self.device, max_batch_size=32)
        return self.basic(grad_dim=p, proj_dim=k, seed=0, proj_type=self.ptype(ptype), device=self.device,
                          dtype=torch.float32)

    def time(self, timer, x, k, kind):
        """(display text, seconds or None) for one projection of x by traker's matching kind."""
        if self.error:
            return self.error, None
        if kind not in TRAKER_TYPE:
            return "n/a (no sjlt)", None
        n, p = x.shape
        ptype = TRAKER_TYPE[kind]
        est = self.estimate(n, p, k, ptype)
        if self.device.type == "cpu" and est is not None and est > self.max_s:
            return f"skipped (>{self.max_s:g} s est.: {est:.0f} s)", None
        try:
            proj = self.make(p, k, ptype)
            t = timer(lambda: proj.project(x, model_id=0))
        except Exception as e:  # a peer failure is a result to report, not a crash of the benchmark
            return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}", None
        finally:
            proj = None
        self.measured[(n, p, k, ptype)] = t
        return t * 1e3, t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="a few small shapes (a smoke test)")
    ap.add_argument("--repeat", type=int, default=None, help="minimum timed calls (default 3 on CPU, 20 on CUDA)")
    ap.add_argument("--peers", choices=("on", "off"), default="on", help="time traker's projector when installed")
    ap.add_argument("--peer-max-s", type=float, default=10.0,
                    help="CPU: skip a traker shape whose call is estimated (from a smaller shape) to take longer")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (ours and torch share it)")
    ap.add_argument("--slug", default=None, help="device slug in the result file name")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        status = attrprims.cuda_available()
        if not status:
            sys.exit(f"--device cuda: {status.reason}")
        device = torch.device("cuda", torch.cuda.current_device())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeat = args.repeat or (20 if device.type == "cuda" else 3)
    timer = make_timer(device, repeat)
    peer = Peer(device, args.peer_max_s) if args.peers == "on" else None
    dense, ns, big, halves = shapes(args.device, args.quick)
    info = machine_info()
    slug = args.slug or ("cpu-epyc-zen1-2c" if device.type == "cpu" else
                         "cuda-" + info["gpu"].lower().replace("nvidia ", "").replace(" ", "-"))
    gen = torch.Generator(device=device).manual_seed(0)
    rows, checks, started, steal0 = [], [], time.perf_counter(), cpu_steal_jiffies()

    def ours_row(x, k, kind, dtype, matmul, peer_cell):
        n, p = x.shape
        t = timer(lambda: attrprims.project(x, k, seed=SEED, kind=kind))
        mm_text, mm_s = matmul
        gflops = 2 * n * p * k / t / 1e9
        err = reference_check(x, p, k, kind)
        row = {"kind": kind, "n": n, "p": pow2(p), "k": k, "dtype": dtype, "ours ms": t * 1e3,
               "ours GFLOP/s": f"{gflops:.1f}" + (" (dense-eq.)" if kind == "sjlt" else ""),
               "matmul ms": mm_text, "speed vs matmul": f"{mm_s / t:.2f}x" if mm_s else "",
               "traker ms": peer_cell[0],
               "speedup vs traker": f"{peer_cell[1] / t:.1f}x" if peer_cell[1] else "",
               "rel err (ref)": f"{err:.1e}" + ("" if err < 1e-4 else " FAIL"),
               "ours_s": t, "matmul_s": mm_s, "traker_s": peer_cell[1], "ref_rel_err": err, "p_int": p}
        rows.append(row)
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.1f} ms" for c in ("matmul ms", "traker ms")]
        print(f"[{time.perf_counter() - started:4.0f} s] {kind:10s} n={n:<4d} p={pow2(p):4s} k={k:<4d} {dtype}: "
              f"ours {t * 1e3:.1f} ms, matmul {cells[0]}, traker {cells[1]}, err {err:.1e}", flush=True)
        return row

    def randn(n, p):
        return torch.randn(n, p, generator=gen, device=device)

    # Dense shapes: ours, matmul with a pre-made P, traker.
    xs = {}
    for p, k in dense:
        if p not in xs:
            xs = {p: {n: randn(n, p) for n in ns}}
        need = 4 * p * k
        matmul = {}
        if need < 0.75 * free_bytes(device):
            # The rademacher P of the same seed: its products double as a full-size check of ours.
            P = attrprims.Projector(p, k, SEED, "rademacher").matrix(device=device)
            for n in ns:
                matmul[n] = (None, timer(lambda: torch.matmul(xs[p][n], P)))
                full = attrprims.project(xs[p][n], k, seed=SEED, kind="rademacher")
                checks.append({"n": n, "p": p, "k": k, "rel_err_vs_matmul": rel_err(full, torch.matmul(xs[p][n], P))})
            del P
        else:
            for n in ns:
                matmul[n] = (f"skipped (P needs {gib(need)})", None)
        for n in ns:
            matmul[n] = (matmul[n][0] or matmul[n][1] * 1e3, matmul[n][1])
            for kind in KINDS:
                peer_cell = peer.time(timer, xs[p][n], k, kind) if peer else ("off", None)
                ours_row(xs[p][n], k, kind, "fp32", matmul[n], peer_cell)
        sync()

    # Half-precision inputs against the fp32 GEMM of the same shape.
    for n, p, k in halves:
        x32 = randn(n, p)
        P = attrprims.Projector(p, k, SEED, "rademacher").matrix(device=device)
        t_mm = timer(lambda: torch.matmul(x32, P))
        del P
        for name in ("fp16", "bf16"):
            ours_row(x32.to(DTYPES[name]), k, "rademacher", name, (f"{t_mm * 1e3:.2f} (fp32)", t_mm),
                     ("not run (fp32 rows)", None))
        del x32
    xs = {}

    # Ours only: P cannot be held.
    for n, p, k in big:
        x = randn(n, p)
        for kind in KINDS:
            ours_row(x, k, kind, "fp32", (f"not run (P would be {gib(4 * p * k)})", None), ("ours-only row", None))
        del x

    elapsed = time.perf_counter() - started
    steal = [b - a for a, b in zip(steal0, cpu_steal_jiffies())]
    worst = max((c["rel_err_vs_matmul"] for c in checks), default=None)
    notes = [
        "Data: synthetic N(0,1) x (torch.randn, seed 0), fixed projection seed "
        f"{SEED}; every row is a fresh [n, k] float32 output.",
        f"Timing: {'CUDA events, median of >= ' + str(max(repeat, 20)) + ' calls after 3 warmups' if device.type == 'cuda' else f'time.perf_counter, median of >= {repeat} calls (repeated until >= 1 s), after 1 warmup; a warmup call of >= 1 s is kept as a sample'}"
        f"; torch threads {torch.get_num_threads()} (attrprims uses the same count).",
        "ours GFLOP/s = 2·n·p·k / time for every kind; for sjlt this is a dense-equivalent rate (it does only "
        "2·n·p·s flops, s = 4).",
        "matmul = torch.matmul(x, P) with a float32 P [p, k] made once outside the timing (attrprims' own "
        "rademacher P, so equal work and a GEMM ceiling for a stored matrix); speed vs matmul = matmul time / ours "
        "(> 1: ours faster). The same matmul time is shown on the three kind rows of a shape."
        + (f" TF32 for matmul: {torch.backends.cuda.matmul.allow_tf32}." if device.type == "cuda" else ""),
        "Half-precision rows: x in fp16/bf16 for ours, the matmul column is the fp32 GEMM of the same shape.",
        f"rel err (ref) = ||ours - ref|| / ||ref|| on x[:{CHECK_ROWS}, :{CHECK_COLS}] with "
        "ref = x.double() @ Projector(p, k, seed, kind).matrix().double() (FAIL above 1e-4).",
        f"Full-size check: ours (rademacher) against the timed matmul on all {len(checks)} dense (n, p, k): "
        f"largest relative error {worst:.1e}." if worst is not None else "Full-size check: no matmul was run.",
        "traker: " + (("off (--peers off)" if peer is None else peer.error) if peer is None or peer.error else
                      f"traker {version('traker')} {peer.name}, "
                      "the whole .project(x, model_id=0) call timed: it regenerates its P in blocks of 100 "
                      "columns on every call (normal for gaussian, rademacher for rademacher, unscaled "
                      "entries; no sparse kind). Projector construction not timed."
                      + (f" Shapes whose call is estimated (linear in p·ceil(k/100), from a measured smaller "
                         f"shape) above {args.peer_max_s:g} s are skipped." if device.type == "cpu" else "")),
        f"Total benchmark wall time {elapsed / 60:.1f} min; CPU steal (time taken by the VM host) during the run "
        f"{100 * steal[0] / max(steal[1], 1):.1f}% of CPU time.",
    ]
    name = "projection-quick" if args.quick else "projection"
    write_results(name, slug, rows, COLUMNS, info, notes)
    bad = [r for r in rows if r["ref_rel_err"] >= 1e-4] + [c for c in checks if c["rel_err_vs_matmul"] >= 1e-4]
    if bad:
        sys.exit(f"reference check failed on {len(bad)} row(s): {bad}")


if __name__ == "__main__":
    main()
