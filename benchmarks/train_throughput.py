"""Training-step throughput of the aecurves autoencoder, fp32 vs bf16 autocast, and bf16's effect on accuracy.

What it measures
  1. Images/s of one full training step (forward, loss, backward, Adam step) of
     ConvAutoencoder(channels=3, image_size=64, latent_dim=128, width=32) at batch 64, for the
     "mse" and "vgg" losses, in fp32 and in bf16 autocast (aecurves.runtime.autocast).
     The VGG loss uses random VGG16 weights (none can be downloaded here); the layers and
     shapes are those of the real network, so throughput is the same as with ImageNet weights.
  2. The FLOPs of the MSE training step, counted with torch.utils.flop_counter.FlopCounterMode
     on a real forward + loss + backward (FlopCounterMode counts the backward's matmuls and
     convolutions too; the optimizer step and elementwise ops are not counted), the achieved
     GFLOP/s, and that as a fraction of a large fp32 (and bf16) matmul's GFLOP/s on the same device.
  3. With --levers: each lever of the training step alone and together (channels_last batches and kernels, fused
     Adam, torch.compile with --compile), for the endpoint step (train's) and the curve step (train-curve's: a
     3-bend Bezier with fixed ends at a fresh t), fp32 and bf16, timed in interleaved rounds (every configuration
     once per round, so a burst of load hits them all): the median over rounds, and the median and slowest
     per-round ratio to the baseline (contiguous, default Adam: how train and train-curve ran before) and, for the
     curve step, to a DMC-style CurveNet over the same network (benchmarks/dmc_curvenet.py: layer twins mixing
     their bends at every forward, as the paper's curves.py; default Adam). Then the issue's two goals as ratios.
  4. With --breakdown: the profiler's self time per kind of operation (convolutions forward and backward,
     BatchNorm, matmuls, casts, Adam, the rest) of the endpoint step in fp32 and bf16, the curve step and the
     peer's in bf16: where a step's time goes.
  5. With --models: the training step (MSE loss, fp32 and bf16) of each built-in model at the same sizes, the VAEs
     trained as VAEs (their objective with β = 1): ConvAutoencoder, ConvVAE and KLAutoencoder (diffusers'
     AutoencoderKL; its config from --kl-kwargs), in interleaved rounds, each as a ratio to ConvAutoencoder's.
  6. The accuracy check (on by default; --no-accuracy skips it): equal loss after equal steps. From the same
     seed and batches: the endpoint trained in fp32 and bf16, with the baseline and with every lever (and
     compile with --compile), beside a second seed as the noise reference; then the curve between the two
     baseline endpoints, ours with the baseline and with every lever, and the peer's, each measured by θ(0.5)'s
     held-out MSE (BatchNorm recomputed there; all evaluations in fp32).

Run from the repository root:
    python benchmarks/train_throughput.py                                   # CPU, about 4 minutes on 2 cores
    python benchmarks/train_throughput.py --only-levers --levers --compile --breakdown --rounds 9 --lever-steps 4
    python benchmarks/train_throughput.py --device cuda --steps 50 --vgg-steps 20 --levers --compile
    python benchmarks/train_throughput.py --only-levers --models --no-accuracy     # the built-in models' steps
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from aecurves import runtime
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.models import ConvAutoencoder, build_model

ARCH = dict(channels=3, image_size=64, latent_dim=128, width=32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, loss_fn, opt, x, device, precision):
    with runtime.autocast(device, precision):
        loss = loss_fn(model(x), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def time_steps(loss_name, precision, device, batch, warmup, steps):
    """Median seconds per training step."""
    torch.manual_seed(0)
    model = ConvAutoencoder(**ARCH).to(device).train()
    loss_fn = make_loss(loss_name, vgg_weights="random").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, 64, 64, device=device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, loss_fn, opt, x, device, precision)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


MODELS = ("aecurves.models:ConvAutoencoder", "aecurves.models:ConvVAE", "aecurves.models:KLAutoencoder")


def model_stepper(name, precision, device, batch, kl_kwargs):
    """One training step of the built-in model `name` at ARCH's sizes (MSE loss; a VAE's objective with β = 1)."""
    torch.manual_seed(0)
    sizes = {k: ARCH[k] for k in ("channels", "image_size", "latent_dim")}
    width = ARCH["width"] if name != MODELS[2] else None
    arch = {"model": name, "model_kwargs": kl_kwargs if name == MODELS[2] else {}, **sizes, "width": width}
    model = build_model(arch).to(device).train()
    loss_fn = make_loss("mse").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, ARCH["image_size"], ARCH["image_size"], device=device)
    params = sum(p.numel() for p in model.parameters())
    return params, lambda: train_step(model, loss_fn, opt, x, device, precision)


def models_table(device, batch, warmup, steps, rounds, kl_kwargs, precisions):
    """ms per training step of each built-in model in each of `precisions`, median over interleaved rounds."""
    steppers = {}
    for precision in precisions:
        for name in MODELS:
            try:
                params, step = model_stepper(name, precision, device, batch, kl_kwargs)
            except UserError as exc:  # e.g. diffusers not installed: the others are still timed
                print(f"note: {name} left out: {exc}")
                continue
            for _ in range(warmup):
                step()
            steppers[name, precision] = (params, step)
    times = {key: [] for key in steppers}
    for _ in range(rounds):
        for key, (_, step) in steppers.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[key].append((time.perf_counter() - t0) / steps)
    rows = []
    for (name, precision), (params, _) in steppers.items():
        median = statistics.median(times[name, precision])
        base = statistics.median(times[MODELS[0], precision]) if (MODELS[0], precision) in times else float("nan")
        rows.append([name.split(":")[1], precision, f"{params / 1e6:.2f}", f"{median * 1e3:.1f}",
                     f"{batch / median:.1f}", f"{median / base:.2f}"])
    print(f"\nthe built-in models' training step at batch {batch} (MSE; VAEs with their KL), median of {rounds} "
          f"interleaved rounds of {steps} steps; KLAutoencoder kwargs {json.dumps(kl_kwargs)}")
    print(tabulate(rows, headers=["model", "precision", "M params", "ms/step", "images/s",
                                  "x ConvAutoencoder's time"]))


def count_flops(device, batch):
    """(forward FLOPs, forward+backward FLOPs) of the MSE training step, counted in fp32."""
    torch.manual_seed(0)
    model = ConvAutoencoder(**ARCH).to(device).train()
    x = torch.rand(batch, 3, 64, 64, device=device)
    with FlopCounterMode(display=False) as fwd:
        loss = F.mse_loss(model(x), x)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), fwd.get_total_flops() + bwd.get_total_flops()


def matmul_gflops(n, dtype, device, repeats):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------- the training step's levers, alone and together

LEVERS = {  # name -> (memory format of the batches and weights, Adam implementation, torch.compile)
    "baseline (contiguous, default Adam)": ("contiguous", "default", False),
    "channels_last": ("channels_last", "default", False),
    "fused Adam": ("contiguous", "fused", False),
    "channels_last + fused Adam": ("channels_last", "fused", False),
    "channels_last + fused Adam + compile": ("channels_last", "fused", True),
}
PEER = "DMC-style CurveNet (peer)"


def lever_optimizer(params, adam):
    """"default": torch.optim.Adam as train and train-curve built it before (single-tensor on a CPU, for-each on
    CUDA); "fused": aecurves.runtime.adam (fused where torch has the kernel, else for-each), as they build it now."""
    return runtime.adam(params, lr=1e-3) if adam == "fused" else torch.optim.Adam(list(params), lr=1e-3)


def lever_stepper(kind, lever, precision, device, batch):
    """A function that runs one training step of kind "endpoint" (train's step), "curve" (train-curve's: a 3-bend
    Bezier over the same network at a fresh t, fixed ends) or "peer" (the same curve as a DMC-style CurveNet, the
    paper's design: benchmarks/dmc_curvenet.py, default Adam, the loss plus wd/2 * l2 with wd = 0 as the paper's
    train.py adds it) with the lever's settings, set up as the commands set them up."""
    from aecurves.commands.train_curve import base_runner
    from aecurves.curves import Curve

    memory_format, adam, compiled = LEVERS[lever] if kind != "peer" else ("contiguous", "default", False)
    torch.manual_seed(0)
    model = ConvAutoencoder(**ARCH).to(device).train()
    if kind == "peer":
        from dmc_curvenet import CurveNet

        peer = CurveNet(3, True, True, **ARCH)
        peer.import_base(model, 0), peer.import_base(ConvAutoencoder(**ARCH), 2), peer.init_linear()
        peer = peer.to(device).train()
        params, forward = [p for p in peer.parameters() if p.requires_grad], peer
    elif kind == "curve":  # as train-curve runs it: θ(t)'s kernels in the batches' layout, the base call compiled
        curve = Curve(model, "bezier", 3, True, True).to(device).train()
        curve.run_base = runtime.CompiledOrEager(base_runner(curve.base, memory_format), compiled, "base")
        params, forward = [b for b in curve.bends if b.requires_grad], curve
    else:
        if memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        params, forward = list(model.parameters()), runtime.CompiledOrEager(model, compiled, "model")
    opt = lever_optimizer(params, adam)
    x = torch.rand(batch, 3, 64, 64, device=device)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)

    def step():
        with runtime.autocast(device, precision):
            out = forward(x, torch.rand((), generator=gen).item()) if kind != "endpoint" else forward(x)
            loss = F.mse_loss(out, x)
            if kind == "peer":
                loss = loss + 0.5 * 0.0 * forward.l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_rounds(steppers, device, steps, rounds):
    """{name: [median step seconds of each round]}: every configuration timed once per round, in turn, so a
    burst of load hits all of them."""
    per_round = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            times = []
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
    return per_round


