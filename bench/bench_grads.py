"""Benchmark per-example gradients projected to k: a loop, torch.func vmap(grad), and attrprims.project_grads.

Run from the repository root: `python bench/bench_grads.py [--device cpu|cuda] [--quick] [--models mlp,cnn]`.
Writes bench/results/grads[-quick]-<slug>.md and .json (see bench/README.md).
"""

import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (torch.func's first grad imports it, ~2 s: not inside a timed call)
import torch.nn.functional as F
from torch import nn

import attrprims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    bench_parser, bench_setup, cpu_jiffies, free_bytes, peak_mib, time_cpu_many, time_cuda, write_results)

SEED = 20240
K, K_OUT, K_IN = 2048, 64, 32
VARIANTS = {
    "a": "(a) loop: autograd.grad per example + Projector",
    "b": "(b) vmap(grad) flat [n, p] + Projector",
    "c": "(c) project_grads generic, chunked",
    "d": "(d) project_grads layer, dense Projector",
    "e": f"(e) project_grads layer, FactoredProjector {K_OUT}x{K_IN}",
    "f": "(f) plain batched fwd+bwd, summed output (reference)",
}
COLUMNS = ["model", "p", "n", "variant", "ms/batch", "examples/s", "ratio vs (b)", "ratio vs (f)", "peak MiB", "check"]
CHECK_FAIL = 1e-3  # relative difference above which a check reads FAIL
DEFAULT_MODELS, DEFAULT_LAYERS = "mlp,cnn,transformer", 2


# ---------------------------------------------------------------- models (random weights, synthetic inputs)

def margin(logits, batch):
    """Classification margin per example: logit_y - logsumexp of the other logits (TRAK's output function)."""
    y = batch[1]
    mine = torch.arange(logits.shape[1], device=logits.device) == y[:, None]
    return (logits * mine).sum(1) - torch.logsumexp(logits.masked_fill(mine, float("-inf")), 1)


def token_logprob(logits, batch):
    """Sum over an example's tokens of log p(label token)."""
    return logits.log_softmax(-1).gather(-1, batch[1].unsqueeze(-1)).squeeze(-1).sum(1)


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


def resnet9(w):
    """ResNet-9 (channels w, 2w, res 2w, 4w, 8w, res 8w; w = 64 for the usual size), 10 classes."""
    return nn.Sequential(conv_bn(3, w), conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w), conv_bn(2 * w, 4 * w),
                         nn.MaxPool2d(2), conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; causal attention from nn.Linear q/k/v/out and scaled_dot_product_attention."""

    def __init__(self, d, heads, d_mlp):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, d_mlp), nn.Linear(d_mlp, d)

    def forward(self, x):
        n, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(n, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-shaped decoder: token and position nn.Embedding, pre-LN blocks, final LayerNorm, LM head."""

    def __init__(self, vocab, layers, d, heads, d_mlp, seq, tied):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        n, t = ids.shape
        # Positions as a batch-first [n, t] input, so that the layer path handles the position table too.
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(n, t))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def model_configs(args):
    """{name: config} of the selected models; a config is plain data, so a child process rebuilds the same model."""
    q = args.quick
    configs = {
        "mlp": {"kind": "mlp", "dims": [64, 256, 256, 10] if q else [256, 1024, 1024, 10], "n": 8 if q else 32},
        "cnn": {"kind": "cnn", "width": 8 if q else 64, "side": 32, "n": 4 if q else 16},
        "transformer": {"kind": "transformer", "layers": 1 if q else args.layers, "d": 64 if q else 768,
                        "heads": 2 if q else 12, "d_mlp": 256 if q else 3072, "seq": 32 if q else args.seq,
                        "vocab": 1000 if q else args.vocab, "tied": not args.untied, "n": 4 if q else 8},
    }
    out = {}
    for name in args.models.split(","):
        if name not in configs:
            sys.exit(f"--models: unknown model {name!r} (expected some of {', '.join(configs)})")
        out[name] = configs[name]
        if args.n:
            out[name]["n"] = args.n
    return out


