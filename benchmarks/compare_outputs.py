"""Before/after check for a change meant to leave every result as it was (a refactor).

    python benchmarks/compare_outputs.py produce OUT     # runs a small pipeline and two whole studies into OUT
    python benchmarks/compare_outputs.py compare A B     # every number of every file in A against B

`produce` runs, on synthetic 32x32 images with fp32 on the CPU (exact and deterministic):
  - studies/ae:  the study of the built-in ConvAutoencoder, losses mse and vgg (--vgg-weights random), seeds 1,2:
                 every stage kind (endpoint, extra, fge, align, curve, aligned-curve, eval, aligned-eval, baseline,
                 ensembles, plane, report);
  - studies/vae: the same stages for aecurves.models:ConvVAE, loss mse;
  - export/:     export-point of the first study's curve at t = 0.3.
Run it once with the code before the change (a git worktree of the old commit) and once after, then `compare`.

`compare` walks both folders and compares every JSON value (metrics.jsonl line by line), every array of every .npz
and every tensor and value of every .pt file (torch.load(weights_only=True)), exactly; paths are compared with the
folder's own root replaced. Values that say when or where something ran, not what it computed, are left out: the keys
in VOLATILE, and SHA-256 digests (of .pt files, which differ between two runs writing the same tensors; the tensors
themselves are compared). Images, the report's HTML/Markdown and logs are compared by their numbers elsewhere
(report.json holds every number the report shows). It prints each difference and exits 1 when there is one.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

# when and where a run happened, how long it took, which code ran it: not what it computed
VOLATILE = {"started", "finished", "wall_seconds", "stage_seconds", "seconds", "epoch_seconds", "time", "host",
            "pid", "hostname", "python", "torch", "platform", "cpu", "git", "commit", "aecurves", "created",
            "inputs_fingerprint", "elapsed", "images_per_second", "ms_per_step", "steps_per_second", "date",
            "logs", "job_id", "executor", "ran", "generated", "version_info", "threads", "provenance", "sec",
            "eval_seconds", "train_seconds", "images_per_s", "seconds_per_point", "generated_at", "align_seconds"}
# a SHA-256 of a .pt file differs between any two runs that wrote the same numbers: torch.save stores the name of the
# file it writes inside the zip, and a checkpoint is written under a temporary name first (files.atomic_path)
SHA256 = re.compile(r"[0-9a-f]{64}")
SMALL = ["--dataset", "synthetic", "--image-size", "32", "--limit", "256", "--width", "8", "--latent-dim", "16",
         "--batch-size", "32", "--lr", "3e-3", "--epochs", "3", "--curve-epochs", "2", "--curve-lr", "3e-3",
         "--num-points", "5", "--bn-images", "64", "--train-images", "64", "--seeds", "1,2", "--precision", "fp32",
         "--device", "cpu", "--vgg-weights", "random", "--plane-grid", "3", "--no-progress"]


def aecurves(*argv) -> None:
    print("$ aecurves", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "aecurves", *argv], check=True, stdout=subprocess.DEVNULL)


def produce(out: Path) -> None:
    aecurves("study", *SMALL, "--losses", "mse,vgg", "--out", str(out / "studies/ae"))
    aecurves("study", *SMALL, "--losses", "mse", "--model", "aecurves.models:ConvVAE", "--kl-weight", "0.5",
             "--out", str(out / "studies/vae"))
    aecurves("export-point", "--ckpt", str(out / "studies/ae/curves/mse_seed1-seed2/checkpoint.pt"), "--t", "0.3",
             "--bn-images", "64", "--no-progress", "--out", str(out / "export/point.pt"))


def numbers(value, root: str, where: str, out: dict) -> None:
    """Flattens a JSON-like value (or a checkpoint's tree) into {where: leaf}, leaving out VOLATILE keys."""
    import torch

    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) not in VOLATILE:
                numbers(v, root, f"{where}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            numbers(v, root, f"{where}[{i}]", out)
    elif isinstance(value, torch.Tensor):
        out[where] = ("tensor", value.dtype, tuple(value.shape), value.detach().cpu().contiguous().view(-1).tolist())
    elif isinstance(value, str):
        out[where] = SHA256.sub("SHA256", value.replace(root, "ROOT"))
    else:
        out[where] = value


def read(path: Path, root: str) -> dict:
    out: dict = {}
    if path.suffix == ".json":
        numbers(json.loads(path.read_text()), root, path.name, out)
    elif path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines()):
            numbers(json.loads(line), root, f"{path.name}:{i + 1}", out)
    elif path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            for k in z.files:
                out[f"{path.name}[{k}]"] = ("array", z[k].dtype.str, z[k].shape, z[k].tobytes())
    elif path.suffix in (".pt", ".pth"):
        import torch

        numbers(torch.load(path, map_location="cpu", weights_only=True), root, path.name, out)
    return out


def compare(a: Path, b: Path) -> int:
    kinds = (".json", ".jsonl", ".npz", ".pt", ".pth")
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.suffix in kinds and "logs" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.suffix in kinds and "logs" not in p.parts}
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    values = 0
    for rel in sorted(files_a & files_b):
        va, vb = read(a / rel, str(a.resolve())), read(b / rel, str(b.resolve()))
        for key in sorted(set(va) | set(vb)):
            values += 1
            if key not in va or key not in vb:
                problems.append(f"{rel}: {key} only in {'the first' if key in va else 'the second'}")
            elif va[key] != vb[key] and not (va[key] != va[key] and vb[key] != vb[key]):  # NaN equals NaN here
                problems.append(f"{rel}: {key}: {str(va[key])[:120]} vs {str(vb[key])[:120]}")
    for line in problems:
        print(line)
    print(f"{len(files_a & files_b)} files, {values} values compared; {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "produce":
        produce(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
