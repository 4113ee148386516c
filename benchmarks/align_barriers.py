"""How much of the straight segment's barrier each alignment removes, per pair of endpoints, and how long it takes.

    python benchmarks/align_barriers.py --endpoints E1.pt E2.pt E3.pt --out runs/align-bench

For every pair (A, B) it writes B aligned to A with each method (`aecurves align`), evaluates the segment from A to
B and to every aligned B (`aecurves eval-curve --segment`, --num-points points, BN and train subsets as given),
and prints a Markdown table of the held-out barrier, the share of the naive barrier removed, and the align time.
Run it on an otherwise idle machine: the times are wall-clock.
"""

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = [("weights", "permutation"), ("activations", "permutation"), ("activations", "orthogonal")]


def aecurves(*argv) -> None:
    subprocess.run([sys.executable, "-m", "aecurves", *map(str, argv)], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", nargs="+", required=True, help="endpoint checkpoints (every pair is measured)")
    p.add_argument("--out", required=True, help="folder for the aligned checkpoints and evaluations")
    p.add_argument("--num-points", type=int, default=11)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--train-images", type=int, default=256)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(args.endpoints, 1), 2):
        pair = f"{i}-{j}"
        candidates = [("as trained", Path(b), None)]
        for method, latent in METHODS:
            aligned = out / f"pair{pair}_{method}_{latent}.pt"
            aligned.unlink(missing_ok=True)  # align refuses to replace a file; the time is measured anew
            t0 = time.perf_counter()
            aecurves("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", latent,
                         "--no-progress", "--out", aligned)
            candidates.append((f"{method} + latent {latent}", aligned, time.perf_counter() - t0))
        naive = None
        for label, ckpt, seconds in candidates:
            folder = out / f"eval_{pair}_{ckpt.stem}"
            aecurves("eval-curve", "--segment", a, ckpt, "--num-points", args.num_points, "--bn-images",
                     args.bn_images, "--train-images", args.train_images, "--num-images", 0, "--vgg-weights",
                     "random", "--no-progress", "--out", folder)
            barrier = json.loads((folder / "eval.json").read_text())["summary"]["te_barrier"]
            naive = barrier if naive is None else naive
            removed = "" if ckpt == Path(b) else f"{100 * (naive - barrier) / naive:.0f}%"
            rows.append((pair, label, barrier, removed, "" if seconds is None else f"{seconds:.1f} s"))
    print("| pair | B | held-out barrier | removed | align time |\n|---|---|---:|---:|---:|")
    for pair, label, barrier, removed, seconds in rows:
        print(f"| {pair} | {label} | {barrier:.5f} | {removed} | {seconds} |")


if __name__ == "__main__":
    main()
