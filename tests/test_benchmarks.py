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


def test_dmc_style_peer_computes_the_same_curve_as_aecurves():
    """The benchmark's peer (benchmarks/dmc_curvenet.py, layer twins as in the paper's curves.py) must be the same
    function of t as aecurves' Curve over ConvAutoencoder, else timing one against the other compares different
    work. Checked at the bends and between them, in training mode (BN from the batch) and for l2."""
    import sys

    import torch

    from aecurves.curves import Curve
    from aecurves.models import ConvAutoencoder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from dmc_curvenet import CurveNet
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    arch = dict(channels=3, image_size=16, latent_dim=8, width=4)
    torch.manual_seed(0)
    a, b = ConvAutoencoder(**arch), ConvAutoencoder(**arch)
    ours = Curve(ConvAutoencoder(**arch), "bezier", 3, True, True)
    ours.set_endpoints(a.state_dict(), b.state_dict())
    ours.init_linear()
    peer = CurveNet(3, True, True, **arch)
    peer.import_base(a, 0)
    peer.import_base(b, 2)
    peer.init_linear()
    with torch.no_grad():  # move the middle bend off the segment, the same way in both
        shift = torch.randn_like(ours.bends[1]) * 0.05
        ours.bends[1].add_(shift)
        middle = ours.unflatten(ours.bends[1].detach())
        twins = [(twin, name) for twin in peer.net.twins() for name in twin.names]
        for (twin, name), (_, value) in zip(twins, middle.items(), strict=True):
            getattr(twin, f"{name}_1").copy_(value)
    x = torch.rand(5, 3, 16, 16)
    ours.train(), peer.train()
    for t in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(peer(x, t), ours(x, t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(peer.l2, ours.l2(t), rtol=1e-5, atol=1e-5)
    # and the trainable parameters are the same count (the middle bend), so Adam updates the same number of values
    assert sum(p.numel() for p in peer.parameters() if p.requires_grad) == ours.num_trainable()