def tiny(cfg):
    """A very small model of the same kind, run once in the memory child before measuring, so that one-off costs
    (lazy imports and first-call initialisation of torch.func, autograd, the kernels) stay out of the peak."""
    small = {"mlp": {"dims": [8, 16, 16, 10]}, "cnn": {"width": 2, "side": 8},
             "transformer": {"layers": 1, "d": 16, "heads": 2, "d_mlp": 32, "seq": 8, "vocab": 50}}
    return {**cfg, **small[cfg["kind"]], "n": 2}


def describe(cfg):
    """Short model text for the table."""
    if cfg["kind"] == "mlp":
        return "MLP " + "-".join(map(str, cfg["dims"])) + ", synthetic"
    if cfg["kind"] == "cnn":
        w = cfg["width"]
        return f"ResNet-9 ({w}..{8 * w} ch) {cfg['side']}x{cfg['side']}x3, BN eval, synthetic"
    return (f"GPT-2-shaped {cfg['layers']}L d{cfg['d']} h{cfg['heads']} T{cfg['seq']} V{cfg['vocab']} "
            f"{'tied' if cfg['tied'] else 'untied'}, synthetic")


def build(cfg, device):
    """(model in eval mode, batch (inputs, labels), output_fn) for a config; the same on every call."""
    torch.manual_seed(SEED)
    n = cfg["n"]
    if cfg["kind"] == "mlp":
        dims = cfg["dims"]
        layers = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        batch = (torch.randn(n, dims[0]), torch.randint(dims[-1], (n,)))
        output_fn = margin
    elif cfg["kind"] == "cnn":
        model = resnet9(cfg["width"])
        batch = (torch.randn(n, 3, cfg["side"], cfg["side"]), torch.randint(10, (n,)))
        output_fn = margin
        # BatchNorm running statistics from one train-mode pass over the batch, then eval mode.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        with torch.no_grad():
            model(batch[0])
    else:
        model = GPT(cfg["vocab"], cfg["layers"], cfg["d"], cfg["heads"], cfg["d_mlp"], cfg["seq"], cfg["tied"])
        batch = (torch.randint(cfg["vocab"], (n, cfg["seq"])), torch.randint(cfg["vocab"], (n, cfg["seq"])))
        output_fn = token_logprob
    model = model.to(device).eval()
    return model, tuple(t.to(device) for t in batch), output_fn


class Setup:
    """A model, its batch and projectors, and the callables of the variants (each returns its [n, k] output;
    (f) returns the batch gradients)."""

    def __init__(self, cfg, device, chunk, loop_n=0, keep=False):
        self.cfg, self.device, self.chunk = cfg, device, chunk
        self.model, self.batch, self.output_fn = build(cfg, device)
        self.layout = attrprims.param_layout(self.model)
        self.p, self.n = self.layout.p, cfg["n"]
        self.loop_n = min(loop_n, self.n) if loop_n > 0 else self.n  # (a) runs over the first loop_n examples
        self.kept = {} if keep else None  # (b)'s [n, p] gradients of the last call, for its check
        tensors = dict(self.model.named_parameters())
        self.params = [tensors[name] for name in self.layout.names]
        self.projector = attrprims.Projector(self.p, K, SEED, "rademacher")
        self.factored = attrprims.FactoredProjector(self.p, k_out=K_OUT, k_in=K_IN, seed=0)

    def fn(self, variant):
        m, f, batch, P = self.model, self.output_fn, self.batch, self.projector
        if variant == "a":
            return self.loop
        if variant == "b":
            return self.materialised
        if variant == "c":
            return lambda: attrprims.project_grads(m, f, batch, P, path="generic", chunk=self.chunk)
        if variant == "d":
            return lambda: attrprims.project_grads(m, f, batch, P, path="layer")
        if variant == "e":
            return lambda: attrprims.project_grads(m, f, batch, self.factored, path="layer")
        return self.batch_grads

    def materialised(self):
        flat = attrprims.per_sample_grads(self.model, self.output_fn, self.batch, path="generic", flat=True)
        if self.kept is not None:
            self.kept["b"] = flat
        return self.projector(flat)

    def loop(self):
        x, y = self.batch
        out = torch.empty((self.loop_n, K), device=self.device)
        for i in range(self.loop_n):
            example = (x[i:i + 1], y[i:i + 1])
            grads = torch.autograd.grad(self.output_fn(self.model(example[0]), example)[0], self.params)
            out[i] = self.projector(torch.cat([g.reshape(1, -1) for g in grads], 1))[0]
        return out

    def batch_grads(self):
        return torch.autograd.grad(self.output_fn(self.model(self.batch[0]), self.batch).sum(), self.params)

    def chunks(self):
        """Vmap passes of (c): runs of whole parameters of at most `chunk` elements (project_grads' rule)."""
        chunk = self.chunk or max(1, 2**26 // self.n)
        count, size = 0, None
        for shape in self.layout.shapes:
            numel = math.prod(shape)
            if size is None or size + numel > chunk:
                count, size = count + 1, 0
            size += numel
        return count

    def factored_blocks(self):
        """{name: (d_out, d_in)} of the weights FactoredProjector projects with P_out ⊗ P_in (per its docstring)."""
        name_of = {id(t): name for name, t in self.model.named_parameters()}
        return {name_of[id(m.weight)]: (m.weight.shape[0], m.weight[0].numel()) for m in self.model.modules()
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))}

    def project_sum(self, grads, factored):
        """The projection of the batch gradient (the sum of the per-example ones), [1, k] float64 on the CPU:
        dense rows with the projector's kernel (one row, float32), for (e) the factored blocks as P_out^T G P_in
        in float64 from FactoredProjector.factors."""
        blocks = self.factored_blocks() if factored else {}
        proj = self.factored.dense if factored else self.projector
        out = torch.zeros(1, proj.k, dtype=torch.float64)
        for name, g, offset in zip(self.layout.names, grads, self.layout.offsets):
            if name in blocks:
                p_out, p_in = self.factored.factors(offset, *blocks[name])
                g = g.detach().double().cpu().reshape(blocks[name])
                out += (p_out.double().T @ g @ p_in.double()).reshape(1, -1)
            else:
                out += proj(g.detach().float().reshape(1, -1), offset).double().cpu()
        return out