def levers_table(device, batch, warmup, steps, rounds, compile_too, step_flops, mm):
    """Each lever's step time in interleaved rounds: per configuration the median over rounds of its median step,
    and the median and the smallest of its per-round ratios to the baseline of the same round (and, for the
    curve step, to the DMC-style peer). Returns {(kind, precision, name): per-round seconds}."""
    rows, measured = [], {}
    for kind in ("endpoint", "curve"):
        for precision in ("fp32", "bf16"):
            levers = [name for name, (_, _, compiled) in LEVERS.items() if compile_too or not compiled]
            configs = [(kind, name) for name in levers] + ([("peer", PEER)] if kind == "curve" else [])
            steppers, notes = {}, {}
            for config_kind, name in configs:
                try:
                    steppers[name] = lever_stepper(config_kind, name, precision, device, batch)
                    compiles = config_kind != "peer" and LEVERS[name][2]
                    for _ in range(warmup + 2 * compiles):  # compiling happens in the first steps
                        steppers[name]()
                except Exception as exc:  # e.g. torch.compile without a working compiler
                    notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
                    steppers.pop(name, None)
            per_round = time_rounds(steppers, device, steps, rounds)
            base, peer = per_round.get(levers[0]), per_round.get(PEER)
            for _, name in configs:
                if name not in per_round:
                    rows.append([kind, precision, name, "-", "-", "-", "-", "-", "-", "-", notes[name]])
                    continue
                measured[kind, precision, name] = per_round[name]
                sec = statistics.median(per_round[name])
                peak = mm[torch.bfloat16 if precision == "bf16" else torch.float32]
                row = [kind, precision, name, f"{sec * 1e3:.1f}", f"{batch / sec:.0f}"]
                for ref in (base, peer):
                    ratios = [r / t for r, t in zip(ref, per_round[name])] if ref else []
                    row += [f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}x"] if ratios else ["-", "-"]
                rows.append(row + [f"{step_flops / sec / 1e9 / peak:.2f}", ""])
    print(f"\nlevers: {rounds} interleaved rounds of {steps} timed steps per configuration, after {warmup} warm-up "
          "steps; ratios are per round (reference time / this time): median and slowest round; the fraction of the "
          "matmul rate counts the network's FLOPs (the same in the curve step: mixing the bends is elementwise)")
    print(tabulate(rows, headers=["step", "precision", "lever", "ms/step", "images/s", "vs baseline", "slowest",
                                  "vs peer", "slowest", "of matmul rate", "note"]))
    return measured


