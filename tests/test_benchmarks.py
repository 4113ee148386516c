"""The prepared GPU check runs end to end on a CPU (--dry-run: every step, tiny, --device cpu), so it is known to
work before the day a GPU is lent for a few minutes."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"summary.txt", "env.txt", "tests.log", "train.log", "eval.log", "study.log", "study.json", "memory.txt"}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files come back from the device machine
    steps = {line.split()[0]: line.split() for line in (out / "summary.txt").read_text().splitlines()}
    assert list(steps) == ["env", "tests", "train", "eval", "auto-ppc", "study"]
    assert all(row[1:3] == ["exit", "0"] for row in steps.values()), steps
    assert "points per call chosen automatically on cpu: 1" in (out / "eval.log").read_text()
    assert "images/s" in (out / "train.log").read_text()
    record = json.loads((out / "study.json").read_text())
    assert set(record["provenance"]["stage_seconds"]) == {"endpoint:mse:1", "endpoint:mse:2", "curve:mse:1-2",
                                                          "eval:mse:1-2"}
    assert "peak GPU memory" in (out / "memory.txt").read_text()
