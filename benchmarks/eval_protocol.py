"""How far eval-curve's subset protocol is from `--full`, and what it saves.

At each of `--points` values of t along each curve, the full protocol (BatchNorm statistics and train
metrics from every training image) is compared with the subset protocol (both from the same n images):

- fixed: the subset eval-curve uses (config.SUBSET_SEED), for each n of --sizes below this data's size.
  This is the deviation a user of this data gets.
- resampled: --resamples subsets of n images drawn WITH replacement from the training images. That samples
  the images' distribution the way a subset of a much larger set does, so it estimates the deviation at
  CelebA scale (162,770 training images), where n is a far smaller share of the set than here (a subset of
  a set barely larger than itself deviates less than one of a large set). The deviation of a random subset
  is a mean over n images, so its spread is c/sqrt(n); c is fitted per point from all resamples of all
  sizes, pooled as c² = mean(n·deviation²), and the script prints 3c/sqrt(n): the deviation that a fixed
  subset of n exceeds about 3 times in 1000.

The train subset of eval-curve is stratified by the start endpoint's per-image MSE (metrics.stratified_subset);
its deviation is measured the same way at --strat-sizes (well below this data's size, so that each stratum
holds several images), with the BN subset drawn at random as above.

The cost ratio counts the images each point costs, BN pass plus train-metric pass (the held-out pass is the
same in both): 2N for --full, n_bn + n_train for the subsets (plus, for the stratified subset, one pass over
the N training images per evaluation, which docs/performance.md adds for 61 points).

    python benchmarks/eval_protocol.py --ckpt CURVE.pt [--ckpt ...] [--limit 4000] [--points 0,0.25,0.5]

Data: the curves' own dataset, with --limit overriding theirs (a larger full set is a better reference).
"""

import argparse
import json
import time

import numpy as np
import torch

from aecurves.checkpoint import load_curve
from aecurves.config import EVAL_BATCH_SIZE, SUBSET_SEED
from aecurves.curves import CurvePoint, segment_of
from aecurves.data import BatchLoader, load_data
from aecurves.metrics import fixed_subset, per_image_mse, stratified_subset

CELEBA_TRAIN = 162_770