def print_goals(measured):
    """The issue's two goals from the lever rounds: bf16 curve step (all levers) vs the peer's bf16 step, and
    the bf16 endpoint step vs the fp32 one (same levers), each as the median and slowest per-round ratio."""
    def ratio(slow, fast):
        if slow not in measured or fast not in measured:
            return None
        r = [a / b for a, b in zip(measured[slow], measured[fast])]
        return statistics.median(r), min(r)

    best = [name for name in LEVERS if ("curve", "bf16", name) in measured][-1:]
    print()
    for name in best:
        got = ratio(("curve", "bf16", PEER), ("curve", "bf16", name))
        if got:
            print(f"goal: bf16 curve step ({name}) vs the DMC-style peer's bf16 step: {got[0]:.2f}x median, "
                  f"{got[1]:.2f}x slowest round (goal: >= 2.5x, slowest >= 2.0x)")
    for name in LEVERS:
        got = ratio(("endpoint", "fp32", name), ("endpoint", "bf16", name))
        if got:
            print(f"goal: bf16 endpoint step vs fp32, both {name}: {got[0]:.2f}x median, {got[1]:.2f}x slowest round "
                  "(goal: >= 2.0x)")


# ---------------------------------------------------------------- where a step's time goes

CATEGORIES = (  # (category, substrings of the aten op names it holds), first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d", "conv_transpose")),
    ("BatchNorm", ("batch_norm",)),
    ("matmul (the Linears)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("casts and copies", ("copy_", "_to_copy", "aten::to", "contiguous", "clone")),
    ("Adam", ("adam", "foreach", "Optimizer")),
)


def breakdown(device, batch, steps, configs):
    """Self time per step by kind of operation (torch.profiler), for each (label, kind, lever, precision): why a
    step is as fast as it is. The categories are CATEGORIES; what matches none is 'other (elementwise...)'."""
    from torch.profiler import ProfilerActivity, profile

    columns = {}
    for label, kind, lever, precision in configs:
        step = lever_stepper(kind, lever, precision, device, batch)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use cost, not counted
            step()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) \
                as prof:
            for _ in range(steps):
                step()
            sync(device)
        spent = {}
        for event in prof.key_averages():
            if not event.key.startswith("aten::") and "Optimizer" not in event.key:
                continue
            name = next((c for c, keys in CATEGORIES if any(k in event.key for k in keys)), "other (elementwise...)")
            own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
            spent[name] = spent.get(name, 0.0) + own / 1e3 / steps
        columns[label] = spent
    names = [c for c, _ in CATEGORIES] + ["other (elementwise...)"]
    rows = [[name] + [f"{columns[label].get(name, 0.0):.1f}" for label in columns] for name in names]
    rows.append(["total"] + [f"{sum(columns[label].values()):.1f}" for label in columns])
    clock = "GPU kernel" if device.type == "cuda" else "CPU"
    print(f"\nwhere the time goes: profiler self {clock} time, ms per step (mean of {steps} steps; profiling adds a "
          "little)")
    print(tabulate(rows, headers=["operation"] + list(columns)))
    return columns


