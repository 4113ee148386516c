"""Any autoencoder from the command line: --model MODULE:FACTORY / FILE.py:FACTORY through every command."""

import json
from pathlib import Path

import pytest
import torch

from aecurves.checkpoint import load_checkpoint

from conftest import run_cli

MODELS_FILE = Path(__file__).with_name("ae_models.py")
DATA = ["--dataset", "synthetic", "--image-size", 16, "--limit", 256, "--no-progress", "--device", "cpu"]
CASES = {
    "mlp": (f"{MODELS_FILE}:mlp_autoencoder", '{"hidden": 48}'),   # a file path
    "upsample": ("ae_models:upsample_autoencoder", '{"width": 6}'),  # an importable module (tests/ is on sys.path)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_custom_model_end_to_end(name, tmp_path, capsys):
    model, kwargs = CASES[name]
    for seed in (1, 2):
        assert run_cli("train", *DATA, "--model", model, "--model-kwargs", kwargs, "--latent-dim", 8, "--epochs", 2,
                       "--batch-size", 32, "--lr", 3e-3, "--seed", seed, "--out", tmp_path / f"e{seed}") == 0
    state = load_checkpoint(tmp_path / "e1/checkpoint.pt", "endpoint")
    assert state["args"]["model"] == model and state["args"]["model_kwargs"] == json.loads(kwargs)
    assert state["args"]["width"] is None  # --width belongs to the built-in model
    ends = ["--init-start", tmp_path / "e1/checkpoint.pt", "--init-end", tmp_path / "e2/checkpoint.pt"]

    # the checkpoints name code outside aecurves: it is imported only when --model names it again
    capsys.readouterr()
    assert run_cli("train-curve", *ends, "--epochs", 1, "--no-progress", "--out", tmp_path / "refused") == 2
    assert f"pass --model {model}" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    assert run_cli("train-curve", *ends, "--model", model, "--fix-start", "--fix-end", "--epochs", 2,
                   "--batch-size", 32, "--lr", 3e-3, "--bn-images", 64, "--no-progress", "--device", "cpu",
                   "--out", tmp_path / "curve") == 0
    curve = tmp_path / "curve/checkpoint.pt"
    assert load_checkpoint(curve, "curve")["model_config"]["model"] == model

    assert run_cli("eval-curve", "--ckpt", curve, "--model", model, "--num-points", 3, "--bn-images", 64,
                   "--train-images", 64, "--num-images", 2, "--vgg-weights", "random", "--no-progress",
                   "--device", "cpu", "--out", tmp_path / "eval") == 0
    record = json.loads((tmp_path / "eval/eval.json").read_text())
    assert record["bn"]["recomputed"] is (name == "upsample")  # the MLP has no BatchNorm
    series = record["series"]
    # the curve's ends are the endpoints, as its segment's are
    assert series["te_loss"][0] == pytest.approx(series["segment_te_loss"][0], rel=1e-6)
    assert series["te_loss"][-1] == pytest.approx(series["segment_te_loss"][-1], rel=1e-6)
    assert all(v > 0 for v in series["te_loss"])

    point = tmp_path / "mid.pt"
    assert run_cli("export-point", "--ckpt", curve, "--model", model, "--t", 0.5, "--bn-images", 64,
                   "--no-progress", "--device", "cpu", "--out", point) == 0
    exported = load_checkpoint(point, "endpoint")
    assert exported["args"]["model"] == model and exported["args"]["model_kwargs"] == json.loads(kwargs)
    # the exported midpoint is a valid endpoint: a segment from it to e2 evaluates, starting at the curve's t=0.5
    assert run_cli("eval-curve", "--segment", point, tmp_path / "e2/checkpoint.pt", "--model", model,
                   "--num-points", 2, "--bn-images", 64, "--train-images", 64, "--num-images", 0,
                   "--vgg-weights", "random", "--no-progress", "--device", "cpu", "--out", tmp_path / "seg") == 0
    seg = json.loads((tmp_path / "seg/eval.json").read_text())["series"]
    assert seg["te_loss"][0] == pytest.approx(series["te_loss"][1], rel=1e-5)


def test_bad_models_are_refused_with_the_reason(tmp_path, capsys):
    cases = {
        "nomodule_xyz:build": "could not import",
        f"{MODELS_FILE}:missing": "no callable named missing",
        f"{tmp_path}/nothere.py:f": "does not exist",
        "justaname": "MODULE:FACTORY",
        f"{MODELS_FILE}:not_an_autoencoder": "same shape|the shape it was given",
    }
    for model, phrase in cases.items():
        assert run_cli("train", *DATA, "--model", model, "--epochs", 1, "--out", tmp_path / "x") == 2, model
        err = capsys.readouterr().err
        assert any(p in err for p in phrase.split("|")), (model, err)
        assert "Traceback" not in err
    assert run_cli("train", *DATA, "--model", f"{MODELS_FILE}:mlp_autoencoder", "--model-kwargs", '{"depth": 3}',
                   "--epochs", 1, "--out", tmp_path / "x") == 2
    assert "--model-kwargs" in capsys.readouterr().err
    assert run_cli("train", *DATA, "--model", f"{MODELS_FILE}:mlp_autoencoder", "--model-kwargs", "[1]",
                   "--epochs", 1, "--out", tmp_path / "x") == 2
    assert "JSON object" in capsys.readouterr().err
    assert run_cli("train", *DATA, "--model", f"{MODELS_FILE}:mlp_autoencoder", "--width", 8,
                   "--epochs", 1, "--out", tmp_path / "x") == 2
    assert "built-in convolutional models" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_different_model_is_refused_for_a_checkpoint(tiny_endpoints, tmp_path, capsys):
    """Built-in endpoints with --model naming another factory: the weights belong to the checkpoint's model."""
    a, b = tiny_endpoints
    assert run_cli("eval-curve", "--segment", a, b, "--model", f"{MODELS_FILE}:mlp_autoencoder",
                   "--out", tmp_path / "x") == 2
    assert "was made with --model aecurves.models:ConvAutoencoder" in capsys.readouterr().err


def test_builtin_factory_by_name_matches_the_default(tmp_path):
    """--model aecurves.models:ConvAutoencoder is the default: same seed, same weights."""
    tiny = [*DATA, "--width", 4, "--latent-dim", 8, "--epochs", 1, "--batch-size", 32, "--seed", 5]
    assert run_cli("train", *tiny, "--out", tmp_path / "a") == 0
    assert run_cli("train", *tiny, "--model", "aecurves.models:ConvAutoencoder", "--out", tmp_path / "b") == 0
    wa, wb = (load_checkpoint(tmp_path / p / "checkpoint.pt", "endpoint")["model"] for p in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


QUIET_EXITS = '''
import os
import sys

import torch
from torch import nn


class Stop(BaseException):
    pass


class Exiting(nn.Module):
    """Passes the shape probe (two calls: the output, and that a second call gives the same), then (when
    AE_QUIET_EXIT is set) leaves from its forward without an error."""

    def __init__(self, channels, image_size, latent_dim):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        how = os.environ.get("AE_QUIET_EXIT")
        if how and self.calls > 2:
            if how == "generator":
                raise GeneratorExit
            if how == "base":
                raise Stop("from forward")
            sys.exit({"zero": 0, "none": None, "text": "bye", "three": 3}[how])
        return torch.sigmoid(self.conv(x))


def exiting(channels, image_size, latent_dim):
    return Exiting(channels, image_size, latent_dim)
'''


@pytest.mark.parametrize("how, raised", [
    ("zero", "called sys.exit(0)"), ("none", "called sys.exit()"), ("text", "called sys.exit('bye')"),
    ("three", "called sys.exit(3)"), ("generator", "raised GeneratorExit"), ("base", "raised Stop (from forward)"),
])
def test_a_forward_that_exits_is_an_error_naming_it(how, raised, tmp_path, monkeypatch, capsys):
    """A forward that calls sys.exit(0) after the shape probe ended `train` with status 0 and an empty
    metrics.jsonl (issue 27, N9); any quiet exit from the model's code is exit 2 naming it, where and why."""
    (tmp_path / "quiet.py").write_text(QUIET_EXITS)
    spec = f"{tmp_path}/quiet.py:exiting"
    monkeypatch.setenv("AE_QUIET_EXIT", how)
    assert run_cli("train", *DATA, "--model", spec, "--epochs", 2, "--batch-size", 32, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {spec} {raised} in forward ({tmp_path}/quiet.py, line ") and \
        "while aecurves train was running" in err and "Traceback" not in err, err
    assert not (tmp_path / "r/checkpoint.pt").exists()


def test_a_quiet_exit_during_evaluation_is_an_error_too(tmp_path, monkeypatch, capsys):
    """The guard holds for every command, not only where the factory is called: eval-curve of two endpoints whose
    model leaves from its forward part-way exits 2 without writing its record."""
    (tmp_path / "quiet.py").write_text(QUIET_EXITS)
    spec = f"{tmp_path}/quiet.py:exiting"
    assert run_cli("train", *DATA, "--model", spec, "--epochs", 1, "--batch-size", 64, "--out", tmp_path / "e") == 0
    end = tmp_path / "e/checkpoint.pt"
    monkeypatch.setenv("AE_QUIET_EXIT", "zero")
    capsys.readouterr()
    assert run_cli("eval-curve", "--segment", end, end, "--model", spec, "--num-points", 2, "--bn-images", 64,
                   "--train-images", 64, "--num-images", 0, "--vgg-weights", "random", "--no-progress",
                   "--device", "cpu", "--out", tmp_path / "eval") == 2
    err = capsys.readouterr().err
    assert f"--model {spec} called sys.exit(0) in forward" in err and "aecurves eval-curve" in err, err
    assert not (tmp_path / "eval/eval.json").exists()


def test_a_quiet_exit_in_a_study_stage_fails_that_stage_by_name(tmp_path, monkeypatch, capsys):
    """In a study (the serial executor: the stage runs in the driver's process) the stage that exits quietly is
    recorded as failed, naming the model, and the study exits 2; nothing is left "started"."""
    (tmp_path / "quiet.py").write_text(QUIET_EXITS)
    spec = f"{tmp_path}/quiet.py:exiting"
    monkeypatch.setenv("AE_QUIET_EXIT", "zero")
    out = tmp_path / "study"
    assert run_cli("study", *DATA, "--model", spec, "--losses", "mse", "--seeds", "1,2", "--epochs", 1,
                   "--curve-epochs", 1, "--batch-size", 32, "--no-align", "--no-extra-training", "--no-fge",
                   "--plane-grid", 0, "--num-points", 2, "--vgg-weights", "random", "--out", out) == 2
    err = capsys.readouterr().err
    assert "stage endpoint:mse:1" in err and f"--model {spec} called sys.exit(0) in forward" in err, err
    record = json.loads((out / "endpoints/mse_seed1/study_stage.json").read_text())
    assert record["status"] == "failed" and "sys.exit(0)" in record["error"]
