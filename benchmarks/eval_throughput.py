"""Throughput of the evaluation engine (aecurves.metrics.evaluate_points) by points per call, precision and
memory format, and the cost of SSIM.

What it measures
  1. Images/s of the engine on the 64x64 model (ConvAutoencoder, latent 128, width 32) along a straight
     segment between two random networks: at every point BatchNorm statistics recomputed from --images
     training images, then the metrics (loss, MSE, PSNR, SSIM) on those images and on --images held-out
     ones, batch 256, as eval-curve does. One image counts once per pass (BN, train, test) and per point.
     Every configuration evaluates the same --points points, 1, 2, 4, 8 and 16 per call, in fp32 and bf16
     autocast, in the default memory format and channels_last. Each row gives the ratio to one point per
     call in fp32, and the largest relative deviation of its test losses from that baseline's.
  2. The model's forward FLOPs per image (torch.utils.flop_counter, as benchmarks/train_throughput.py counts
     them) and what the fastest fp32 row's images/s make of them: the engine's GFLOP/s, as a fraction of a
     2048x2048 fp32 matmul's on the same device, to say how close to the hardware's limit one point per call
     already runs.
  3. SSIM of 256 images of 64x64: aecurves.ssim.ssim_per_image against torchmetrics'
     structural_similarity_index_measure (when installed: pip install -e ".[test]"), median of 7 runs.

Images are random pixels (throughput does not depend on them). Run from the repository root, on an idle
machine (on 2 cores two heavy jobs at once ruin both timings):
    .venv/bin/python benchmarks/eval_throughput.py                      # CPU: about 10 minutes on 2 cores
    .venv/bin/python benchmarks/eval_throughput.py --device cuda --points 32 --images 2048
    .venv/bin/python benchmarks/eval_throughput.py --per-call 1 4 --precision fp32 --formats default
"""

import argparse
import statistics
import time

import numpy as np
import torch
from tabulate import tabulate
from train_throughput import count_flops, matmul_gflops  # the same counting as the training benchmark

from aecurves import runtime
from aecurves.curves import make_segment
from aecurves.data import BatchLoader
from aecurves.losses import make_loss
from aecurves.metrics import evaluate_points
from aecurves.models import ConvAutoencoder
from aecurves.ssim import ssim_per_image

ARCH = dict(channels=3, image_size=64, latent_dim=128, width=32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def segment_on(device: torch.device):
    torch.manual_seed(0)
    a, b = ConvAutoencoder(**ARCH), ConvAutoencoder(**ARCH)
    segment = make_segment(ConvAutoencoder(**ARCH), a.state_dict(), b.state_dict()).to(device)
    return segment


def run_engine(args, device, per_call: int, precision: str, channels_last: bool) -> tuple[float, list]:
    """(seconds, test losses) of evaluating --points points of the segment."""
    segment = segment_on(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2 * args.images, 3, 64, 64), dtype=torch.uint8, generator=gen)
    train = BatchLoader(images[: args.images], 256, device, channels_last=channels_last)
    test = BatchLoader(images[args.images:], 256, device, channels_last=channels_last)
    loss_fn = make_loss("mse").to(device)
    ts = np.linspace(0.0, 1.0, args.points).tolist()

    def once(points):
        with runtime.autocast(device, precision):
            return evaluate_points(segment.base, segment.unflatten, segment.flat_at, points, train, test, loss_fn,
                                   bn_loader=train, ssim=True, points_per_call=per_call)

    if args.warmup:  # one untimed call: allocations, cuDNN's choice of algorithms
        once(ts[:per_call])
    sync(device)
    t0 = time.perf_counter()
    rows = once(ts)
    sync(device)
    return time.perf_counter() - t0, [r["te"]["loss"] for r in rows]


def bench_engine(args, device) -> None:
    images_per_run = 3 * args.images * args.points  # BN pass, train metrics, test metrics, at every point
    rows, base_seconds, base_losses, fp32_rates = [], None, None, []
    for fmt in args.formats:
        for precision in args.precision:
            for per_call in args.per_call:
                seconds, losses = run_engine(args, device, per_call, precision, fmt == "channels_last")
                if base_seconds is None:  # the first configuration is the baseline: keep it fp32, 1, default
                    base_seconds, base_losses = seconds, losses
                deviation = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
                if precision == "fp32":
                    fp32_rates.append(images_per_run / seconds)
                rows.append([fmt, precision, per_call, f"{seconds:.1f}", f"{images_per_run / seconds:.0f}",
                             f"{base_seconds / seconds:.2f}", f"{deviation:.1e}"])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    print(f"\nengine on {device} ({torch.get_num_threads()} threads): {args.points} points, {args.images} BN/train "
          f"and {args.images} test images per point, batch 256, SSIM on; ratio and deviation are against the "
          f"first row")
    print(tabulate(rows, ["format", "precision", "points/call", "seconds", "images/s", "ratio",
                          "max rel. dev. of test loss"], tablefmt="github"))
    if fp32_rates:
        flops = count_flops(device, 16)[0] / 16
        peak = matmul_gflops(2048, torch.float32, device, 5)
        rate = max(fp32_rates) * flops / 1e9
        print(f"\nforward pass: {flops / 1e6:.0f} MFLOP per image (matmuls and convolutions); at the fastest fp32 "
              f"row's {max(fp32_rates):.0f} images/s the forward passes alone run at {rate:.0f} GFLOP/s, "
              f"{rate / peak:.2f} of a 2048x2048 fp32 matmul's {peak:.0f} GFLOP/s on {device} (BatchNorm's "
              f"statistics, the losses and SSIM take the rest of the time)")


def bench_ssim(device, n: int = 256) -> None:
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        print("\nSSIM: torchmetrics is not installed (pip install -e \".[test]\"), so it is not compared")
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 64, 64, generator=gen).to(device)
    recon = (x + 0.1 * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1)
    ways = {"torchmetrics": lambda: structural_similarity_index_measure(recon, x, data_range=1.0, reduction="none"),
            "aecurves": lambda: ssim_per_image(recon, x)}
    times = {name: [] for name in ways}
    for _ in range(7):
        for name, fn in ways.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    tm, ours = (statistics.median(times[n]) for n in ("torchmetrics", "aecurves"))
    diff = (ways["torchmetrics"]() - ways["aecurves"]()).abs().max().item()
    print(f"\nSSIM of {n} 64x64 images on {device}: torchmetrics {tm:.3f} s, aecurves {ours:.3f} s "
          f"({tm / ours:.1f}x faster), largest difference {diff:.1e} (medians of 7)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--points", type=int, default=16, help="points evaluated by every configuration")
    parser.add_argument("--images", type=int, default=256, help="BN/train images, and test images, per point")
    parser.add_argument("--per-call", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--formats", nargs="+", default=["default", "channels_last"],
                        choices=["default", "channels_last"])
    parser.add_argument("--ssim-images", type=int, default=256, help="64x64 images in the SSIM comparison")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed first call of each configuration")
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    bench_engine(args, device)
    bench_ssim(device, args.ssim_images)


if __name__ == "__main__":
    main()