# ---------------------------------------------------------------- bf16 accuracy check

def smooth_images(n, seed):
    """Smooth random RGB images in [0, 1]: bilinearly upsampled 4x4 and 8x8 noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=64, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=64, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1)


def accuracy_data(n=512, celeba_dir=None):
    """(train, test, description): the real CelebA images in `celeba_dir` when given (their first n), else aecurves'
    synthetic data set if available, else smooth random images. The image cache goes to a temporary folder."""
    try:
        from aecurves.data import load_data

        with tempfile.TemporaryDirectory() as tmp:
            if celeba_dir:
                data = load_data("celeba", data_dir=celeba_dir, image_size=64, limit=n, cache_dir=tmp, progress=False)
                train, test = data.train.float().div(255), data.test.float().div(255)
                return train, test, f"CelebA, {celeba_dir}: the first {n} images, {len(train)} train, {len(test)} test"
            data = load_data("synthetic", limit=n, cache_dir=tmp)
        train, test = (t.float().div(255) if t.dtype == torch.uint8 else t.float() for t in (data.train, data.test))
        if train.shape[1:] != (3, 64, 64) or test.shape[1:] != (3, 64, 64) or len(test) == 0:
            raise ValueError(f"unexpected shapes {tuple(train.shape)}, {tuple(test.shape)}")
        return train, test, f'aecurves.data.load_data("synthetic", limit={n}): {len(train)} train, {len(test)} test'
    except Exception as exc:  # no data module yet, or a different interface
        images = smooth_images(n, seed=1234)
        n_test = n // 8
        why = f"{type(exc).__name__}: {exc}"
        return (images[n_test:], images[:n_test],
                f"smooth random images (aecurves.data unusable: {why}): {n - n_test} train, {n_test} test")


def batches_of(train, steps, batch, seed):
    """The same `steps` batch indices for every run of a seed: reshuffled each time the data runs out."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(train), generator=g)
        idx, order = order[:batch], order[batch:]
        yield train[idx]