def measure(curve, t, bn_images, train_images, test_images):
    """(held-out MSE, train MSE) at t, BN statistics from `bn_images`, the train metric over `train_images`."""
    curve.update_bn(BatchLoader(bn_images, EVAL_BATCH_SIZE, "cpu"), t)
    point = CurvePoint(curve, t)
    return tuple(per_image_mse(point, BatchLoader(images, EVAL_BATCH_SIZE, "cpu")).double().mean().item()
                 for images in (test_images, train_images))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="curve checkpoint of an mse curve (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="images to load (default: the curve's own --limit)")
    p.add_argument("--points", default="0,0.25,0.5", help="values of t (default: 0,0.25,0.5)")
    p.add_argument("--sizes", default="1024,4096", help="subset sizes n measured (default: 1024,4096)")
    p.add_argument("--resamples", type=int, default=6, help="random subsets per size and curve (default: 6)")
    p.add_argument("--project", default="1024,2048,4096,8192,16384", help="n to project the deviation to")
    p.add_argument("--strat-sizes", default="512,1024",
                   help="n for the stratified train subset (must be well below this data's size; default 512,1024)")
    p.add_argument("--segments", action="store_true",
                   help="measure the straight segment between each curve's ends instead of the curve")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    project = [int(s) for s in args.project.split(",")]
    ts = [float(t) for t in args.points.split(",")]
    strat_sizes = [int(s) for s in args.strat_sizes.split(",")]
    fixed = {}  # n -> worst (test, train) |deviation| over curves and t
    fixed_strat = {}  # n -> worst train |deviation|, eval-curve's stratified train subset
    c2 = []  # per (curve, t): (c² test, c² train)
    c2_strat = []  # per (curve, t): c² train with a stratified train subset
    t0 = time.perf_counter()
    n_train = None
    for path in args.ckpt:
        curve, state = load_curve(path)
        if args.segments:
            curve = segment_of(curve)
        a = state["args"]
        if a.get("loss", "mse") != "mse":
            raise SystemExit(f"{path}: this benchmark measures mse curves")
        limit = args.limit if args.limit is not None else a.get("limit")
        data = load_data(a["dataset"], a.get("data_dir"), a["image_size"], limit, a["val_fraction"],
                         a.get("use_test", False), progress=False)
        train, n_train = data.train, len(data.train)
        gen = torch.Generator().manual_seed(1)
        draws = {n: [torch.randint(n_train, (n,), generator=gen) for _ in range(args.resamples)]
                 for n in sorted(set(sizes) | set(strat_sizes))}
        curve.use_endpoint_buffers(0)  # eval-curve's score: the start endpoint as trained
        scores = per_image_mse(CurvePoint(curve, 0.0), BatchLoader(train, EVAL_BATCH_SIZE, "cpu"))
        for t in ts:
            full = measure(curve, t, train, train, data.test)
            sq = []
            for n in sizes:
                if n < n_train:
                    sub = fixed_subset(train, n, SUBSET_SEED)
                    dev = np.abs(np.array(measure(curve, t, sub, sub, data.test)) / full - 1)
                    fixed[n] = np.maximum(fixed.get(n, 0), dev)
                for idx in draws[n]:
                    dev = np.array(measure(curve, t, train[idx], train[idx], data.test)) / full - 1
                    sq.append(n * dev**2)
            c2.append(np.mean(sq, axis=0))
            sq = []
            for n in strat_sizes:
                # BN from a random subset (drawn with replacement: scale-like), train metric on a stratified one
                for r, idx in enumerate(draws[n]):
                    sub = stratified_subset(train, n, scores, seed=SUBSET_SEED + r + 1)
                    dev = measure(curve, t, train[idx], sub, data.test)[1] / full[1] - 1
                    sq.append(n * dev**2)
                sub = stratified_subset(train, n, scores, SUBSET_SEED)
                dev = abs(measure(curve, t, fixed_subset(train, n, SUBSET_SEED), sub, data.test)[1] / full[1] - 1)
                fixed_strat[n] = max(fixed_strat.get(n, 0), dev)
            c2_strat.append(np.mean(sq))
            print(f"{path} t={t:.2f}: full test {full[0]:.5f} train {full[1]:.5f}; c test {np.sqrt(c2[-1][0]):.3f}"
                  f" train {np.sqrt(c2[-1][1]):.3f}, stratified train {np.sqrt(c2_strat[-1]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    c = np.sqrt(np.max(c2, axis=0))  # the worst point
    cs = float(np.sqrt(np.max(c2_strat)))
    what = "segment(s)" if args.segments else "curve(s)"
    print(f"\n{len(args.ckpt)} {what} x t in {ts}; {n_train} training images here. Deviation from --full in %:")
    print(f"{'n':>6} {'fixed test':>11} {'fixed train':>12} {'3σ test':>8} {'3σ train':>9} {'fixed strat':>12} "
          f"{'3σ strat':>9} {'cost x here':>12} {'cost x CelebA (n_bn = n_train = n)':>36}")
    rows = []
    for n in sorted(set(sizes) | set(project) | set(strat_sizes)):
        fx = fixed.get(n)
        row = {"n": n, "fixed_test": None if fx is None else 100 * fx[0],
               "fixed_train": None if fx is None else 100 * fx[1],
               "three_sigma_test": 300 * c[0] / np.sqrt(n), "three_sigma_train": 300 * c[1] / np.sqrt(n),
               "fixed_strat_train": 100 * fixed_strat[n] if n in fixed_strat else None,
               "three_sigma_strat_train": 300 * cs / np.sqrt(n),
               "cost_ratio_here": n_train / min(n, n_train), "cost_ratio_celeba": CELEBA_TRAIN / n}
        rows.append(row)
        f = (lambda v: f"{v:.2f}" if v is not None else "-")
        print(f"{n:>6} {f(row['fixed_test']):>11} {f(row['fixed_train']):>12} {row['three_sigma_test']:>8.2f} "
              f"{row['three_sigma_train']:>9.2f} {f(row['fixed_strat_train']):>12} "
              f"{row['three_sigma_strat_train']:>9.2f} {row['cost_ratio_here']:>12.1f} "
              f"{row['cost_ratio_celeba']:>36.1f}")
    print(f"c (relative deviation x sqrt(n)) at the worst point: test {c[0]:.3f}, train {c[1]:.3f}, train with a "
          f"stratified subset {cs:.3f}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"train_images": n_train, "ts": ts, "curves": args.ckpt, "c": c.tolist(), "c_strat": cs,
                       "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
