"""How much of the straight segment's barrier each alignment removes, per pair of endpoints, and how long it takes.

    python benchmarks/align_barriers.py --endpoints E1.pt E2.pt E3.pt --out runs/align-bench

For every pair (A, B) it writes B aligned to A with each method (`aecurves align`), evaluates the segment from A to
B and to every aligned B (`aecurves eval-curve --segment`, --num-points points, BN and train subsets as given),
and prints a Markdown table of the held-out barrier, the share of the naive barrier removed, and the align time.
The align time is the alignment itself (align's record: matching and latent map, after loading); run it on an
otherwise idle machine, as the times are wall-clock.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

METHODS = ["weights:permutation", "activations:permutation:pre", "activations:permutation:post",
           "activations:orthogonal:post", "both:permutation:post"]


def aecurves(*argv) -> None:
    subprocess.run([sys.executable, "-m", "aecurves", *map(str, argv)], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", nargs="+", required=True, help="endpoint checkpoints (every pair is measured)")
    p.add_argument("--out", required=True, help="folder for the aligned checkpoints and evaluations")
    p.add_argument("--num-points", type=int, default=11)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=METHODS, help="METHOD:LATENT[:MATCH_AT] (align's --method, "
                   "--latent and --match-at); default: %(default)s")
    p.add_argument("--time-only", action="store_true", help="only align, and print each method's align time")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(args.endpoints, 1), 2):
        pair = f"{i}-{j}"
        candidates = [("as trained", Path(b), None)]
        for spec in args.methods:
            method, latent, *at = spec.split(":")
            aligned = out / f"pair{pair}_{spec.replace(':', '_')}.pt"
            aligned.unlink(missing_ok=True)  # align refuses to replace a file; the time is measured anew
            aecurves("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", latent,
                     *(["--match-at", at[0]] if at else []), "--no-progress", "--out", aligned)
            seconds = torch.load(aligned, weights_only=True)["aligned_to"]["seconds"]
            where = f" ({at[0]}-activation)" if at and method != "weights" else ""
            candidates.append((f"{method}{where} + latent {latent}", aligned, seconds))
        naive = None
        for label, ckpt, seconds in candidates if not args.time_only else []:
            folder = out / f"eval_{pair}_{ckpt.stem}"
            aecurves("eval-curve", "--segment", a, ckpt, "--num-points", args.num_points, "--bn-images",
                     args.bn_images, "--train-images", args.train_images, "--num-images", 0, "--vgg-weights",
                     "random", "--no-progress", "--out", folder)
            barrier = json.loads((folder / "eval.json").read_text())["summary"]["te_barrier"]
            naive = barrier if naive is None else naive
            removed = "" if ckpt == Path(b) else f"{100 * (naive - barrier) / naive:.0f}%"
            rows.append((pair, label, barrier, removed, "" if seconds is None else f"{seconds:.1f} s"))
        rows += [(pair, label, None, "", f"{seconds:.1f} s") for label, _, seconds in candidates[1:]
                 if args.time_only]
    print("| pair | B | held-out barrier | removed | align time |\n|---|---|---:|---:|---:|")
    for pair, label, barrier, removed, seconds in rows:
        print(f"| {pair} | {label} | {'' if barrier is None else f'{barrier:.5f}'} | {removed} | {seconds} |")


if __name__ == "__main__":
    main()
