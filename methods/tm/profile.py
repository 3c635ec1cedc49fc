"""Profile the pixel-space unroll and the convolutions in it: ``python -m methods.tm.profile``.

Parts (``--part convs|unroll|frozen|heads|all``), on ``--device cpu`` or ``cuda``:

* ``convs``: forward, forward+backward, and forward+backward(with graph)+double backward of one
  layer: a depthwise 3x3 convolution (PyTorch's own, and ``bench.protocol.conv_ops``'s), a dense 3x3
  convolution of about the same FLOPs, and a 1x1 convolution. Shows where the meta-backward's cost
  comes from (PyTorch's double backward of a grouped convolution runs one convolution per group).
* ``unroll``: one trajectory-matching iteration of the pixels cut's student (EfficientNet-Lite0
  tower + linear heads, random synthetic images and texts, a random target) per meta-gradient mode
  (naive / exact / fd) and ``syn_steps``, each in a fresh subprocess so that peak memory is its own:
  seconds per iteration (the fastest of ``--repeats`` after one warm-up iteration) and peak memory (CUDA: peak allocated during
  the iterations; CPU: peak resident set size of the process minus its size before the first
  iteration, from ``getrusage``). ``--depthwise native`` swaps the tower's depthwise convolutions
  back to PyTorch's for comparison. Also the inner steps alone (forward + backward, no graph).

* ``heads`` (not part of ``all``): one ``tm`` iteration of the heads cut per ``--budgets`` with the
  unroll and minibatch ``auto`` picks: seconds, the matrix products' FLOPs and GFLOP/s, and their
  share of the profiled operators' self time (what cutting per-operator overhead could still gain).

* ``frozen``: one ``tm`` iteration of the frozen-pixels cut (``--images`` synthetic pairs as pixels
  through the frozen EfficientNet-Lite0 tower at each of ``--sizes``, the heads' Gram unroll of
  ``tm``'s 20 steps on their features, one backward into the pixels) beside the same iteration on
  feature vectors (the heads cut), each in a fresh subprocess: seconds and peak memory as above.

Prints a table and, with ``--out FILE``, writes the numbers as JSON. A GPU session runs
``python -m methods.tm.profile --device cuda --image-size 224 --images 100 --steps 10,20,40``
(docs/pixels.md has its figures).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> float:
    """Seconds of one call: the fastest of ``repeats`` after a warm-up call (robust to other load)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def conv_table(device: torch.device, n: int, channels: int, size: int, repeats: int) -> list[dict]:
    from bench.protocol.conv_ops import conv2d as conv_dd

    dense_c = max(1, round(channels ** 0.5))  # dense 3x3 with c'^2 = c: the depthwise layer's FLOPs
    def torch_conv(x, w, pad, groups):
        return F.conv2d(x, w, None, stride=1, padding=pad, groups=groups)

    def ours(x, w, pad, groups):
        return conv_dd(x, w, None, stride=1, padding=pad, groups=groups)

    layers = [("depthwise 3x3 (torch)", channels, channels, 3, channels, torch_conv),
              ("depthwise 3x3 (conv_ops)", channels, channels, 3, channels, ours),
              (f"dense 3x3, {dense_c} ch (same FLOPs)", dense_c, dense_c, 3, 1, torch_conv),
              ("1x1", channels, channels, 1, 1, torch_conv)]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, cin, cout, k, groups, fn in layers:
        x = torch.randn(n, cin, size, size, generator=g).to(device).requires_grad_(True)
        w = (0.1 * torch.randn(cout, cin // groups, k, k, generator=g)).to(device).requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, w, k // 2, groups)

        def fwd_bwd():
            return torch.autograd.grad(fn(x, w, k // 2, groups).square().sum(), (x, w))

        def double():
            gx, gw = torch.autograd.grad(fn(x, w, k // 2, groups).square().sum(), (x, w), create_graph=True)
            return torch.autograd.grad((gx * gx.detach()).sum() + (gw * gw.detach()).sum(), (x, w))

        t = [_time(f, device, repeats) * 1000 for f in (fwd, fwd_bwd, double)]
        macs = _conv_macs((n, cin, size, size), (cout, cin // groups, k, k), (n, cout, size, size), False)
        rows.append({"layer": name, "shape": [n, cin, size, size], "mmacs": round(macs / 1e6, 1), "fwd_ms": round(t[0], 3),
                     "fwd_bwd_ms": round(t[1], 3), "fwd_bwd_double_ms": round(t[2], 3),
                     "double_over_fwd": round(t[2] / t[0], 1)})
    return rows


def _conv_macs(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """Multiply-adds of one convolution, grouped ones included: every output element of the
    underlying (non-transposed) convolution costs ``prod(w_shape[1:])``."""
    spatial = x_shape[2:] if transposed else out_shape[2:]
    n = 1
    for d in (x_shape[0], *spatial, *w_shape):
        n *= d
    return n


class _FlopCount(TorchDispatchMode):
    """FLOPs (2 per multiply-add) of the matrix products and convolutions dispatched inside, forward
    and every backward. Convolutions are counted here (PyTorch's own formula for
    ``convolution_backward`` over-counts grouped convolutions by the group count); matrix products by
    PyTorch's formulas. (``FlopCounterMode`` itself cannot be used: its module tracker breaks
    ``autograd.grad`` inside the exact unroll.)"""
    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet is torch.ops.aten.convolution:
            self.total += 2 * _conv_macs(args[0].shape, args[1].shape, out.shape, bool(args[6]))
        elif packet is torch.ops.aten.convolution_backward:  # each gradient asked for costs one forward's MACs
            grad_out, x, w, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
            self.total += 2 * _conv_macs(x.shape, w.shape, grad_out.shape, transposed) * sum(bool(m) for m in mask[:2])
        elif packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(fn, device: torch.device, repeats: int) -> tuple[float, float, str]:
    """Seconds of one call (``_time``) and the peak memory it took, in GiB: CUDA's peak allocated
    above what was allocated before, or on the CPU the peak RSS above the RSS before."""
    _sync(device)
    rss0 = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sec = _time(fn, device, repeats)
    if device.type == "cuda":
        return sec, (torch.cuda.max_memory_allocated(device) - base) / 2**30, "cuda max_memory_allocated - allocated before"
    return sec, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0) / 1024, "cpu peak RSS (getrusage) - RSS before"


def _run_child(cmd: list, timeout, ident: dict) -> dict:
    """Run one configuration in a fresh process (its peak memory its own): its JSON line, or ``ident``
    with the error."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**ident, "error": f"timed out after {timeout:g} s"}
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1]) if res.returncode == 0 and lines else {
        **ident, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}


def unroll_one(device: torch.device, mode: str, steps: int, image_size: int, images: int, repeats: int,
               depthwise: str, autocast: str = "off", flops: bool = False) -> dict:
    """One configuration, in this process: seconds per iteration and peak memory; with ``flops``, also
    the floating-point operations of one iteration and of its inner steps (``_FlopCount``: matrix
    products and convolutions, forward and every backward) and the rate they ran at."""
    from torch.func import functional_call

    from bench.protocol.student import StudentConfig, build_student, contrastive_loss
    from bench.protocol.towers import DepthwiseConv2d, load_tower
    from methods.tm.experts import flatten, trainable, unflatten
    from methods.tm.unroll import meta_backward

    if depthwise == "native":
        DepthwiseConv2d.forward = torch.nn.Conv2d.forward
    torch.manual_seed(0)
    tower = load_tower("effnet_lite0", image_size).to(device)
    student = build_student(StudentConfig(cut="pixels", image_size=image_size), 1280, 384, 0, tower).to(device)
    params = trainable(student)
    spec = [(n, p.shape) for n, p in params]
    frozen = dict(student.named_buffers())
    theta0 = flatten(params)
    target = theta0 + 1e-3 * torch.randn_like(theta0)
    img = torch.randn(images, 3, image_size, image_size, device=device, requires_grad=True)
    txt = torch.randn(images, 384, device=device, requires_grad=True)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(images, generator=gen).to(device) for _ in range(steps)]

    def step_loss(theta, i, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            a, b = functional_call(student, unflatten(theta, spec) | frozen, (i, t))
        return contrastive_loss(a.float(), b.float(), 0.07)

    def outer(theta):
        return ((theta - target) ** 2).sum() / ((theta0 - target) ** 2).sum()

    def iteration():
        for x in (img, txt, lr):
            x.grad = None
        meta_backward(step_loss, theta0, [img, txt], batches, lr, outer, mode=mode)

    def inner_only():
        th = theta0
        for b in batches:
            t = th.detach().requires_grad_(True)
            g = torch.autograd.grad(step_loss(t, img[b].detach(), txt[b].detach()), t)[0]
            th = th - 0.01 * g

    try:
        sec, peak, how = _measure(iteration, device, repeats)
    except torch.OutOfMemoryError:
        return {"mode": mode, "steps": steps, "depthwise": depthwise, "error": "out of memory"}
    mem = {"peak_gib": round(peak, 2 if device.type == "cuda" else 3), "memory": how}
    inner = _time(inner_only, device, 1)
    row = {"mode": mode, "steps": steps, "depthwise": depthwise, "autocast": autocast, "image_size": image_size, "images": images,
           "s_per_iteration": round(sec, 3), "inner_steps_s": round(inner, 3), **mem, "n_params": int(theta0.numel())}
    if flops:
        counts = []
        for fn in (iteration, inner_only):
            with _FlopCount() as fc:
                fn()
            counts.append(fc.total)
        row.update({"gflop_per_iteration": round(counts[0] / 1e9, 1), "tflops_per_s": round(counts[0] / sec / 1e12, 2),
                    "gflop_inner_steps": round(counts[1] / 1e9, 1), "inner_tflops_per_s": round(counts[1] / inner / 1e12, 2)})
    return row


def _tm_problem(device: torch.device, image_size: int, images: int):
    """A ``tm`` iteration's inputs at the defaults: the heads student, a random start and target,
    ``images`` random synthetic pairs (pixels at ``image_size`` through the frozen tower, or 0:
    feature vectors). Returns ``iteration(unroll, batch)``, one ``tm_iteration``."""
    from bench.protocol.student import StudentConfig, build_student
    from bench.protocol.towers import load_tower
    from methods.tm.experts import flatten, trainable
    from methods.trajectory_matching import TMConfig, tm_iteration

    c = TMConfig()
    torch.manual_seed(0)
    student = build_student(StudentConfig(), 1280, 384, 0).to(device)
    spec = [(n, tuple(p.shape)) for n, p in trainable(student)]
    frozen = {n: p.detach() for n, p in student.named_parameters() if not p.requires_grad} | dict(student.named_buffers())
    start = flatten(trainable(student)).detach()
    target = start + 1e-2 * torch.randn_like(start)
    tower = load_tower("effnet_lite0", image_size).to(device).requires_grad_(False) if image_size else None
    shape = (images, 3, image_size, image_size) if image_size else (images, 1280)
    img = torch.randn(shape, device=device, requires_grad=True)
    txt = torch.randn(images, 384, device=device, requires_grad=True)
    lr = torch.tensor(c.lr_init, device=device, requires_grad=True)
    opts = [torch.optim.SGD([x], lr=1e-3) for x in (img, txt, lr)]

    def iteration(unroll: str = "gram", batch: int = min(c.batch_syn, images)):
        tm_iteration(student, frozen, spec, start, target, img, txt, lr, opts, syn_steps=c.syn_steps,
                     batch=batch, temperature=0.07, min_lr=c.min_lr, gen=torch.Generator().manual_seed(0),
                     unroll=unroll, image_fn=tower)
    iteration.spec, iteration.config = spec, c
    return iteration


def frozen_one(device: torch.device, image_size: int, images: int, repeats: int) -> dict:
    """One ``tm`` iteration (defaults: 20 Gram-unrolled steps) under frozen-pixels at ``image_size``
    (0: the heads cut, feature vectors), in this process: seconds and peak memory."""
    iteration = _tm_problem(device, image_size, images)
    sec, peak, how = _measure(iteration, device, repeats)
    return {"cut": f"frozen-pixels {image_size} px" if image_size else "heads", "images": images,
            "s_per_iteration": round(sec, 3), "peak_gib": round(peak, 3), "memory": how}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def heads_one(device: torch.device, n: int, repeats: int) -> dict:
    """One ``tm`` iteration under heads at ``n`` pairs with the unroll and minibatch ``auto`` picks:
    seconds (fastest of ``repeats``), its matrix products' FLOPs, and their share of the
    operators' self time in one profiled iteration (profiling slows the small operators more, so
    the share is a lower bound): what is left to gain by cutting everything but the products."""
    from torch.profiler import ProfilerActivity, profile

    iteration = _tm_problem(device, 0, n)
    c = iteration.config
    mode, batch = c.unroll_mode("heads", iteration.spec, n), c.unroll_batch(n)
    run = lambda: iteration(mode, batch)  # noqa: E731
    sec, _, _ = _measure(run, device, repeats)
    with _FlopCount() as counter:
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    share = sum(v for k, v in self_us.items() if k in MATMUL_OPS) / max(1e-9, sum(self_us.values()))
    gflop = counter.total / 1e9
    return {"pairs": n, "unroll": mode, "batch": batch, "s_per_iteration": round(sec, 3), "gflop": round(gflop, 2),
            "matmul_share": round(share, 2), "gflop_per_s": round(gflop / sec, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m methods.tm.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--part", choices=("convs", "unroll", "frozen", "heads", "all"), default="all")
    ap.add_argument("--budgets", default="100,1000", help="heads part: synthetic pairs")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--sizes", default="64,112,224", help="frozen part: the image sizes (the heads cut is always measured)")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--modes", default="naive,exact,fd")
    ap.add_argument("--depthwise", default="ours", help="comma list of ours,native (the tower's depthwise convolution)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--autocast", default="off", choices=("off", "bf16"),
                    help="run the unrolled steps' forward in bf16 (timing only: see docs/pixels.md on its gradients)")
    ap.add_argument("--conv-batch", type=int, default=20)
    ap.add_argument("--flops", action="store_true", help="also count each iteration's FLOPs (convolutions and matrix products) and report TFLOP/s")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per unroll configuration (it is then reported as timed out)")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: MODE,STEPS,DEPTHWISE in this process
    ap.add_argument("--one-frozen", type=int, default=None, help=argparse.SUPPRESS)  # internal: IMAGE_SIZE (0 = heads)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.one_frozen is not None:
        print(json.dumps(frozen_one(device, a.one_frozen, a.images, a.repeats)))
        return 0
    if a.one:
        mode, steps, dw = a.one.split(",")
        print(json.dumps(unroll_one(device, mode, int(steps), a.image_size, a.images, a.repeats, dw, a.autocast, a.flops)))
        return 0
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    if a.part in ("convs", "all"):
        size = max(4, a.image_size // 4)
        conv_table(device, a.conv_batch, 144, size, 1)  # warm-up pass (first touch of memory is slow in some VMs)
        out["convs"] = conv_table(device, a.conv_batch, 144, size, max(3, a.repeats))
        print(f"\nconvolutions on {device} (batch {a.conv_batch}, {size}x{size}; ms)")
        print(f"{'layer':36s} {'MMACs':>7s} {'fwd':>8s} {'fwd+bwd':>8s} {'+double':>8s} {'double/fwd':>10s}")
        for r in out["convs"]:
            print(f"{r['layer']:36s} {r['mmacs']:7.1f} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} "
                  f"{r['fwd_bwd_double_ms']:8.2f} {r['double_over_fwd']:10.1f}")
    if a.part in ("unroll", "all"):
        rows = []
        print(f"\nunroll on {device}: {a.images} images at {a.image_size} px, EfficientNet-Lite0 + linear heads")
        print(f"{'mode':6s} {'depthwise':9s} {'steps':>5s} {'s/iter':>8s} {'inner s':>8s} {'peak GiB':>9s}")
        for dw in a.depthwise.split(","):
            for mode in a.modes.split(","):
                for steps in a.steps.split(","):
                    cmd = [sys.executable, "-m", "methods.tm.profile", "--device", a.device, "--one", f"{mode},{steps},{dw}",
                           "--image-size", str(a.image_size), "--images", str(a.images), "--repeats", str(a.repeats),
                           "--autocast", a.autocast] + (["--flops"] if a.flops else [])
                    r = _run_child(cmd, a.timeout, {"mode": mode, "steps": int(steps), "depthwise": dw})
                    rows.append(r)
                    if "error" in r:
                        print(f"{mode:6s} {dw:9s} {steps:>5s} {r['error']}")
                    else:
                        print(f"{mode:6s} {dw:9s} {steps:>5s} {r['s_per_iteration']:8.2f} {r['inner_steps_s']:8.2f} {r['peak_gib']:9.3f}"
                              + (f"  {r['gflop_per_iteration']:.0f} GFLOP, {r['tflops_per_s']:.2f} TFLOP/s" if "tflops_per_s" in r else ""))
                    sys.stdout.flush()
                    out["unroll"] = rows
                    if a.out:  # after every configuration, so a run stopped early keeps what it measured
                        with open(a.out, "w") as f:
                            json.dump(out, f, indent=1)
        out["unroll"] = rows
    if a.part in ("frozen", "all"):
        rows = []
        print(f"\nfrozen-pixels tm iteration on {device}: {a.images} pairs, Gram unroll of 20 steps")
        print(f"{'cut':24s} {'s/iter':>8s} {'peak GiB':>9s}")
        for size in [0] + [int(x) for x in a.sizes.split(",")]:
            cmd = [sys.executable, "-m", "methods.tm.profile", "--device", a.device, "--one-frozen", str(size),
                   "--images", str(a.images), "--repeats", str(a.repeats)]
            r = _run_child(cmd, a.timeout, {"cut": size})
            rows.append(r)
            print(f"{r['cut']!s:24s} {r['error']}" if "error" in r else
                  f"{r['cut']:24s} {r['s_per_iteration']:8.3f} {r['peak_gib']:9.3f}")
            sys.stdout.flush()
        out["frozen"] = rows
    if a.part == "heads":  # not in "all": the pixel parts are what a GPU session measures
        print(f"\ntm iteration under heads on {device} ({torch.get_num_threads()} threads), auto's unroll")
        print(f"{'pairs':>5s} {'unroll':6s} {'batch':>5s} {'s/iter':>7s} {'GFLOP':>6s} {'GFLOP/s':>8s} {'matmul share':>12s}")
        out["heads"] = [heads_one(device, int(n), a.repeats) for n in a.budgets.split(",")]
        for r in out["heads"]:
            print(f"{r['pairs']:5d} {r['unroll']:6s} {r['batch']:5d} {r['s_per_iteration']:7.3f} {r['gflop']:6.2f} "
                  f"{r['gflop_per_s']:8.1f} {r['matmul_share']:12.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
