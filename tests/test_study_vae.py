"""`aecurves study` with VAEs (issue 28): every stage of a study of the built-in ConvVAE and of KLAutoencoder
(diffusers' AutoencoderKL: GroupNorm, attention, captured without torch.fx) runs, each stage measures the objective
and its two terms, the alignment keeps B's function by permutation only, and the report answers on the objective."""

import json

import numpy as np
import pytest

from aecurves.checkpoint import load_checkpoint
from aecurves.stats import loss_barrier

from conftest import run_cli

TINY = ("--losses", "mse", "--seeds", "1,2", "--dataset", "synthetic", "--image-size", 16, "--limit", 96,
        "--epochs", 2, "--curve-epochs", 2, "--num-points", 3, "--bn-images", 32, "--train-images", 32,
        "--plane-grid", 3, "--ensemble", 2, "--vgg-weights", "random", "--device", "cpu", "--no-progress")
MODELS = {
    "ConvVAE": ("--model", "aecurves.models:ConvVAE", "--width", 4, "--latent-dim", 8, "--kl-weight", 0.5),
    "KLAutoencoder": ("--model", "aecurves.models:KLAutoencoder", "--latent-dim", 128, "--model-kwargs",
                      '{"block_out_channels": [8, 16], "norm_num_groups": 4}'),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_study_of_vaes_runs_every_stage_and_answers_on_the_objective(name, tmp_path, capsys):
    if name == "KLAutoencoder":
        pytest.importorskip("diffusers", reason="KLAutoencoder needs diffusers (the test extra installs it)")
    out = tmp_path / "study"
    assert run_cli("study", "--out", out, *TINY, *MODELS[name]) == 0
    printed = capsys.readouterr().out
    assert "15 stages run, 0 already finished" in printed
    beta = 0.5 if name == "ConvVAE" else 1.0

    endpoint = load_checkpoint(out / "endpoints/mse_seed1/checkpoint.pt")
    assert endpoint["args"]["kl_weight"] == beta
    curve = load_checkpoint(out / "curves/mse_seed1-seed2/checkpoint.pt")
    assert curve["args"]["kl_weight"] == beta  # taken from the endpoints
    for folder in ("curves/mse_seed1-seed2/eval", "curves/mse_seed1-seed2_aligned/eval"):
        record = json.loads((out / folder / "eval.json").read_text())
        assert record["vae"] is True and record["kl_weight"] == beta
        series = np.load(out / folder / "curve.npz")
        d = 3 * 16 * 16
        for prefix in ("", "segment_"):
            loss, dist, rate = (series[f"{prefix}te_{m}"] for m in ("loss", "distortion", "rate"))
            assert np.allclose(loss, dist + beta * rate / d, rtol=1e-5)
            summary = record["paths"]["segment" if prefix else "curve"]
            assert summary["te_rate_barrier"] == pytest.approx(loss_barrier(series[f"{prefix}ts"], rate))
            assert summary["te_distortion_barrier"] == pytest.approx(loss_barrier(series[f"{prefix}ts"], dist))
    plane = json.loads((out / "curves/mse_seed1-seed2/plane/plane.json").read_text())
    assert plane["vae"] is True

    aligned = load_checkpoint(out / "aligned/mse_seed2-to-seed1/checkpoint.pt")
    assert aligned["args"]["kl_weight"] == beta
    assert "(a VAE: permutation only)" in printed

    report = (out / "report.md").read_text()
    assert report.count("VAE objective (MSE + " + ("0.5" if beta == 0.5 else "1") + "·KL/D)") >= 1
    assert "rate (KL in nats per image)" in report