# ---------------------------------------------------------------- peak memory, in a fresh process per variant

def _rss_mib():
    """Peak RSS of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(cfg, device_name, variant, chunk, loop_n, threads, conn):
    """In a fresh process: run the variant once on a tiny model of the same kind, build the model and batch, run the
    variant once; send its seconds and peak memory."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(device_name)
        Setup(tiny(cfg), device, chunk, loop_n).fn(variant)()
        setup = Setup(cfg, device, chunk, loop_n)
        fn = setup.fn(variant)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = _rss_mib()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send({"seconds": seconds, "peak_mib": peak - base, "baseline_mib": base,
                   "cpu_s": usage.ru_utime + usage.ru_stime})
    except Exception as e:  # reported in the table, not a crash of the benchmark
        conn.send({"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"})


class MemoryRunner:
    """Runs memory_child in fresh processes forked from a server that has imported torch (import takes seconds)."""

    def __init__(self, device, threads):
        self.device, self.threads, self.cpu_seconds = device, threads, 0.0
        try:
            self.ctx = mp.get_context("forkserver")
            # torch.func's first grad imports torch._dynamo (~2 s): import it once in the server.
            self.ctx.set_forkserver_preload(["__main__", "torch", "torch._dynamo", "attrprims"])
            self.start_method = "forkserver (torch preloaded; the server has run no torch op)"
        except ValueError:
            self.ctx, self.start_method = mp.get_context("spawn"), "spawn"

    def server_cpu_seconds(self):
        """CPU seconds of the fork server (not a waited-for child of this process); 0 where unknown."""
        from multiprocessing import forkserver
        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, TypeError):
            return 0.0

    def run(self, cfg, variant, chunk, loop_n, timeout):
        """{'seconds', 'peak_mib', 'baseline_mib'} or {'error'}; kills the child after `timeout` seconds."""
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=memory_child, args=(cfg, str(self.device), variant, chunk, loop_n, self.threads,
                                                                 send))
        proc.start()
        send.close()
        result = {"error": f"timed out after {timeout:.0f} s"}
        if receive.poll(timeout):
            try:
                result = receive.recv()
            except EOFError:
                proc.join(5)
                result = {"error": f"child died (exit code {proc.exitcode})"}
        if proc.is_alive():
            proc.kill()
        proc.join()
        self.cpu_seconds += result.get("cpu_s", 0.0)
        return result


# ---------------------------------------------------------------- timing helpers

