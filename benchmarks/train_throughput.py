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
  3. With --check-bf16-accuracy (the default; --no-accuracy skips it): trains the model with the
     MSE loss in fp32 and in bf16 autocast from the same seed on the same data, and a second fp32
     run with another seed as a noise reference, and prints the held-out test MSE of each
     (evaluated in fp32).

Run from the repository root:
    .venv/bin/python benchmarks/train_throughput.py                 # CPU, about 3-4 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --device cuda --steps 50 --vgg-steps 20
    .venv/bin/python benchmarks/train_throughput.py --no-accuracy   # throughput only
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from aecurves import runtime
from aecurves.losses import make_loss
from aecurves.models import ConvAutoencoder

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
    "baseline (contiguous, Adam for-each)": ("contiguous", "foreach", False),
    "channels_last": ("channels_last", "foreach", False),
    "fused Adam": ("contiguous", "fused", False),
    "channels_last + fused Adam": ("channels_last", "fused", False),
    "channels_last + fused Adam + compile": ("channels_last", "fused", True),
}


def lever_stepper(kind, lever, precision, device, batch):
    """A function that runs one endpoint step (kind "endpoint") or one curve step (kind "curve": a 3-bend Bezier
    over the same network at a fresh t, as train-curve does) with the lever's settings."""
    from aecurves.curves import Curve

    memory_format, adam, compiled = LEVERS[lever]
    torch.manual_seed(0)
    model = ConvAutoencoder(**ARCH).to(device).train()
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if kind == "curve":
        curve = Curve(model, "bezier", 3, True, True).to(device).train()
        params, forward = [b for b in curve.bends if b.requires_grad], curve
    else:
        params, forward = list(model.parameters()), model
    if compiled:
        forward = torch.compile(forward)
    opt = torch.optim.Adam(params, lr=1e-3, **({"fused": True} if adam == "fused" else {"foreach": True}))
    x = torch.rand(batch, 3, 64, 64, device=device)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)

    def step():
        with runtime.autocast(device, precision):
            out = forward(x, torch.rand((), generator=gen).item()) if kind == "curve" else forward(x)
            loss = F.mse_loss(out, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def levers_table(device, batch, warmup, steps, rounds, compile_too, step_flops, mm):
    """Each lever's step time in interleaved rounds (every configuration timed once per round, so a burst of
    load hits all of them): per configuration the median over rounds of its median step, and the median and
    the smallest of its per-round ratios to the baseline of the same round."""
    rows = []
    for kind in ("endpoint", "curve"):
        for precision in ("fp32", "bf16"):
            levers = [name for name, (_, _, compiled) in LEVERS.items() if compile_too or not compiled]
            steppers, notes = {}, {}
            for name in levers:
                try:
                    steppers[name] = lever_stepper(kind, name, precision, device, batch)
                    for _ in range(warmup + 2 * LEVERS[name][2]):  # compiling happens in the first steps
                        steppers[name]()
                except Exception as exc:  # e.g. torch.compile without a working compiler
                    notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
                    steppers.pop(name, None)
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
            base = per_round.get(levers[0])
            for name in levers:
                if name not in per_round:
                    rows.append([kind, precision, name, "-", "-", "-", "-", "-", notes[name]])
                    continue
                sec = statistics.median(per_round[name])
                ratios = [b / t for b, t in zip(base, per_round[name])] if base else []
                peak = mm[torch.bfloat16 if precision == "bf16" else torch.float32]
                rows.append([kind, precision, name, f"{sec * 1e3:.1f}", f"{batch / sec:.0f}",
                             f"{statistics.median(ratios):.2f}x" if ratios else "-",
                             f"{min(ratios):.2f}x" if ratios else "-", f"{step_flops / sec / 1e9 / peak:.2f}", ""])
    print(f"\nlevers: {rounds} interleaved rounds of {steps} timed steps per configuration, after {warmup} warm-up steps")
    print(tabulate(rows, headers=["step", "precision", "lever", "ms/step", "images/s", "vs baseline (median)",
                                  "slowest round", "of matmul rate", "note"]))


# ---------------------------------------------------------------- bf16 accuracy check

def smooth_images(n, seed):
    """Smooth random RGB images in [0, 1]: bilinearly upsampled 4x4 and 8x8 noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=64, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=64, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1)


def accuracy_data(n=512):
    """(train, test, description): aecurves' synthetic data set if available, else smooth random images."""
    try:
        from aecurves.data import load_data

        with tempfile.TemporaryDirectory() as tmp:
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


def train_and_eval(train, test, precision, seed, steps, batch, lr, device):
    torch.manual_seed(seed)
    model = ConvAutoencoder(**ARCH).to(device).train()
    loss_fn = make_loss("mse")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(train), generator=g)
        idx, order = order[:batch], order[batch:]
        train_step(model, loss_fn, opt, train[idx].to(device), device, precision)
    model.eval()
    with torch.no_grad():  # evaluation in fp32, no autocast
        x = test.to(device)
        return F.mse_loss(model(x), x).item()


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
    p.add_argument("--acc-steps", type=int, default=150, help="training steps per accuracy run")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--levers", action="store_true", help="also time each lever of the endpoint and the curve step "
                   "(channels_last, fused Adam, together; with --compile, torch.compile on top), fp32 and bf16")
    p.add_argument("--compile", action="store_true", help="with --levers: include torch.compile")
    p.add_argument("--rounds", type=int, default=7, help="with --levers: interleaved rounds")
    p.add_argument("--lever-steps", type=int, default=3, help="with --levers: timed steps per configuration and round")
    args = p.parse_args()

    device = runtime.resolve_device(args.device)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"CPU has AVX512-BF16/AMX: {runtime.cpu_has_fast_bf16()}"
          + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"\nload average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes skew CPU timings)")
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

    rows, secs = [], {}
    for loss_name in ("mse", "vgg"):
        warmup, steps = (args.warmup, args.steps) if loss_name == "mse" else (args.vgg_warmup, args.vgg_steps)
        for precision in ("fp32", "bf16"):
            s = secs[loss_name, precision] = time_steps(loss_name, precision, device, args.batch_size, warmup, steps)
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
    if args.levers:
        t0 = time.perf_counter()
        levers_table(device, args.batch_size, args.warmup, args.lever_steps, args.rounds, args.compile, step_flops, mm)
        print(f"(levers took {time.perf_counter() - t0:.0f} s)")

    if args.accuracy:
        t0 = time.perf_counter()
        train, test, source = accuracy_data()
        print(f"\nbf16 accuracy check: mse loss, {args.acc_steps} steps at batch {args.batch_size}, lr {args.lr}, "
              f"test MSE evaluated in fp32\ndata: {source}")
        fp32 = train_and_eval(train, test, "fp32", 0, args.acc_steps, args.batch_size, args.lr, device)
        bf16 = train_and_eval(train, test, "bf16", 0, args.acc_steps, args.batch_size, args.lr, device)
        fp32_b = train_and_eval(train, test, "fp32", 1, args.acc_steps, args.batch_size, args.lr, device)
        print(tabulate([["fp32, seed 0", f"{fp32:.6f}"], ["bf16, seed 0", f"{bf16:.6f}"],
                        ["fp32, seed 1 (noise reference)", f"{fp32_b:.6f}"]], headers=["run", "test MSE"]))
        print(f"|bf16 - fp32| (same seed)   = {abs(bf16 - fp32):.6f} ({abs(bf16 - fp32) / fp32:.1%})")
        print(f"|fp32 seed 1 - fp32 seed 0| = {abs(fp32_b - fp32):.6f} ({abs(fp32_b - fp32) / fp32:.1%})  <- seed noise")
        print(f"(accuracy part took {time.perf_counter() - t0:.0f} s)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
