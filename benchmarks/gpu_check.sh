#!/usr/bin/env bash
# The one prepared check for a lent GPU (issue 22): every step in at most 8 minutes, everything it measured in one
# folder of at most 8 files (what the device tool brings back).
#
#   bash benchmarks/gpu_check.sh --prepare          # here, once: copies the CelebA sample into data/ (git-ignored)
#   bash benchmarks/gpu_check.sh OUT                # on the GPU machine: CUDA, the package run from src/
#   bash benchmarks/gpu_check.sh --dry-run OUT      # on a CPU: the same steps, tiny, with --device cpu
#
# On the lent machine (no package registry, no ../shared): run it with the sample carried, e.g. the device tool's
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=["data/celeba-sample"], timeout_s=540)
# It installs nothing: that machine's python3 has torch, torchvision and the other dependencies (KINDS.md), so the
# package runs from src/ through PYTHONPATH. Each step has its own time limit; one that fails or runs out is
# recorded in summary.txt and the next one runs.
#
# Files written to OUT: summary.txt (one line per step: exit code, seconds), env.txt, tests.log, train.log,
# eval.log, study.log, study.json (the study's record: wall time per stage), memory.txt (peak GPU memory).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SAMPLE="$ROOT/data/celeba-sample"

if [ "${1:-}" = "--prepare" ]; then
    src="$ROOT/../shared/data/celeba-sample"
    [ -d "$src/img_align_celeba" ] || { echo "no CelebA sample at $src" >&2; exit 2; }
    mkdir -p "$ROOT/data" && rm -rf "$SAMPLE" && cp -r "$src" "$SAMPLE" && chmod -R u+w "$SAMPLE"
    echo "copied $(ls "$SAMPLE/img_align_celeba" | wc -l) images to $SAMPLE (ignored by git; carry data/celeba-sample)"
    exit 0
fi
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: gpu_check.sh [--dry-run] OUT | --prepare}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT/src:$ROOT/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS LOG COMMAND...: runs it with a time limit, its output into LOG, a line in summary.txt
    local name=$1 limit=$2 log=$3
    shift 3
    local t0 rc ms
    t0=$(date +%s%N)
    echo "=== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '%-12s exit %3d  %5d.%01d s  (%s)\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) "$log" \
        | tee -a "$OUT/summary.txt"
}

if [ $DRY = 1 ]; then
    DEVICE=cpu
    TESTS=(tests/test_models.py)
    TRAIN=(--device cpu --batch-size 2 --warmup 1 --steps 2 --vgg-warmup 0 --vgg-steps 1 --matmul-n 256
           --matmul-repeats 1 --no-accuracy --levers --rounds 1 --lever-steps 1 --breakdown --models
           --model-precisions fp32 --kl-kwargs '{"block_out_channels": [4, 4, 8, 8], "norm_num_groups": 4}')
    EVAL=(--device cpu --points 2 --images 16 --per-call 1 2 --precision fp32 --formats default channels_last
          --ssim-images 16)
    if [ -d "$SAMPLE/img_align_celeba" ]; then DATA=(--data-dir "$SAMPLE"); else DATA=(--dataset synthetic); fi
    STUDY=(--preset celeba "${DATA[@]}" --limit 96 --image-size 16 --width 8 --epochs 1 --curve-epochs 1
           --num-points 3 --bn-images 32 --train-images 32 --losses mse --vgg-weights random --seeds 1,2
           --no-align --no-extra-training --no-fge --ensemble 0 --plane-grid 0 --device cpu)
    LIMITS=(60 180 120 120)
else
    DEVICE=cuda
    TESTS=(-m "not slow")
    TRAIN=(--device cuda --warmup 10 --steps 50 --vgg-warmup 3 --vgg-steps 20 --matmul-n 8192 --acc-steps 300
           --levers --compile --rounds 5 --lever-steps 10 --breakdown --models)
    EVAL=(--device cuda --points 16 --images 1024)
    [ -d "$SAMPLE/img_align_celeba" ] || { echo "no CelebA sample in $SAMPLE: run --prepare here and carry it" \
        | tee -a "$OUT/summary.txt"; }
    # the celeba preset on the 4,000 real images, shortened to fit: every kind of stage, both losses (random VGG
    # weights: the machine cannot download ImageNet's; the same network, so the same cost)
    STUDY=(--preset celeba --data-dir "$SAMPLE" --epochs 5 --curve-epochs 3 --losses mse,vgg --vgg-weights random
           --plane-grid 11 --device cuda)
    LIMITS=(110 110 50 150)  # with env and auto-ppc (30 s each): 480 s, the 8 minutes
fi

step env 30 env.txt bash -c "nvidia-smi || true; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; git log -1 --format='commit %H %cd'"
step tests "${LIMITS[0]}" tests.log $PY -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
step train "${LIMITS[1]}" train.log $PY benchmarks/train_throughput.py "${TRAIN[@]}"
step eval "${LIMITS[2]}" eval.log $PY benchmarks/eval_throughput.py "${EVAL[@]}"
step auto-ppc 30 eval.log $PY - "$DEVICE" <<'EOF'
import sys

import torch

from aecurves import runtime
from aecurves.metrics import choose_points_per_call
from aecurves.models import ConvAutoencoder

device = runtime.resolve_device(sys.argv[1])
net = ConvAutoencoder(channels=3, image_size=64, latent_dim=128, width=32).to(device)
x = torch.rand(256, 3, 64, 64, device=device)
chosen = choose_points_per_call(0, device, net, dict(net.named_parameters()), x)
print(f"points per call chosen automatically on {device}: {chosen}")
EOF
step study "${LIMITS[3]}" study.log $PY - "$WORK/study" "$OUT/memory.txt" "${STUDY[@]}" --no-progress <<'EOF'
import sys

import torch

from aecurves.cli import main

out, memory, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
code = main(["study", *flags, "--out", out])
with open(memory, "w") as f:
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    f.write(f"peak GPU memory allocated by the study's process: {peak:.2f} GiB\n")
sys.exit(code)
EOF
cp "$WORK/study/study.json" "$OUT/study.json" 2>/dev/null || echo "no study.json" >>"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
