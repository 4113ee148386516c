"""What `eval-curve --renormalize` (REPAIR's correction of the layers without BatchNorm) does to the straight segment,
before and after alignment, per pair of endpoints; and whether to correct the output layer.

    python benchmarks/renormalize_segments.py --endpoints E1.pt E2.pt E3.pt --out runs/renormalize-bench

For every pair (A, B) it aligns B to A (`aecurves align`, its default method), then evaluates, like
`eval-curve --segment` (--num-points points, BN and train subsets as given): the segment A-B and the segment
A-B_aligned, each plain, renormalised (as `eval-curve --renormalize`), renormalised with the output layer corrected
too (eval_curve.RENORMALIZE_OUTPUT = True) and renormalised by REPAIR's own training-mode pass
(eval_curve.RENORMALIZE_METHOD = "repair"); only this script sets those two. It prints a Markdown table of the held-out
barrier and the share of the naive (plain, unaligned) barrier removed, the held-out loss at t = 0.5, and the
evaluation time per point.
"""

import argparse
import contextlib
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

from aecurves.commands import eval_curve
from aecurves.config import EvalCurveConfig, make
from aecurves.records import EvalRecord

VARIANTS = [("plain", False, False, None), ("renormalised", True, False, "layerwise"),
            ("renormalised, output layer corrected too", True, True, "layerwise"),
            ("renormalised by REPAIR's training-mode pass", True, False, "repair")]
SUFFIXES = {"plain": "plain", "renormalised": "renormalised",
            "renormalised, output layer corrected too": "renormalised_with_output",
            "renormalised by REPAIR's training-mode pass": "repair"}


def evaluate(a, b, folder: Path, renorm: bool, output: bool, method, args) -> dict:
    """eval.json of the segment from a to b (an earlier one in `folder` is reused: the script can be restarted)."""
    if (folder / "eval.json").exists():
        return json.loads((folder / "eval.json").read_text())
    eval_curve.RENORMALIZE_OUTPUT, eval_curve.RENORMALIZE_METHOD = output, method or "layerwise"
    cfg = make(EvalCurveConfig, {"segment": [str(a), str(b)], "num_points": args.num_points,
                                 "bn_images": args.bn_images, "train_images": args.train_images, "num_images": 0,
                                 "vgg_weights": "random", "no_progress": True, "renormalize": renorm,
                                 "out": str(folder), "overwrite": True})
    with contextlib.redirect_stdout(io.StringIO()):
        eval_curve.run(cfg)
    eval_curve.RENORMALIZE_OUTPUT, eval_curve.RENORMALIZE_METHOD = False, "layerwise"
    return json.loads((folder / "eval.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", nargs="+", required=True, help="endpoint checkpoints (every pair is measured)")
    p.add_argument("--out", required=True, help="folder for the aligned checkpoints and evaluations")
    p.add_argument("--num-points", type=int, default=11)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(args.endpoints, 1), 2):
        pair = f"{i}-{j}"
        aligned = out / f"pair{pair}_aligned.pt"
        if not aligned.exists():
            subprocess.run([sys.executable, "-m", "aecurves", "align", "--init_start", a, "--init_end", b,
                            "--no-progress", "--out", aligned], check=True, stdout=subprocess.DEVNULL)
        naive, done = None, []
        order = [("segment", b, VARIANTS[0])] + [("aligned segment", aligned, v) for v in VARIANTS] + \
            [("segment", b, v) for v in VARIANTS[1:]]  # the naive barrier first, then what matters most
        for segment, end, (name, renorm, output, method) in order:
            if name not in args.variants and not (segment == "segment" and not renorm):
                continue
            folder = out / f"eval_{pair}_{segment.replace(' ', '_')}_{SUFFIXES[name]}"
            record = evaluate(a, end, folder, renorm, output, method, args)
            s = EvalRecord.from_json(record).flat_summary()
            ts = record["series"]["ts"]
            if naive is None:
                naive = s["te_barrier"]
            done.append((pair, f"{segment}, {name}" if renorm else segment, s["te_barrier"],
                         1 - s["te_barrier"] / naive, record["series"]["te_loss"][ts.index(0.5)] if 0.5 in ts
                         else float("nan"), record["seconds"] / record["num_points"]))
            print(*done[-1], flush=True, file=sys.stderr)
        rows += sorted(done, key=lambda r: (r[1].startswith("aligned"), r[1]))
    print("| pair | path | held-out barrier | naive barrier removed | held-out loss at t = 0.5 | s per point |")
    print("|---|---|---:|---:|---:|---:|")
    for pair, label, barrier, removed, mid, seconds in rows:
        print(f"| {pair} | {label} | {barrier:.5f} | {removed:.0%} | {mid:.5f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
