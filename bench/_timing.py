"""Timing, machine description, command-line set-up and result writing shared by the benchmark scripts."""

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _timed(fn):
    """Seconds one call of fn() takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_cpu_many(fns, warmup=1, repeat=3, min_total_s=1.0, keep_slow_warmup_s=1.0):
    """Samples (seconds) of each fn of the dict `fns`, called in turn so that drifts in machine speed hit all alike.

    Each fn gets >= `repeat` timed calls and more until its calls total `min_total_s`. A warmup call that itself
    takes >= `keep_slow_warmup_s` is kept as a sample (a multi-second call gains nothing from warming up, and
    the median of >= 3 discards a one-off slow first call).
    """
    samples = {name: [] for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            dt = _timed(fn)
            if dt >= keep_slow_warmup_s:
                samples[name].append(dt)
    while todo := [name for name, s in samples.items() if len(s) < repeat or sum(s) < min_total_s]:
        for name in todo:
            samples[name].append(_timed(fns[name]))
    return samples


def time_cpu(fn, warmup=1, repeat=3, min_total_s=1.0):
    """Median seconds of fn() over >= `repeat` calls (more until `min_total_s`), after `warmup` calls."""
    return statistics.median(time_cpu_many({0: fn}, warmup, repeat, min_total_s)[0])


def time_cuda(fn, warmup=3, repeat=20, samples=False):
    """Median seconds of fn() over max(repeat, 20) calls timed by CUDA events (all samples if `samples`)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(repeat, 20)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times if samples else statistics.median(times)


def bench_device(name):
    """The torch.device for --device NAME; exits with the reason when attrprims' CUDA kernels cannot run."""
    device = torch.device(name)
    if device.type == "cuda":
        import attrprims

        status = attrprims.cuda_available()
        if not status:
            sys.exit(f"--device cuda: {status.reason}")
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_slug(device, info, given=None):
    """Device slug of result file names: `given`, else from machine_info(): "cpu-<model>-<cores>c" (this project's
    CI machine kind is "cpu-epyc-zen1-2c") or "cuda-<gpu name>"."""
    if given:
        return given
    if device.type == "cpu":
        model = info["cpu"]
        if model.startswith("AMD EPYC (family 23, model 1)"):  # KVM guests see only "AMD EPYC"
            name = "epyc-zen1"
        else:
            name = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)|\b(amd|intel|r|tm|cpu|processor)\b", " ",
                                                     model.lower())).strip("-")
        return f"cpu-{name}-{info['cores']}c"
    return "cuda-" + info["gpu"].lower().replace("nvidia ", "").replace(" ", "-")


def bench_parser(doc, quick_help, *, cuda=True):
    """An ArgumentParser with the flags every bench script takes: --quick, --threads, --slug and, for a script with
    a CUDA path, --device. The script adds its own flags, then calls bench_setup(args)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if cuda:
        ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (attrprims uses as many)")
    ap.add_argument("--slug", default=None, help="machine slug in the result file names (default: detected)")
    return ap


def other_cpu_builds(device):
    """The CPU kernel builds this machine can run besides the one in use (none on CUDA), for side-by-side rows."""
    import attrprims

    if device.type != "cpu":
        return []
    info = attrprims.build_info()
    return [isa for isa in info["cpu_kernels_supported"] if isa != info["cpu_kernels"]]


def under_cpu_build(isa, fn):
    """fn, run with the CPU kernels' build `isa` (attrprims.set_cpu_kernels), the previous one restored after."""
    import attrprims

    def run():
        previous = attrprims.set_cpu_kernels(isa)
        try:
            return fn()
        finally:
            attrprims.set_cpu_kernels(previous)

    return run


def build_times(med, builds, key, best):
    """'avx512 4.1 / avx2 6.4 / generic 18.2' ms from med[(key, isa)] (seconds) for the other builds and `best`."""
    return " / ".join([f"{best} {med[key] * 1e3:.2f}"] + [f"{isa} {med[(key, isa)] * 1e3:.2f}" for isa in builds])


def bench_setup(args):
    """Apply --threads and resolve --device: (device, machine_info(), slug for the result file names)."""
    torch.set_num_threads(args.threads)
    device = bench_device(getattr(args, "device", "cpu"))
    info = machine_info()
    return device, info, device_slug(device, info, args.slug)


def _high_water_kib():
    """VmHWM: this process's peak RSS since exec (ru_maxrss would include the spawning parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_child(device_name, setup, run, args, conn):
    state = setup(*args)
    if device_name.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(state)
        torch.cuda.synchronize()
        conn.send((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        base = _high_water_kib()
        run(state)
        conn.send((_high_water_kib() - base) / 1024)


def peak_mib(device_name, setup, run, *args):
    """Peak memory increase (MiB) of run(setup(*args)) over what setup made, in a fresh spawned process:
    VmHWM on the CPU, torch.cuda.max_memory_allocated on CUDA. setup and run must be module-level functions."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_child, args=(device_name, setup, run, args, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return value


def free_bytes(device):
    """Bytes that can still be allocated on `device` (MemAvailable on CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_jiffies():
    """(busy, steal, total) jiffies of all CPUs from /proc/stat; zeros where unreadable."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    return f[0] + f[1] + f[2] + f[5] + f[6], (f[7] if len(f) > 7 else 0), sum(f[:8])


def _cpu_model():
    """CPU model name (with family/model, as KVM guests often see only 'AMD EPYC') from /proc/cpuinfo or platform."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        return f"{fields['model name']} (family {fields.get('cpu family')}, model {fields.get('model')})"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def _git_commit():
    """Short commit of the repository holding this file, with '+dirty' for local changes; None without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    """A JSON-serialisable description of the machine, torch, the attrprims build and the git commit."""
    import attrprims

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "attrprims": attrprims.build_info(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_runtime"] = torch.version.cuda
        try:
            info["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["gpu_driver"] = None
    return info


def _cell(value):
    """Markdown text of one table cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows, columns):
    """Rows (dicts) as a markdown table over `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name, device_slug, rows, columns, info, notes):
    """Print the table and write bench/results/<name>-<device_slug>.md and .json (info, rows, notes)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"{name}-{device_slug}"
    table = markdown_table(rows, columns)
    print(table)
    gpu = f"{info['gpu']} (driver {info.get('gpu_driver')}); " if info.get("gpu") else ""
    machine = (f"{gpu}{info['cpu']}, {info['cores']} cores; torch {info['torch']} "
               f"({info['torch_threads']} threads); attrprims {info['attrprims'].get('version')} "
               f"({info['attrprims'].get('cpu_kernels')} CPU kernels); commit {info.get('git_commit')}")
    text = [f"# {name} on {device_slug}", "", f"Machine: {machine}", "", table, ""]
    text += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    stem.with_suffix(".md").write_text("\n".join(text))
    payload = {"name": name, "device_slug": device_slug, "machine": info, "columns": columns, "rows": rows,
               "notes": notes}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