def own_cpu_seconds():
    """CPU seconds used by this process and its waited-for children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def make_timer(device, repeat, min_total_s):
    """A function {name: fn} -> {name: samples in seconds}: round-robin on CPU, CUDA events on a GPU."""
    if device.type == "cuda":
        return lambda fns: {name: time_cuda(fn, warmup=3, repeat=repeat, samples=True) for name, fn in fns.items()}
    return lambda fns: time_cpu_many(fns, warmup=1, repeat=repeat, min_total_s=min_total_s)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_of(fn, device, calls=2):
    """Fastest of `calls` calls of fn(), in seconds (a rough probe for estimates)."""
    best = math.inf
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class ProjectionRate:
    """Seconds per projected element (n rows x 1 column to k) of Projector on this device, probed once per n."""

    def __init__(self, device):
        self.device, self.rates = device, {}

    def seconds(self, n, p):
        if n not in self.rates:
            c = max(2**14, 2**20 // n)
            x = torch.randn(n, c, device=self.device)
            proj = attrprims.Projector(c, K, SEED, "rademacher")
            self.rates[n] = seconds_of(lambda: proj(x), self.device) / (n * c)
        return self.rates[n] * n * p


def rel_diff(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def min_cosine(a, b):
    """Smallest per-example cosine between the rows of a and b (float64)."""
    return F.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=1).min().item()


# ---------------------------------------------------------------- one model

def bench_model(name, cfg, args, device, timer, rate, memory, log):
    """Rows of one model: budget checks, peak memory in fresh processes, interleaved timing, reference checks."""
    setup = Setup(cfg, device, args.chunk, args.loop_n, keep=True)
    n, p, loop_n = setup.n, setup.p, setup.loop_n
    label = describe(cfg)
    wanted = [v for v in VARIANTS if v in args.variants]
    log(f"{name}: {label}, p = {p:,}, n = {n}")

    # Lower bounds of one call from the plain forward+backward and the projector's measured rate; a variant above
    # --max-s, or whose materialised per-example gradients would not fit, is skipped before it runs.
    t_f = seconds_of(setup.batch_grads, device)
    t_proj = rate.seconds(n, p)
    bound = {"a": loop_n * (rate.seconds(1, p) + t_f / n), "b": t_proj + t_f, "c": t_proj + setup.chunks() * t_f,
             "d": t_proj + t_f, "e": t_f, "f": t_f}
    available = free_bytes(device)
    materialised = {"b": 2 * 4 * n * p, "c": 2 * 4 * n * min(p, args.chunk or 2**26 // n)}
    skipped, mem = {}, {}
    for v in wanted:
        if materialised.get(v, 0) > 0.8 * available:
            skipped[v] = (f"skipped: materialised n x p needs ~{materialised[v] / 2**30:.1f} GiB, "
                          f"{available / 2**30:.1f} GiB available")
        elif bound[v] > args.max_s:
            skipped[v] = f"skipped: > {args.max_s:g} s/call (lower-bound estimate {bound[v]:.0f} s)"
    for v in wanted:
        if v in skipped:
            log(f"  {VARIANTS[v]}: {skipped[v]}")
            continue
        if memory is None:
            # No fresh process: one call here is the budget probe (and a warmup).
            t_one = seconds_of(setup.fn(v), device, calls=1)
            if t_one > args.max_s:
                skipped[v] = f"skipped: 1 call took {t_one:.0f} s > --max-s {args.max_s:g}"
            continue
        mem[v] = memory.run(cfg, v, args.chunk, args.loop_n, timeout=max(3 * args.max_s, 60) + 30)
        if "error" in mem[v]:
            skipped[v] = f"skipped: memory run {mem[v]['error']}"
        elif mem[v]["seconds"] > args.max_s:
            skipped[v] = f"skipped: 1 call took {mem[v]['seconds']:.0f} s > --max-s {args.max_s:g}"
        log(f"  {VARIANTS[v]}: 1 call in a fresh process {mem[v].get('seconds', math.nan):.2f} s, peak +"
            f"{mem[v].get('peak_mib', math.nan):.0f} MiB" + (f"; {skipped[v]}" if v in skipped else ""))

    # Interleaved timing of the variants that fit, after one call of each on a tiny model (first-call set-up);
    # the last call's output of each is kept for the checks.
    warm = Setup(tiny(cfg), device, args.chunk, args.loop_n)
    for v in wanted:
        if v not in skipped:
            warm.fn(v)()
    outs = {}
    fns = {v: (lambda v=v, fn=setup.fn(v): outs.__setitem__(v, fn())) for v in wanted if v not in skipped}
    samples = timer(fns) if fns else {}
    med = {v: statistics.median(s) for v, s in samples.items()}
    # Seconds per batch of n: (a) ran over its first loop_n examples (the loop's cost is linear in them).
    med = {v: t * (n / loop_n if v == "a" else 1.0) for v, t in med.items()}

    # Reference checks. (b): the sum of its per-example gradients against the batch gradient of (f). (a), (c),
    # (d): per example against (b)'s projected rows; without (b), their sum against the projected batch gradient.
    # (e): against the same FactoredProjector on the generic path, and its sum against the batch gradient
    # projected with the factors. The sums check linearity: sum_i P(g_i) = P(sum_i g_i).
    checks = {}
    grads = outs.get("f") or setup.batch_grads()
    if "b" in outs:
        flat_sum = torch.cat([g.reshape(-1) for g in grads])
        checks["b"] = {"grad_sum_rel": rel_diff(setup.kept.pop("b").sum(0), flat_sum)}
        del flat_sum
    for v in "acd":
        if v in outs and "b" in outs:
            ref = outs["b"][:outs[v].shape[0]]
            checks[v] = {"cos": min_cosine(outs[v], ref), "rel": rel_diff(outs[v], ref)}
        elif v in outs:
            if "dense_sum" not in checks:
                checks["dense_sum"] = setup.project_sum(grads, factored=False)
            if v == "a" and setup.loop_n < n:
                checks[v] = {"note": "subset of the batch: no sum check without (b)"}
            else:
                checks[v] = {"sum_rel": rel_diff(outs[v].sum(0, keepdim=True), checks["dense_sum"])}
    checks.pop("dense_sum", None)
    if "e" in outs:
        checks["e"] = {"sum_rel": rel_diff(outs["e"].sum(0, keepdim=True), setup.project_sum(grads, factored=True))}
        if "c" in med and med["c"] <= args.max_s:
            generic = attrprims.project_grads(setup.model, setup.output_fn, setup.batch, setup.factored,
                                              path="generic")
            checks["e"]["generic_rel"] = rel_diff(outs["e"], generic)

    rows = []
    for v in wanted:
        t = med.get(v)
        c = checks.get(v, {})
        if "cos" in c:
            text, worst = f"cos {c['cos']:.7f}, rel {c['rel']:.0e} vs (b)", c["rel"]
        elif "grad_sum_rel" in c:
            text, worst = f"sum of grads rel {c['grad_sum_rel']:.0e} vs (f)", c["grad_sum_rel"]
        elif "generic_rel" in c:
            text, worst = f"rel {c['generic_rel']:.0e} vs generic path; sum rel {c['sum_rel']:.0e}", max(
                c["generic_rel"], c["sum_rel"])
        elif "sum_rel" in c:
            text, worst = f"sum rel {c['sum_rel']:.0e}", c["sum_rel"]
        else:
            text, worst = c.get("note", "reference of the sum checks" if v == "f" and t is not None else ""), 0.0
        if worst > CHECK_FAIL:
            text += " FAIL"
        m = mem.get(v, {})
        variant = VARIANTS[v] + (f" (timed on {loop_n} of the {n} examples, x {n}/{loop_n})" if v == "a" and
                                 loop_n < n else "")
        row = {"model": label, "p": f"{p:,}", "n": n, "variant": variant,
               "ms/batch": skipped.get(v, t * 1e3 if t is not None else "not run"),
               "examples/s": n / t if t else "", "ratio vs (b)": f"{med['b'] / t:.3g}x" if t and "b" in med else "",
               "ratio vs (f)": f"{med['f'] / t:.3g}x" if t and "f" in med else "",
               "peak MiB": f"{m['peak_mib']:.1f}" if "peak_mib" in m else "", "check": text,
               "model_key": name, "p_int": p, "config": cfg, "variant_key": v, "seconds_per_batch": t,
               "samples_s": samples.get(v), "lower_bound_s": bound[v], "memory_run": m or None, "checks": c or None,
               "failed": worst > CHECK_FAIL}
        rows.append(row)
        shown = f"{t * 1e3:.1f} ms ({n / t:.1f} examples/s)" if t else row["ms/batch"]
        log(f"  {VARIANTS[v]}: {shown}; {text}")
    return rows


def result_name(args):
    """'grads[-quick]', then the models, layers and variants where they differ from the defaults, then --tag."""
    parts = ["grads"] + (["quick"] if args.quick else [])
    if args.models != DEFAULT_MODELS:
        parts.append(args.models.replace(",", "+"))
    if args.layers != DEFAULT_LAYERS and "transformer" in args.models:
        parts.append(f"L{args.layers}")
    if set(args.variants) != set(VARIANTS):
        parts.append("".join(sorted(set(args.variants))))
    return "-".join(parts + ([args.tag] if args.tag else []))


def main():
    ap = bench_parser(__doc__, "tiny models (a smoke test)")
    ap.set_defaults(threads=os.cpu_count())
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated: mlp, cnn, transformer")
    ap.add_argument("--variants", default="abcdef", help="letters of the variants to run (default all: abcdef)")
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="transformer blocks (12 for GPT-2 small)")
    ap.add_argument("--vocab", type=int, default=50257, help="transformer vocabulary (GPT-2: 50257)")
    ap.add_argument("--seq", type=int, default=128, help="transformer tokens per example")
    ap.add_argument("--untied", action="store_true", help="transformer LM head not tied to the token embedding")
    ap.add_argument("--n", type=int, default=None, help="batch size for every model (default: 32, 16, 8)")
    ap.add_argument("--loop-n", type=int, default=4, help="(a): loop over this many examples of the batch and "
                    "scale its time to n (0: all n)")
    ap.add_argument("--chunk", type=int, default=None, help="(c): parameter elements per vmap pass (default: "
                    "project_grads' own, about 2^26 / n)")
    ap.add_argument("--max-s", type=float, default=60.0, help="skip a variant whose call is estimated or measured "
                    "to take longer (seconds)")
    ap.add_argument("--repeat", type=int, default=None, help="minimum timed calls (default 3 on CPU, 20 on CUDA)")
    ap.add_argument("--memory", choices=("on", "off"), default="on",
                    help="peak memory of each variant in a fresh process (also the budget probe)")
    ap.add_argument("--tag", default=None, help="extra word in the result file name")
    args = ap.parse_args()
    if not args.variants or set(args.variants) - set(VARIANTS):
        sys.exit(f"--variants: expected letters among {''.join(VARIANTS)}, got {args.variants!r}")

    device, info, slug = bench_setup(args)
    repeat = args.repeat or (20 if device.type == "cuda" else 2 if args.quick else 3)
    min_total_s = 0.1 if args.quick else 1.0
    configs = model_configs(args)
    memory = MemoryRunner(device, args.threads) if args.memory == "on" else None
    started, jiffies0, own0 = time.perf_counter(), cpu_jiffies(), own_cpu_seconds()

    def log(text):
        print(f"[{time.perf_counter() - started:4.0f} s] {text}", flush=True)

    rows, rate = [], ProjectionRate(device)
    for name, cfg in configs.items():
        rows += bench_model(name, cfg, args, device, make_timer(device, repeat, min_total_s), rate, memory, log)

    elapsed = time.perf_counter() - started
    busy, steal, total = (b - a for a, b in zip(jiffies0, cpu_jiffies()))
    own = own_cpu_seconds() - own0 + (memory.cpu_seconds + memory.server_cpu_seconds() if memory else 0.0)
    others = busy - own * os.sysconf("SC_CLK_TCK")
    if device.type == "cuda":
        timing = f"CUDA events, median of >= {max(repeat, 20)} calls after 3 warmups, one variant after the other"
    else:
        timing = (f"time.perf_counter, median of >= {repeat} calls (more until >= {min_total_s:g} s) after 1 warmup "
                  "(a warmup call of >= 1 s is kept as a sample); the variants of a model are called round-robin")
    command = " ".join(["python", "bench/bench_grads.py"] + sys.argv[1:])
    if memory is None:
        memory_note = "Peak MiB: not measured (--memory off)."
    else:
        memory_note = (
            f"Peak MiB: each (model, variant) runs once in a fresh process ({memory.start_method}) that first runs "
            "the variant on a tiny model of the same kind (so lazy imports and first-call set-up are not counted), "
            "then builds the model and batch and calls the variant once (model-specific first-call costs, such as "
            "FactoredProjector's cached factor matrices, do count); " +
            ("torch.cuda.max_memory_allocated minus memory_allocated before the call." if device.type == "cuda" else
             "ru_maxrss after the call minus ru_maxrss after building (peak RSS increase)."))
    notes = [
        f"Command: `{command}`.",
        "Models: random weights (seed fixed), synthetic inputs: N(0,1) features/images with random labels for the "
        "MLP and ResNet-9 (output = margin: logit_y - logsumexp of the other logits; BatchNorm in eval mode with "
        "running statistics from one train-mode pass), random token ids and random label tokens for the transformer "
        "(output = sum over tokens of log p(label); position table as an nn.Embedding). p = parameter count (a tied "
        "weight once).",
        f"Variants: dense rows project to k = {K} with Projector(p, {K}, seed, 'rademacher'); (e) to k = {K_OUT}x"
        f"{K_IN} = {K_OUT * K_IN} with FactoredProjector(p, k_out={K_OUT}, k_in={K_IN}, seed=0) (weights of "
        "Linear/Conv2d/Embedding layers by P_out ⊗ P_in, the other parameters dense). (a) loops "
        "torch.autograd.grad over single-example batches and projects each flat gradient (n = 1), over the first "
        f"--loop-n {args.loop_n} examples (0: all), its time scaled to the batch (the loop's cost is linear in the "
        "examples); (b) per_sample_grads(path='generic', flat=True), then one projection of [n, p]; (c) "
        f"project_grads(path='generic', chunk={args.chunk or 'default, ~2^26/n'}): one vmap(grad) pass per chunk of "
        "whole parameters; (f) torch.autograd.grad of output.sum() w.r.t. the parameters over the batch: the plain "
        "forward+backward, with no per-example gradient and no projection.",
        f"Timing: {timing}; torch threads {torch.get_num_threads()} (attrprims uses the same count). ms/batch = "
        "median seconds per call for the whole batch; examples/s = n / that; ratio vs (b) = time(b) / time (> 1: "
        "faster than materialising with vmap); ratio vs (f) = time(f) / time (the fraction of plain "
        "forward+backward speed).",
        "Budget: a variant is skipped when a lower bound of its call (Projector's rate measured on [n, 2^20/n], "
        f"scaled to p, plus the plain forward+backward) exceeds --max-s {args.max_s:g} s, when its materialised "
        "per-example gradients (2 x 4·n·p bytes, or 2 x 4·n·chunk) exceed 80% of the available memory, or when its "
        "one call in the fresh process took longer than --max-s.",
        memory_note,
        "Checks: (b): the sum over the batch of its per-example gradients against the batch gradient of (f). (a), "
        "(c), (d): per example against (b)'s projected rows (smallest row cosine; rel = ||X - X_b|| / ||X_b||), or "
        "where (b) did not run, sum rel = ||sum_i X_i - P(sum_i g_i)|| / ||P(sum_i g_i)|| (linearity), the batch "
        "gradient of (f) projected parameter by parameter with the same Projector. (e): the same sum check, with the "
        "Linear/Conv2d/Embedding weight blocks of the batch gradient projected as P_out^T G P_in in float64 from "
        "FactoredProjector.factors (the definition in its docstring), and, when (c) fits the budget, rel against "
        f"project_grads(FactoredProjector, path='generic'). FAIL above {CHECK_FAIL:g}.",
        f"Total wall time {elapsed / 60:.1f} min; CPU steal (time taken by the VM host) "
        f"{100 * steal / max(total, 1):.1f}%; CPU time of other processes on this machine during the run "
        f"{100 * max(others, 0) / max(total, 1):.0f}% of its capacity (timings are only as good as this is small).",
    ]
    write_results(result_name(args), slug, rows, COLUMNS, info, notes)
    failed = [f"{r['model_key']} ({r['variant_key']})" for r in rows if r["failed"]]
    if failed:
        sys.exit(f"reference check failed on {', '.join(failed)}")


if __name__ == "__main__":
    main()
