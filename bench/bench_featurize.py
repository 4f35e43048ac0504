"""Benchmark TRAK featurization of a ResNet-9 on digits upscaled to 32×32: examples/s, attrprims against traker.

Run from the repository root: `.bench-env/bin/python bench/bench_featurize.py [--device cpu|cuda] [--quick]`.
Writes bench/results/featurize[-quick]-<slug>.md and .json. On a GPU, traker projects with fast_jl's CudaProjector
(install traker and fast_jl from bench/.peers as bench/device_check.sh does); on the CPU with its BasicProjector.

Data: scikit-learn's bundled digits (attrprims.demo.load_digits_split: 1,500 training images), each 8×8 image
upscaled bilinearly to 32×32 and repeated over 3 channels. Model: ResNet-9 (bench_grads.resnet9, width 64 on CUDA:
6.6M parameters; width 16 on the CPU) at its seeded initialisation in eval mode: the cost of featurization does
not depend on the weights. Every method featurizes all training images from the same DataLoader (batches of
--batch), with k = --k (a multiple of 512, as fast_jl requires), the margin as output function:
- attrprims: TRAK(model, MultiClassClassification(), proj_dim=k, kind=...).featurize(loader, [state]): projected
  gradients of every example and the float64 Gram of the features.
- traker: TRAKer(task="image_classification", proj_dim=k, its defaults otherwise: fp16 features on CUDA).featurize
  on every batch, then finalize_features (its Gram and inverse): the same outputs.
- fwd+bwd: one ordinary forward and backward of the summed margins per batch, the physical ceiling.
"""

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attrprims.demo import load_digits_split
from attrprims.methods import TRAK
from attrprims.tasks import MultiClassClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_parser, bench_setup, write_results  # noqa: E402
from bench_grads import resnet9  # noqa: E402
from bench_trak import _peer_path, _peer_version, quiet  # noqa: E402

TASK = MultiClassClassification()
COLUMNS = ["method", "projection", "n", "k", "batch", "seconds", "examples/s", "× traker", "share of fwd+bwd",
           "peak GPU MiB"]


def digits_32(device):
    """The 1,500 training digits as [n, 3, 32, 32] images and their labels, on `device`."""
    x, y, _, _ = load_digits_split(seed=0)
    images = F.interpolate(x.reshape(-1, 1, 8, 8), size=32, mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous().to(device), y.to(device)


def run_attrprims(model, state, loader, k, kind, device):
    trak = TRAK(model, TASK, proj_dim=k, seed=0, kind=kind, device=device, progress=False)
    trak.featurize(loader, [state])
    return trak


def run_traker(model, state, loader, k, device, n):
    from trak import TRAKer

    with tempfile.TemporaryDirectory(prefix="traker-") as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=save_dir,
                        device=str(device), proj_dim=k, logging_level=logging.ERROR,
                        **({} if device.type == "cuda" else {"use_half_precision": False}))
        traker.load_checkpoint(state, model_id=0)
        for batch in loader:
            traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        traker.finalize_features()


def run_forward_backward(model, loader):
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in loader:
        torch.autograd.grad(TASK.output(model(batch[0]), batch).sum(), params)


def main():
    ap = bench_parser(__doc__, "a smoke test: 256 images, width 8, k = 512")
    ap.add_argument("--k", type=int, default=2048, help="proj_dim (a multiple of 512 for fast_jl)")
    ap.add_argument("--batch", type=int, default=None, help="examples per batch (default 128 on CUDA, 100 on CPU)")
    ap.add_argument("--width", type=int, default=None, help="ResNet-9 width (default 64 on CUDA, 16 on the CPU)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (median reported)")
    ap.add_argument("--peers", default="traker", help="'traker' or '' (none)")
    args = ap.parse_args()
    device, info, slug = bench_setup(args)
    _peer_path()
    cuda = device.type == "cuda"
    width = args.width or (8 if args.quick else 64 if cuda else 16)
    k = 512 if args.quick else args.k
    batch = args.batch or (128 if cuda else 100)
    x, y = digits_32(device)
    if args.quick:
        x, y = x[:256], y[:256]
    n = x.shape[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)
    torch.manual_seed(0)
    model = resnet9(width).to(device).eval()
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    p = sum(t.numel() for t in model.parameters())

    runs = {
        "fwd+bwd": ("plain", lambda: run_forward_backward(model, loader)),
        "attrprims rademacher": ("rademacher", lambda: run_attrprims(model, state, loader, k, "rademacher", device)),
        "attrprims sjlt": ("sjlt", lambda: run_attrprims(model, state, loader, k, "sjlt", device)),
        "attrprims factored": ("factored (LoGra)", lambda: run_attrprims(model, state, loader, k, "factored", device)),
    }
    if "traker" in args.peers:
        try:
            quiet(lambda: __import__("trak"))
            if cuda:
                import fast_jl  # noqa: F401  (traker falls back to its slow projector without it: fail instead)
            projector = "fast_jl CudaProjector, fp16" if cuda else "BasicProjector"
            runs["traker"] = (projector, lambda: run_traker(model, state, loader, k, device, n))
        except ImportError as error:
            print(f"traker: not importable ({error})", flush=True)

    seconds, peak = {name: [] for name in runs}, {}
    for rep in range(args.repeat + 1):  # the first round warms up (kernels, caches) and is not kept
        for name, (_, fn) in runs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            quiet(fn)
            if cuda:
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            if rep:
                seconds[name].append(time.perf_counter() - t0)
        print(f"round {rep}: " + ", ".join(f"{name} {s[-1]:.2f} s" for name, s in seconds.items() if s), flush=True)

    median = {name: statistics.median(s) for name, s in seconds.items()}
    rows = []
    for name, (projection, _) in runs.items():
        t = median[name]
        rows.append({"method": name, "projection": projection, "n": n, "k": "" if name == "fwd+bwd" else k,
                     "batch": batch, "seconds": t, "examples/s": n / t,
                     "× traker": median["traker"] / t if "traker" in median and name != "fwd+bwd" else None,
                     "share of fwd+bwd": median["fwd+bwd"] / t, "peak GPU MiB": peak.get(name), "samples_s": seconds[name]})
    notes = [
        f"Data: scikit-learn's bundled digits, {n} training images upscaled to 32×32×3 (see the script's docstring); "
        f"ResNet-9 width {width} (p = {p:,}) at its seeded initialisation, eval mode; k = {k}; batches of {batch}.",
        "seconds: one featurization of all images (attrprims: TRAK.featurize with one checkpoint, which includes the "
        "float64 Gram; traker: featurize on every batch and finalize_features; fwd+bwd: a plain forward and backward "
        "of the summed margins per batch); median of the timed rounds, the methods taking turns, after one warm-up "
        "round" + (", with torch.cuda.synchronize() around each." if cuda else "."),
        "× traker: traker's seconds / this row's (> 1: faster). share of fwd+bwd: the plain forward+backward's "
        "seconds / this row's, how close a method comes to the physical limit (1).",
        f"traker {_peer_version('traker')}" + (f", fast_jl {_peer_version('fast_jl')}" if cuda else "") +
        ": TRAKer defaults (fp16 features on CUDA, float32 on the CPU), a fresh save_dir per run.",
        "peak GPU MiB: torch.cuda.max_memory_allocated over the method's last run.",
    ]
    write_results("featurize-quick" if args.quick else "featurize", slug, rows, COLUMNS, info, notes)


if __name__ == "__main__":
    main()
