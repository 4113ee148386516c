"""How much of the straight segment's barrier each alignment removes, per pair of endpoints, and how long it takes.

    python benchmarks/align_barriers.py --endpoints E1.pt E2.pt E3.pt --out runs/align-bench
    python benchmarks/align_barriers.py --endpoints E1.pt E2.pt --out DIR --methods activations:permutation:pre \
        --ablation                  # also: which layer group holds the aligned segment's barrier

For every pair (A, B) it writes B aligned to A with each method (`aecurves align`), evaluates the segment from A to
B and to every aligned B (`aecurves eval-curve --segment`, --num-points points, BN and train subsets as given; with
--renormalize also `eval-curve --renormalize` on the first method's aligned B), and prints two Markdown tables: one
row per pair and method (held-out barrier, share of the naive barrier removed, align time), and one row per method
(the share removed on every pair, the worst pair, the mean, the mean align time). The align time is the alignment
itself (align's record: matching and latent map, after loading); run it on an otherwise idle machine, as the times
are wall-clock.

A method is METHOD:LATENT[:MATCH_AT][:KEY=VALUE...], i.e. align's --method, --latent, --match-at and any other
align flag (alpha=0.5, steps=200). --ablation: for the first method's aligned B of every pair, the network at the
segment's midpoint is rebuilt with one layer group at a time put back to A's weights (the others at the midpoint),
and, separately, with only that group at the midpoint (the others at A); both with BatchNorm statistics recomputed.
The held-out loss of each says how much of the midpoint's excess loss that group carries.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

from aecurves.records import EvalRecord

METHODS = ["activations:permutation:pre", "weights-raw:permutation", "weights:permutation", "both:permutation",
           "mixed:permutation:pre:alpha=0.25", "mixed:permutation:pre:alpha=0.5", "mixed:permutation:pre:alpha=0.75",
           "learned:permutation:pre:steps=200"]


def aecurves(*argv) -> None:
    subprocess.run([sys.executable, "-m", "aecurves", *map(str, argv)], check=True, stdout=subprocess.DEVNULL)


def parse_method(spec: str) -> tuple[str, list]:
    """(label, align flags) of METHOD:LATENT[:MATCH_AT][:KEY=VALUE...]."""
    method, latent, *rest = spec.split(":")
    flags = ["--method", method, "--latent", latent]
    words = []
    for item in rest:
        if "=" in item:
            key, value = item.split("=", 1)
            flags += [f"--{key.replace('_', '-')}", value]
            words.append(f"{key} {value}")
        else:
            flags += ["--match-at", item]
            if method not in ("weights", "weights-raw"):
                words.append(f"{item}-activation")
    label = f"{method}{f' ({chr(44).join(words)})' if words else ''} + latent {latent}"
    return label, flags


def barrier_of(folder: Path) -> float:
    return EvalRecord.from_json(json.loads((folder / "eval.json").read_text())).flat_summary()["te_barrier"]


def evaluate(a, b, folder: Path, args, *extra) -> float:
    if not (folder / "eval.json").exists():
        aecurves("eval-curve", "--segment", a, b, "--num-points", args.num_points, "--bn-images", args.bn_images,
                 "--train-images", args.train_images, "--num-images", 0, "--vgg-weights", "random", "--no-progress",
                 "--out", folder, *extra)
    return barrier_of(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", nargs="+", required=True, help="endpoint checkpoints (every pair is measured)")
    p.add_argument("--out", required=True, help="folder for the aligned checkpoints and evaluations")
    p.add_argument("--num-points", type=int, default=11)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=METHODS, help="METHOD:LATENT[:MATCH_AT][:KEY=VALUE...] (align's "
                   "--method, --latent, --match-at and other flags); default: %(default)s")
    p.add_argument("--renormalize", action="store_true", help="also evaluate the first method's aligned segment "
                   "with eval-curve --renormalize")
    p.add_argument("--ablation", action="store_true", help="where the first method's aligned barrier sits, one "
                   "layer group at a time")
    p.add_argument("--time-only", action="store_true", help="only align, and print each method's align time")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, removed, times, ablations = [], {}, {}, {}
    pairs = list(itertools.combinations(enumerate(args.endpoints, 1), 2))
    for (i, a), (j, b) in pairs:
        pair = f"{i}-{j}"
        naive = None if args.time_only else evaluate(a, b, out / f"eval_{pair}_naive", args)
        if naive is not None:
            rows.append((pair, "as trained", naive, "", ""))
        for k, spec in enumerate(args.methods):
            label, flags = parse_method(spec)
            aligned = out / f"pair{pair}_{spec.replace(':', '_').replace('=', '')}.pt"
            aligned.unlink(missing_ok=True)  # align refuses to replace a file; the time is measured anew
            aecurves("align", "--init_start", a, "--init_end", b, *flags, "--no-progress", "--out", aligned)
            seconds = torch.load(aligned, weights_only=True)["aligned_to"]["seconds"]
            times.setdefault(label, []).append(seconds)
            variants = [(label, [])]
            if args.renormalize and k == 0:
                variants.append((f"{label}, renormalised", ["--renormalize"]))
            for name, extra in variants if not args.time_only else []:
                folder = out / f"eval_{pair}_{aligned.stem}{'_renorm' if extra else ''}"
                for old in folder.glob("eval.json"):
                    old.unlink()  # a new aligned B: evaluate anew
                barrier = evaluate(a, aligned, folder, args, *extra)
                share = (naive - barrier) / naive
                removed.setdefault(name, {})[pair] = share
                rows.append((pair, name, barrier, f"{100 * share:.0f}%", f"{seconds:.1f} s"))
            if args.ablation and k == 0:
                ablations[pair] = layer_ablation(a, aligned, args.bn_images)
    if not args.time_only:
        print("| pair | B | held-out barrier | removed | align time |\n|---|---|---:|---:|---:|")
        for pair, label, barrier, share, seconds in rows:
            print(f"| {pair} | {label} | {barrier:.5f} | {share} | {seconds} |")
        names = [f"{i}-{j}" for (i, _), (j, _) in pairs]
        print(f"\n| method | {' | '.join('pair ' + n for n in names)} | worst | mean | align time |")
        print("|---|" + "---:|" * (len(names) + 3))
        for label, shares in removed.items():
            values = [shares[n] for n in names]
            seconds = times.get(label.removesuffix(", renormalised"), [0.0])
            print(f"| {label} | {' | '.join(f'{100 * v:.0f}%' for v in values)} | {100 * min(values):.0f}% | "
                  f"{100 * sum(values) / len(values):.0f}% | {sum(seconds) / len(seconds):.1f} s |")
    else:
        print("| method | align time per pair |\n|---|---|")
        for label, seconds in times.items():
            print(f"| {label} | {', '.join(f'{s:.1f} s' for s in seconds)} |")
    for pair, table in ablations.items():
        print(f"\npair {pair}, held-out loss at the midpoint of A and the aligned B (BN recomputed): "
              f"A {table['A']:.5f}, aligned B {table['B']:.5f}, midpoint {table['midpoint']:.5f}")
        print("| layer group | midpoint, this group at A | A, only this group at the midpoint |\n|---|---:|---:|")
        for group, (back, alone) in table["groups"].items():
            print(f"| {group} | {back:.5f} | {alone:.5f} |")


def layer_ablation(a_path, b_path, bn_images: int) -> dict:
    """Held-out losses of networks mixing A and the aligned B, one top-level layer group at a time."""
    from torch.func import functional_call

    from aecurves.checkpoint import load_checkpoint
    from aecurves.curves import recompute_bn
    from aecurves.data import BatchLoader, load_run_data
    from aecurves.metrics import fixed_subset
    from aecurves.models import build_model

    a, b = load_checkpoint(a_path, "endpoint"), load_checkpoint(b_path, "endpoint")
    net = build_model(a["args"])
    data = load_run_data(a["args"], None, progress=False)
    bn = BatchLoader(fixed_subset(data.train, bn_images), 256)
    test = BatchLoader(data.test, 256)
    params = [n for n, _ in net.named_parameters()]
    groups = {}
    for n in params:
        parts = n.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] in ("encoder", "decoder") else parts[0], []).append(n)

    @torch.no_grad()
    def loss(weights: dict) -> float:
        recompute_bn(net, weights, bn)
        net.eval()
        total = sum(float(((functional_call(net, weights, (x,)) - x) ** 2).mean()) * len(x) for x in test)
        return total / len(data.test)

    mid = {n: 0.5 * (a["model"][n] + b["model"][n]) for n in params}
    at_a = {n: a["model"][n] for n in params}
    table = {"A": loss(at_a), "B": loss({n: b["model"][n] for n in params}), "midpoint": loss(mid), "groups": {}}
    for group, names in groups.items():
        back = loss({**mid, **{n: at_a[n] for n in names}})
        alone = loss({**at_a, **{n: mid[n] for n in names}})
        table["groups"][group] = (back, alone)
    return table


if __name__ == "__main__":
    main()