def as_lever(x, memory_format):
    return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x


def train_and_eval(train, test, precision, seed, steps, batch, lr, device, lever=None):
    """(held-out MSE in fp32, the model) after `steps` endpoint steps with a lever's settings (default: baseline)."""
    memory_format, adam, compiled = LEVERS[lever or next(iter(LEVERS))]
    torch.manual_seed(seed)
    model = ConvAutoencoder(**ARCH).to(device).train()
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    forward = runtime.CompiledOrEager(model, compiled, "model")
    opt = runtime.adam(model.parameters(), lr) if adam == "fused" else torch.optim.Adam(model.parameters(), lr=lr)
    for x in batches_of(train, steps, batch, seed):
        x = as_lever(x.to(device), memory_format)
        with runtime.autocast(device, precision):
            loss = F.mse_loss(forward(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # evaluation in fp32, no autocast
        x = test.to(device)
        return F.mse_loss(model(x), x).item(), model


def curve_midpoint_mse(train, test, a, b, kind, lever, precision, steps, batch, lr, device):
    """Held-out MSE (fp32) of θ(0.5) after `steps` curve steps between endpoints a and b (3-bend Bezier, fixed ends,
    the same batches and t for every run), BN statistics recomputed there on 512 training images."""
    from aecurves.commands.train_curve import base_runner
    from aecurves.curves import Curve, recompute_bn

    memory_format, adam, compiled = LEVERS[lever] if kind == "curve" else ("contiguous", "default", False)
    torch.manual_seed(0)
    if kind == "curve":
        net = Curve(ConvAutoencoder(**ARCH), "bezier", 3, True, True)
        net.set_endpoints(a.state_dict(), b.state_dict())
        net.init_linear()
        net = net.to(device).train()
        net.run_base = runtime.CompiledOrEager(base_runner(net.base, memory_format), compiled, "base")
        params = [p for p in net.bends if p.requires_grad]
    else:
        from dmc_curvenet import CurveNet

        net = CurveNet(3, True, True, **ARCH)
        net.import_base(a, 0), net.import_base(b, 2), net.init_linear()
        net = net.to(device).train()
        params = [p for p in net.parameters() if p.requires_grad]
    opt = runtime.adam(params, lr) if adam == "fused" else torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    for x in batches_of(train, steps, batch, 0):
        x = as_lever(x.to(device), memory_format)
        with runtime.autocast(device, precision):
            loss = F.mse_loss(net(x, torch.rand((), generator=gen).item()), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mid = ConvAutoencoder(**ARCH).to(device)
    with torch.no_grad():
        if kind == "curve":
            mid.load_state_dict({**mid.state_dict(), **net.weights(0.5)})
        else:
            coeffs = net.coeff_layer(torch.tensor(0.5, device=device))
            values = [w for twin in net.net.twins() for w in twin.compute_weights_t(coeffs)]
            for p, v in zip(mid.parameters(), values, strict=True):
                p.copy_(v)
    recompute_bn(mid, dict(mid.named_parameters()), train[:512].to(device).split(batch))
    mid.eval()
    with torch.no_grad():
        x = test.to(device)
        return F.mse_loss(mid(x), x).item()


def accuracy_check(args, device):
    """Equal loss after equal steps: each lever (and bf16) against the baseline from the same seed and batches,
    beside the seed-to-seed spread as the noise reference; for the endpoint and for the curve step (whose
    endpoints are the two baseline fp32 endpoints trained first)."""
    t0 = time.perf_counter()
    train, test, source = accuracy_data(args.acc_images, args.acc_celeba)
    levers = [name for name, (_, _, compiled) in LEVERS.items() if args.compile or not compiled]
    base, best = levers[0], levers[-1]
    print(f"\naccuracy check: mse loss, {args.acc_steps} endpoint steps and {args.acc_curve_steps} curve steps at "
          f"batch {args.batch_size}, lr {args.lr}, test MSE evaluated in fp32\ndata: {source}")
    runs = [("fp32", base, 0), ("bf16", base, 0), ("fp32", best, 0), ("bf16", best, 0), ("fp32", base, 1)]
    rows, mse, models = [], {}, {}
    for precision, lever, seed in runs:
        mse[precision, lever, seed], models[precision, lever, seed] = train_and_eval(
            train, test, precision, seed, args.acc_steps, args.batch_size, args.lr, device, lever)
    ref = mse["fp32", base, 0]
    for (precision, lever, seed), value in mse.items():
        rows.append(["endpoint", f"{precision}, {lever}, seed {seed}" + (" (noise reference)" if seed else ""),
                     f"{value:.6f}", f"{(value - ref) / ref:+.1%}"])
    a, b = models["fp32", base, 0], models["fp32", base, 1]
    curve_runs = [("curve", "fp32", base), ("curve", "bf16", base), ("curve", "fp32", best), ("curve", "bf16", best),
                  ("peer", "fp32", PEER), ("peer", "bf16", PEER)]
    curve_ref = None
    for kind, precision, lever in curve_runs:
        value = curve_midpoint_mse(train, test, a, b, kind, lever, precision, args.acc_curve_steps, args.batch_size,
                                   args.lr, device)
        curve_ref = value if curve_ref is None else curve_ref
        rows.append([f"{kind} θ(0.5)", f"{precision}, {lever}", f"{value:.6f}",
                     f"{(value - curve_ref) / curve_ref:+.1%}"])
    print(tabulate(rows, headers=["step", "run", "test MSE", "vs first row of its step"]))
    print(f"seed-to-seed spread of the endpoint: {abs(mse['fp32', base, 1] - ref) / ref:.1%} (a lever's difference "
          "below it is noise)")
    print(f"(accuracy part took {time.perf_counter() - t0:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=runtime.DEVICES)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (mse)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (mse)")
    p.add_argument("--vgg-warmup", type=int, default=1, help="untimed steps before timing (vgg)")
    p.add_argument("--vgg-steps", type=int, default=5, help="timed steps (vgg; slow on CPU)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--check-bf16-accuracy", dest="accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="train fp32 vs bf16 and compare test MSE (default: on)")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="same as --no-check-bf16-accuracy")
    p.add_argument("--acc-steps", type=int, default=150, help="endpoint training steps per accuracy run")
    p.add_argument("--acc-curve-steps", type=int, default=60, help="curve training steps per accuracy run")
    p.add_argument("--acc-celeba", metavar="DIR", help="run the accuracy check on the real CelebA images in DIR (e.g. "
                   "../shared/data/celeba-sample) instead of synthetic ones")
    p.add_argument("--acc-images", type=int, default=512, help="images for the accuracy check (train and test)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--levers", action="store_true", help="also time each lever of the endpoint and the curve step "
                   "(channels_last, fused Adam, together; with --compile, torch.compile on top), fp32 and bf16")
    p.add_argument("--compile", action="store_true", help="with --levers: include torch.compile")
    p.add_argument("--rounds", type=int, default=7, help="with --levers: interleaved rounds")
    p.add_argument("--breakdown", action="store_true", help="also profile the endpoint step (fp32, bf16), the curve "
                   "step and the DMC-style peer's (bf16) and print the time per kind of operation")
    p.add_argument("--only-levers", action="store_true", help="skip the first throughput table (with --levers or "
                   "--breakdown)")
    p.add_argument("--lever-steps", type=int, default=3, help="with --levers: timed steps per configuration and round")
    p.add_argument("--models", action="store_true", help="also time each built-in model's training step (ConvVAE, "
                   "KLAutoencoder beside ConvAutoencoder)")
    p.add_argument("--kl-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="with --models: KLAutoencoder's --model-kwargs (default: its own defaults)")
    p.add_argument("--model-precisions", default="fp32,bf16", help="with --models: comma-separated precisions "
                   "(fp32 alone on a CPU without bf16 units, where bf16 steps take many times longer)")
    args = p.parse_args()

    device = runtime.resolve_device(args.device)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"CPU has AVX512-BF16/AMX: {runtime.cpu_has_fast_bf16()}"
          + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"\nload average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other processes skew CPU timings)")
    print(f"model ConvAutoencoder({', '.join(f'{k}={v}' for k, v in ARCH.items())}), batch {args.batch_size}, "
          "Adam; one step = forward + loss + backward + optimizer step")
    print("vgg loss uses RANDOM VGG16 weights (no download possible here); throughput is the same as with real weights")

    fwd_flops, step_flops = count_flops(device, args.batch_size)
    print(f"\nFlopCounterMode, MSE step at batch {args.batch_size}: forward {fwd_flops / 1e9:.2f} GFLOP, "
          f"forward+backward {step_flops / 1e9:.2f} GFLOP (matmuls/convs only) -> using forward+backward")

    mm = {dt: matmul_gflops(args.matmul_n, dt, device, args.matmul_repeats) for dt in (torch.float32, torch.bfloat16)}
    n = args.matmul_n
    print(f"matmul {n}x{n} @ {n}x{n} (2n^3 FLOPs, median of {args.matmul_repeats}): "
          f"fp32 {mm[torch.float32]:.1f} GFLOP/s, bf16 {mm[torch.bfloat16]:.1f} GFLOP/s")

    if not args.only_levers:
        rows, secs = [], {}
        for loss_name in ("mse", "vgg"):
            warmup, steps = (args.warmup, args.steps) if loss_name == "mse" else (args.vgg_warmup, args.vgg_steps)
            for precision in ("fp32", "bf16"):
                s = time_steps(loss_name, precision, device, args.batch_size, warmup, steps)
                secs[loss_name, precision] = s
                row = [loss_name, precision, f"{s * 1e3:.1f}", f"{args.batch_size / s:.1f}"]
                if loss_name == "mse":
                    gflops = step_flops / s / 1e9
                    row += [f"{gflops:.1f}", f"{gflops / mm[torch.float32]:.3f} of fp32 mm"
                            + (f", {gflops / mm[torch.bfloat16]:.3f} of bf16 mm" if precision == "bf16" else "")]
                else:
                    row += ["-", "-"]
                rows.append(row + [f"{warmup}+{steps}"])
        print()
        print(tabulate(rows, headers=["loss", "precision", "ms/step", "images/s", "GFLOP/s", "fraction of matmul",
                                      "warmup+timed"]))
        print()
        for loss_name in ("mse", "vgg"):
            print(f"bf16/fp32 speed-up, {loss_name}: {secs[loss_name, 'fp32'] / secs[loss_name, 'bf16']:.2f}x")
        print(f"(throughput part took {time.perf_counter() - start:.0f} s)")
    if args.breakdown:
        best = "channels_last + fused Adam"
        breakdown(device, args.batch_size, 5, [("endpoint fp32", "endpoint", best, "fp32"),
                                               ("endpoint bf16", "endpoint", best, "bf16"),
                                               ("curve bf16", "curve", best, "bf16"),
                                               ("peer bf16", "peer", PEER, "bf16")])
    if args.levers:
        t0 = time.perf_counter()
        print_goals(levers_table(device, args.batch_size, args.warmup, args.lever_steps, args.rounds, args.compile,
                                 step_flops, mm))
        print(f"(levers took {time.perf_counter() - t0:.0f} s)")

    if args.models:
        t0 = time.perf_counter()
        models_table(device, args.batch_size, args.warmup, args.lever_steps, args.rounds, args.kl_kwargs,
                     args.model_precisions.split(","))
        print(f"(models took {time.perf_counter() - t0:.0f} s)")
    if args.accuracy:
        accuracy_check(args, device)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
