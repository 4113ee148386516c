"""Tests for aecurves.checkpoint: checkpoints of the release before --model still load; model trust."""

from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------
# code runs only when the user names it: crafted checkpoints whose factory is any spelling but the exact built-in

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("the checkpoint ran this file")
from aecurves.models import ConvAutoencoder


def factory(width=4, **kwargs):  # the crafted checkpoint's weights fit, so a command would go on and exit 0
    return ConvAutoencoder(width=width, **kwargs)
'''
HUBCONF = '''
from pathlib import Path
Path({marker!r}).write_text("the checkpoint ran this hubconf.py")


def factory(width=4, **kwargs):
    from aecurves.models import ConvAutoencoder
    return ConvAutoencoder(width=width, **kwargs)
'''
ARCH = {"channels": 3, "image_size": 16, "latent_dim": 8, "width": 4}
# Each spelling reached code outside the built-in table on the release before this one: a path walked out of a
# folder named like the package, a file in the working directory named like it, an attribute walk from one of its
# modules into torch.hub (which imports any hubconf.py), and near-misses of the real name.
SPELLINGS = {
    "path out of a folder named aecurves.x": ("aecurves.x/../../../evil.py:factory", {}),
    "aecurves.py in the working directory": ("aecurves.py:factory", {}),
    "attribute walk to torch.hub.load": ("aecurves.models:torch.hub.load",
                                         {"repo_or_dir": "{hub}", "model": "factory", "source": "local",
                                          "trust_repo": True}),
    "trailing space": (BUILTIN_MODEL + " ", {}),
    "upper case": (BUILTIN_MODEL.upper(), {}),
    "file path of the module": ("{src}/aecurves/models.py:ConvAutoencoder", {}),
    "a method of the class": (BUILTIN_MODEL + ".__init__", {}),
}


def _endpoint_state(model: str = BUILTIN_MODEL, model_kwargs=None, **args) -> dict:
    import torch

    from aecurves.models import ConvAutoencoder

    torch.manual_seed(args.get("seed", 1))
    net = ConvAutoencoder(**ARCH)
    return {"kind": "endpoint", "model": net.state_dict(), "optimizer": {}, "epoch": 1, "metrics": [],
            "args": {"dataset": "synthetic", "data_dir": None, "limit": 64, "val_fraction": 0.25, "loss": "mse",
                     "seed": 1, "model": model, "model_kwargs": model_kwargs or {}, **ARCH, **args}}


def _curve_state(model: str, model_kwargs: dict, start, end) -> dict:
    from aecurves.curves import Curve
    from aecurves.models import ConvAutoencoder

    a, b = _endpoint_state(), _endpoint_state(seed=2)
    curve = Curve(ConvAutoencoder(**ARCH), "bezier", 3, True, True)
    curve.set_endpoints(a["model"], b["model"])
    curve.init_linear()
    config = {"model": model, "model_kwargs": model_kwargs, **ARCH}
    return {"kind": "curve", "curve": curve.curve_state(), "model_config": config, "optimizer": {}, "epoch": 1,
            "metrics": [], "args": {"init_start": str(start), "init_end": str(end), "dataset": "synthetic",
                                    "limit": 64, "val_fraction": 0.25, "loss": "mse", "curve": "Bezier",
                                    "num_bends": 3, "fix_start": True, "fix_end": True, "epochs": 2}}


def _commands(tmp: "Path", evil, curve) -> dict:
    out = tmp / "out"
    small = ["--no-progress", "--device", "cpu"]
    resume = tmp / "resume"
    return {
        "eval-curve --segment": ["eval-curve", "--segment", evil, evil, "--out", out, *small],
        "eval-curve --ckpt": ["eval-curve", "--ckpt", curve, "--out", out, *small],
        "train --init": ["train", "--init", evil, "--epochs", 1, "--out", out, *small],
        "train --resume": ["train", "--resume", "--out", resume, *small],
        "train-curve": ["train-curve", "--init-start", evil, "--init-end", evil, "--epochs", 1, "--out", out, *small],
        "align": ["align", "--init-start", evil, "--init-end", evil, "--out", tmp / "aligned.pt", *small],
        "plane --points": ["plane", "--points", evil, evil, evil, "--out", out, *small],
        "plane --ckpt": ["plane", "--ckpt", curve, "--out", out, *small],
        "export-point": ["export-point", "--ckpt", curve, "--t", 0.5, "--out", tmp / "point.pt", *small],
    }


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_checkpoint_never_runs_code_it_names(spelling, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import aecurves

    marker = tmp_path / "MARKER"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(HUBCONF.format(marker=str(marker)))
    cwd = tmp_path / "w1" / "w2"
    cwd.mkdir(parents=True)
    (cwd / "aecurves.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    src = Path(aecurves.__file__).resolve().parents[1]
    spec, kwargs = SPELLINGS[spelling]
    spec = spec.format(src=src)
    kwargs = {k: (v.format(hub=hub) if isinstance(v, str) else v) for k, v in kwargs.items()}

    good, evil = tmp_path / "good.pt", tmp_path / "evil.pt"
    save_checkpoint(good, _endpoint_state())
    save_checkpoint(evil, _endpoint_state(spec, kwargs))
    (tmp_path / "resume").mkdir()
    save_checkpoint(tmp_path / "resume/checkpoint.pt", _endpoint_state(spec, kwargs))
    curve = tmp_path / "curve.pt"
    save_checkpoint(curve, _curve_state(spec, kwargs, good, good))

    for name, argv in _commands(tmp_path, evil, curve).items():
        code = run_cli(*argv)
        assert not marker.exists(), f"{name} ran the code a checkpoint named ({spelling})"
        err = capsys.readouterr().err
        assert code == 2 and f"pass --model {spec}" in err, (name, err)
    assert not (tmp_path / "out").exists()


def test_the_trust_rule_holds_for_a_study_folder_someone_sent(tmp_path, monkeypatch, capsys):
    """A study re-run adopts finished endpoints it finds, if made with its settings; endpoints that name outside
    code were made with another model than the study's, so it refuses before any stage runs, importing nothing
    (train --init refusing to build such an endpoint is tested above)."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    work = tmp_path / "w1" / "w2"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    study = tmp_path / "study"
    settings = ["--dataset", "synthetic", "--image-size", 16, "--limit", 64, "--width", 4, "--latent-dim", 8,
                "--losses", "mse", "--seeds", "1,2", "--epochs", 1, "--curve-epochs", 1, "--no-align",
                "--plane-grid", 0, "--num-points", 2, "--bn-images", 16, "--train-images", 16, "--ensemble", 0,
                "--val-fraction", 0.25, "--device", "cpu", "--no-progress", "--out", study]
    for seed in (1, 2):
        folder = study / f"endpoints/mse_seed{seed}"
        folder.mkdir(parents=True)
        state = _endpoint_state("aecurves.x/../../../evil.py:factory", seed=seed, epochs=1, batch_size=32,
                                lr=3e-3, lr_schedule="paper", wd=0.0, use_test=False)
        save_checkpoint(folder / "checkpoint.pt", state)
        (folder / "metrics.jsonl").write_text("")
        (folder / "reconstructions.png").write_bytes(b"")
    assert run_cli("study", *settings) == 2
    err = capsys.readouterr().err
    assert "endpoint:mse:1" in err and "model='aecurves.x/../../../evil.py:factory' (existing)" in err
    assert "Traceback" not in err and not marker.exists()


def test_load_factory_takes_only_names_its_module_defines(tmp_path, monkeypatch):
    from aecurves.models import ConvAutoencoder, load_factory

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mine.py").write_text("from torch import nn\nfrom os import system\n\n\n"
                                      "def build(**kw):\n    return nn.Linear(2, 2)\n")
    assert load_factory(BUILTIN_MODEL) is ConvAutoencoder
    assert load_factory("mine:build").__name__ == "build"
    assert load_factory(f"{tmp_path}/mine.py:build").__name__ == "build"
    for spec, match in (("mine:system", "not defined in mine"), ("mine:nn", "no callable"),
                        ("mine:build.__call__", "FACTORY a name"), ("aecurves.models:torch", "no callable"),
                        ("aecurves.models:nn.Linear", "FACTORY a name"), ("a/b:c", "neither a module"),
                        (f"{tmp_path}:build", "neither a module"), (f"{tmp_path}.py:build", "does not exist")):
        with pytest.raises(UserError, match=match):
            load_factory(spec)
    (tmp_path / "folder.py").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_factory(f"{tmp_path}/folder.py:build")


# ----------------------------------------------------------------------------------------------------------
# what a checkpoint holds is checked before it is used


def _damaged(tmp_path, change) -> "Path":
    state = _endpoint_state()
    change(state)
    save_checkpoint(tmp_path / "damaged.pt", state)
    return tmp_path / "damaged.pt"


def _nan(state):
    state["model"]["decoder_input.bias"][3] = float("nan")


def _inf_buffer(state):
    state["model"]["encoder.0.1.running_var"][0] = float("inf")


def _extra_key(state):
    state["model"]["smuggled.weight"] = state["model"]["decoder_input.bias"].clone()


def _reshaped(state):
    state["model"]["decoder_input.weight"] = state["model"]["decoder_input.weight"].reshape(-1, 4)


def _no_latent_dim(state):
    del state["args"]["latent_dim"]


def _kind_a_list(state):
    state["kind"] = ["endpoint"]


def _beyond_float32(state):  # finite in the file, inf once loaded into the float32 network
    state["model"]["decoder_input.weight"] = state["model"]["decoder_input.weight"].double() * 1e300


def _complex(state):  # torch casts it to real with only a warning, dropping the NaN
    import torch

    bias = state["model"]["decoder_input.bias"]
    state["model"]["decoder_input.bias"] = torch.complex(bias, torch.full_like(bias, float("nan")))


def _integer(state):
    state["model"]["decoder_input.bias"] = state["model"]["decoder_input.bias"].round().long()


def _negative_variance(state):  # BatchNorm's 1/sqrt(var + eps) is then NaN
    state["model"]["encoder.0.1.running_var"][2] = -1.0


DAMAGES = {  # change -> what the message names
    "NaN weight": (_nan, r"non-finite values \(NaN or inf\) in decoder_input.bias"),
    "inf BatchNorm statistic": (_inf_buffer, "non-finite values .* in encoder.0.1.running_var"),
    "extra state-dict key": (_extra_key, "do not fit its network: unexpected smuggled.weight"),
    "reshaped weight": (_reshaped, r"shapes \(file vs model\) decoder_input.weight \(256, 4\) vs \(128, 8\)"),
    "no latent_dim": (_no_latent_dim, "damaged or was not written by aecurves: .*latent_dim"),
    "kind is a list": (_kind_a_list, "not an aecurves checkpoint"),
    "float64 weights x1e300": (_beyond_float32, r"non-finite values \(NaN or inf\) once cast to the network's dtype "
                                                "in decoder_input.weight"),
    "complex weight, NaN imaginary part": (_complex, "complex tensors in decoder_input.bias"),
    "integer weight": (_integer, r"wrong kind of number in decoder_input.bias \(torch.int64 vs torch.float32\)"),
    "negative BatchNorm variance": (_negative_variance, "negative BatchNorm variances in encoder.0.1.running_var"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_endpoint_is_refused_by_every_command_naming_the_file(damage, tmp_path, capsys):
    change, words = DAMAGES[damage]
    bad, good = _damaged(tmp_path, change), tmp_path / "good.pt"
    save_checkpoint(good, _endpoint_state())
    out = tmp_path / "out"
    for argv in (["eval-curve", "--segment", good, bad], ["train-curve", "--init-start", bad, "--init-end", good],
                 ["align", "--init-start", good, "--init-end", bad], ["plane", "--points", good, good, bad],
                 ["train", "--init", bad, "--epochs", 1], ["fge", "--ckpt", bad, "--epochs", 1],
                 ["align", "--init-start", good, "--init-end", bad, "--method", "mixed"]):
        last = ["--out", tmp_path / "aligned.pt"] if argv[0] == "align" else ["--out", out]
        assert run_cli(*argv, *last, "--no-progress", "--device", "cpu") == 2, argv[0]
        err = capsys.readouterr().err
        assert str(bad) in err and "Traceback" not in err, (argv[0], err)
        import re

        assert re.search(words, err), (argv[0], err)
    assert not out.exists() and not (tmp_path / "aligned.pt").exists()


def test_a_curve_with_nan_weights_is_refused(tmp_path, capsys):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _endpoint_state())
    state = _curve_state(BUILTIN_MODEL, {}, good, good)
    state["curve"]["bends"][1, 5] = float("nan")
    save_checkpoint(tmp_path / "curve.pt", state)
    for argv in (["export-point", "--ckpt", tmp_path / "curve.pt", "--t", 0.5, "--out", tmp_path / "p.pt"],
                 ["eval-curve", "--ckpt", tmp_path / "curve.pt", "--out", tmp_path / "ev"],
                 ["plane", "--ckpt", tmp_path / "curve.pt", "--out", tmp_path / "pl"]):
        assert run_cli(*argv, "--no-progress", "--device", "cpu") == 2
        assert "non-finite values (NaN or inf) in bends" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pt", "good.pt"]


def test_endpoints_trained_on_different_data_need_a_choice(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(a, _endpoint_state())
    save_checkpoint(b, _endpoint_state(limit=128))
    assert run_cli("eval-curve", "--segment", a, b, "--out", tmp_path / "ev", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "trained on different data: limit=64 vs limit=128" in err and "Pass --dataset" in err
    assert run_cli("align", "--init-start", a, "--init-end", b, "--out", tmp_path / "al.pt", "--no-progress") == 2
    assert "Pass networks trained on the same data" in capsys.readouterr().err
    from aecurves.checkpoint import load_endpoint_pair

    _, _, arch = load_endpoint_pair(a, b, data_chosen=True)  # told which data to use: accepted
    assert arch["width"] == 4
    assert not (tmp_path / "ev").exists() and not (tmp_path / "al.pt").exists()


def test_a_curve_whose_endpoint_moved_resumes_from_the_new_path(tiny_endpoints, tmp_path, capsys):
    import shutil

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    shutil.copy(tiny_endpoints[0], a)
    shutil.copy(tiny_endpoints[1], b)
    common = ["--fix-start", "--fix-end", "--batch-size", 32, "--bn-images", 64, "--no-progress", "--device", "cpu"]
    assert run_cli("train-curve", "--init-start", a, "--init-end", b, "--epochs", 1, *common,
                   "--out", tmp_path / "c") == 0
    (tmp_path / "moved").mkdir()
    a.rename(tmp_path / "moved/a.pt")
    assert run_cli("train-curve", "--out", tmp_path / "c", "--resume", "--epochs", 2, "--no-progress") == 2
    assert "does not exist" in capsys.readouterr().err
    # a different network at the new path is refused: the curve's fixed start is not it
    assert run_cli("train-curve", "--out", tmp_path / "c", "--resume", "--epochs", 2, "--init-start", b,
                   "--no-progress") == 2
    assert "is not the network this curve was trained from" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "c/checkpoint.pt", "curve")["epoch"] == 1
    assert run_cli("train-curve", "--out", tmp_path / "c", "--resume", "--epochs", 2, "--init-start",
                   tmp_path / "moved/a.pt", "--no-progress") == 0
    state = load_checkpoint(tmp_path / "c/checkpoint.pt", "curve")
    assert state["epoch"] == 2 and state["args"]["init_start"] == str(tmp_path / "moved/a.pt")


def test_a_curve_whose_float64_bends_overflow_float32_is_refused(tmp_path, capsys):
    """Finite in the file, inf once copied into the float32 bends: refused as the network holds them, naming the
    file, before any work."""
    good = tmp_path / "good.pt"
    save_checkpoint(good, _endpoint_state())
    state = _curve_state(BUILTIN_MODEL, {}, good, good)
    state["curve"]["bends"] = state["curve"]["bends"].double()
    state["curve"]["bends"][1, 5] = 1e300
    save_checkpoint(tmp_path / "curve.pt", state)
    for argv in (["export-point", "--ckpt", tmp_path / "curve.pt", "--t", 0.5, "--out", tmp_path / "p.pt"],
                 ["eval-curve", "--ckpt", tmp_path / "curve.pt", "--out", tmp_path / "ev"],
                 ["plane", "--ckpt", tmp_path / "curve.pt", "--out", tmp_path / "pl"]):
        assert run_cli(*argv, "--no-progress", "--device", "cpu") == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'curve.pt'} holds non-finite values (NaN or inf) once cast to the network's dtype in " \
               "bends[1]" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pt", "good.pt"]


def test_a_divergence_before_the_first_save_promises_no_checkpoint(tmp_path, monkeypatch, capsys):
    """The message once sent the user to 'the last good checkpoint' when none had been written (epoch 1)."""
    from aecurves import training

    from conftest import TINY

    real = training.train_one_epoch

    def diverging(*args, **kwargs):
        real(*args, **kwargs)
        training.check_finite(float("nan"), "epoch 1")

    monkeypatch.setattr("aecurves.commands.train.train_one_epoch", diverging)
    assert run_cli("train", *TINY, "--epochs", 2, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "The training loss became nan at epoch 1" in err and "last good checkpoint" not in err
    assert "If it holds none (the run stopped before its first save, e.g. in epoch 1), no checkpoint was written" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
