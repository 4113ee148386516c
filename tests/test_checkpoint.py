"""Tests for aecurves.checkpoint: checkpoints of the release before --model still load; model trust."""

import pytest

from aecurves.checkpoint import load_checkpoint, save_checkpoint, trusted_arch
from aecurves.config import BUILTIN_MODEL
from aecurves.errors import UserError

from conftest import run_cli


def as_previous_release(src, dest, kind):
    """The same checkpoint as the release before config dataclasses wrote it: argparse's dict (with its
    `command`), no model factory, a 4-key model_config in curves."""
    state = load_checkpoint(src, kind)
    for key in ("model", "model_kwargs"):
        state["args"].pop(key, None)
        if kind == "curve":
            state["model_config"].pop(key)
    state["args"]["command"] = "train" if kind == "endpoint" else "train-curve"
    save_checkpoint(dest, state)
    return dest


def test_previous_release_checkpoints_load_everywhere(tiny_endpoints, tmp_path):
    a = as_previous_release(tiny_endpoints[0], tmp_path / "a.pt", "endpoint")
    b = as_previous_release(tiny_endpoints[1], tmp_path / "b.pt", "endpoint")
    assert run_cli("train-curve", "--init-start", a, "--init-end", b, "--fix-start", "--fix-end", "--epochs", 1,
                   "--batch-size", 32, "--bn-images", 64, "--no-progress", "--out", tmp_path / "c") == 0
    curve = as_previous_release(tmp_path / "c/checkpoint.pt", tmp_path / "c/checkpoint.pt", "curve")
    assert run_cli("eval-curve", "--ckpt", curve, "--num-points", 2, "--bn-images", 64, "--train-images", 64,
                   "--num-images", 0, "--vgg-weights", "random", "--no-progress", "--out", tmp_path / "ev") == 0
    assert run_cli("export-point", "--ckpt", curve, "--t", 0.5, "--bn-images", 64, "--no-progress",
                   "--out", tmp_path / "p.pt") == 0
    assert load_checkpoint(tmp_path / "p.pt", "endpoint")["args"]["model"] == BUILTIN_MODEL
    assert run_cli("train-curve", "--dir", tmp_path / "c", "--resume", "--epochs", 2, "--no-progress") == 0
    assert load_checkpoint(tmp_path / "c/checkpoint.pt", "curve")["epoch"] == 2


def test_trusted_arch():
    args = {"channels": 3, "image_size": 32, "latent_dim": 16, "width": 8}
    assert trusted_arch(args, None, "x.pt")["model"] == BUILTIN_MODEL
    assert trusted_arch(args, BUILTIN_MODEL, "x.pt")["width"] == 8
    custom = {**args, "model": "mine:build", "model_kwargs": {"h": 2}}
    with pytest.raises(UserError, match="pass --model mine:build"):
        trusted_arch(custom, None, "x.pt")
    with pytest.raises(UserError, match="not other:build"):
        trusted_arch(custom, "other:build", "x.pt")
    arch = trusted_arch(custom, "mine:build", "x.pt")
    assert arch["model_kwargs"] == {"h": 2} and arch["width"] is None


def test_a_damaged_checkpoint_is_a_clear_error(tiny_endpoints, tmp_path, capsys):
    state = load_checkpoint(tiny_endpoints[0], "endpoint")
    del state["args"]
    save_checkpoint(tmp_path / "no_args.pt", state)
    with pytest.raises(UserError, match="lacks args"):
        load_checkpoint(tmp_path / "no_args.pt")
    assert run_cli("eval-curve", "--segment", tmp_path / "no_args.pt", tiny_endpoints[1],
                   "--out", tmp_path / "x") == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "x").exists()
