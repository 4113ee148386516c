"""Tests for aecurves.cli: flags built from the config dataclasses."""

import dataclasses
import json
from pathlib import Path

import pytest

from aecurves import __version__, config
from aecurves.cli import get_args_parser, main, parse


def test_flags_spellings_and_given():
    command, cfg = parse(["train", "--batch_size", "8", "--data_path", "/d", "--dir", "out", "--use-test",
                          "--model-kwargs", '{"a": 1}'])
    assert command == "train" and isinstance(cfg, config.TrainConfig)
    assert (cfg.batch_size, cfg.data_dir, cfg.out, cfg.use_test, cfg.model_kwargs) == (8, "/d", "out", True, {"a": 1})
    assert set(cfg.given) == {"batch_size", "data_dir", "out", "use_test", "model_kwargs"}
    _, cfg = parse(["eval-curve", "--no-segment-too", "--segment", "a.pt", "b.pt"])
    assert cfg.segment_too is False and cfg.segment == ["a.pt", "b.pt"]
    _, cfg = parse(["study", "--force", "curves", "--force", "report"])
    assert cfg.force == ["curves", "report"] and cfg.epochs is None
    _, cfg = parse(["report", "some/study"])
    assert cfg.study_dir == "some/study"


def test_every_command_parses_to_its_defaults():
    required = {"export-point": ["--ckpt", "c.pt", "--t", "0.5", "--out", "p.pt"],
                "align": ["--init-start", "a.pt", "--init-end", "b.pt", "--out", "c.pt"]}
    for command, cls in config.COMMANDS.items():
        _, cfg = parse([command, *required.get(command, [])])
        fresh = cls(**{k: getattr(cfg, k) for k in cfg.given})
        assert config.as_record(cfg) == config.as_record(fresh), command


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["eval-curve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {config.BN_IMAGES})" in out and "(default: 61)" in out
    assert "--precision {fp32,bf16}" in out and "(default: fp32)" in out  # it measures in fp32 unless asked


def test_abbreviations_are_refused_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["train", "--epoch", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        get_args_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"aecurves {__version__}"


def test_bad_values_exit_2_with_a_message(capsys, tmp_path):
    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert main(["train-curve", "--lr", "-1"]) == 2
    assert "--lr must be positive" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_config_file_round_trip_and_flags_override(tmp_path, capsys):
    assert main(["study", "--preset", "celeba", "--data-dir", str(tmp_path), "--seeds", "4,5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "study.toml").write_text(printed)
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed  # the printed settings are a config file that reads back the same
    _, cfg = parse(["study", "--config", str(tmp_path / "study.toml"), "--epochs", "3"])
    assert cfg.epochs == 3 and cfg.seeds == "4,5" and cfg.preset == "celeba" and cfg.width == 32
    assert "epochs" in cfg.given and "seeds" in cfg.given and "limit" not in cfg.given  # unset values stay unset
    (tmp_path / "train.toml").write_text('batch-size = 16\nlr = 1\nmodel_kwargs = {hidden = 8}\n')
    _, cfg = parse(["train", "--config", str(tmp_path / "train.toml")])
    assert (cfg.batch_size, cfg.lr, cfg.model_kwargs) == (16, 1, {"hidden": 8})


def test_a_studys_own_record_reproduces_it(tmp_path, capsys):
    import json

    assert main(["study", "--losses", "mse", "--epochs", "7", "--print-config"]) == 0
    resolved = capsys.readouterr().out
    record = {"format_version": 1, "config": {**{"losses": ["mse"], "seeds": [1, 2, 3], "epochs": 7}}}
    (tmp_path / "study.json").write_text(json.dumps(record))
    assert main(["study", "--config", str(tmp_path / "study.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == resolved


def test_bad_config_files(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epochs = \n")
    (tmp_path / "unknown.toml").write_text("epoch = 3\n")
    (tmp_path / "value.toml").write_text('epochs = "many"\n')
    (tmp_path / "kwargs.toml").write_text('model_kwargs = 5\n')
    (tmp_path / "out.toml").write_text('out = 5\n')
    for name, phrase in (("bad.toml", "could not be read"), ("unknown.toml", "unknown setting(s) epoch"),
                         ("value.toml", "--epochs must be an integer"), ("none.toml", "no such file"),
                         ("kwargs.toml", "--model-kwargs must be a table"), ("out.toml", "--out must be a string")):
        flags = [] if name == "out.toml" else ["--out", str(tmp_path / "r")]  # a flag would override the file
        assert main(["train", "--config", str(tmp_path / name), *flags]) == 2
        assert phrase in capsys.readouterr().err, name
    assert not (tmp_path / "r").exists()


def test_exit_codes_user_error_2_bug_propagates_interrupt_130(monkeypatch, tmp_path, capsys):
    from aecurves.commands import train

    def bug(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed: Python prints the traceback and exits 1
        main(["train", "--out", str(tmp_path)])

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    assert main(["train", "--out", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# --print-config reads back with --config: every command, every setting

MODELS_FILE = Path(__file__).with_name("ae_models.py")
# model_kwargs that no TOML table holds (a null), nested, with floats that must stay exact, unicode and escapes
ODD_KWARGS = {"hidden": None, "nested": {"a": [1, 2.5, None, "é ☃ 😀"], "b": {}, "c": [[True, -0.0]]},
              "small": 1e-05, "big": 2 ** 40, "quote \"and\" \\ \x7f": "line\nbreak"}
# Settings whose values must mean something (a custom model, a curve, the study's lists) even to be printed; every
# other setting gets any value its field accepts.
MEANINGFUL = {"model": f"{MODELS_FILE}:mlp_autoencoder", "model_kwargs": json.dumps(ODD_KWARGS),
              "curve": "PolyChain", "losses": "vgg,mse", "seeds": "2,5,9", "vgg_weights": "random",
              "slurm_extra": ["constraint=a100 é", "gres=gpu:2"], "fge_cycle": 2}  # --curve-epochs 2's own cycle
# width is a setting of the built-in model, refused with a custom one: it stays unset; the study's settings of its
# local executor are refused with the slurm one its executor gets here, and those of the stages that --no-fge and
# --no-align turn off with them (config.check_needs), but the FGE cycle the study would take anyway (MEANINGFUL)
LEFT_AT_DEFAULT = {"width", "jobs", "devices", "gpus_per_train", "align_method", "align_latent"}
# a study.json records the study's settings, not this run's --force, its progress bars or where it ran
NOT_RECORDED = {"study": {f.name for f in dataclasses.fields(config.StudyConfig) if not f.metadata["recorded"]}}


def non_default_value(f, tmp_path: Path):
    """A value for field `f` that differs from its default and passes its bounds and choices."""
    meta, kind = f.metadata, config.value_type(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if f.name in MEANINGFUL:
        return MEANINGFUL[f.name]
    if meta.get("choices"):
        return next(c for c in reversed(meta["choices"]) if c != default)
    if kind in (int, float):
        step = 1 if kind is int else 0.25
        value = (default if default is not None else meta.get("minimum") or 0) + step
        return min(value, meta["maximum"]) if meta.get("maximum") is not None else value
    path = str(tmp_path / f"{f.name} é ☃")  # unicode, and a space the TOML string keeps
    if kind is list:
        return [f"{path} {i}" for i in range(meta["nargs"] if isinstance(meta.get("nargs"), int) else 2)]
    return path


def non_default_argv(cls, tmp_path: Path) -> list[str]:
    argv = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in LEFT_AT_DEFAULT:
            continue
        if config.value_type(f) is bool:
            argv.append(meta.get("negative_flag") or config.flag_name(f.name))
            continue
        value = non_default_value(f, tmp_path)
        if meta.get("positional"):
            argv.append(str(value))
        elif meta.get("repeat"):
            for v in value:
                argv += [config.flag_name(f.name), v]
        else:
            argv += [config.flag_name(f.name), *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


@pytest.mark.parametrize("command", list(config.COMMANDS))
def test_every_command_prints_a_config_that_reads_back(command, tmp_path, capsys):
    cls = config.COMMANDS[command]
    argv = non_default_argv(cls, tmp_path)
    _, original = parse([command, *argv])
    unchanged = {k for k, v in config.as_record(original).items() if v == config.as_record(cls())[k]}
    assert unchanged <= LEFT_AT_DEFAULT, f"{command}: no non-default value for {sorted(unchanged)}"

    assert main([command, *argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "None" not in printed
    file = tmp_path / "printed.toml"
    file.write_text(printed, encoding="utf-8")
    model = getattr(original, "model", None)  # a custom factory is imported only when the command line names it
    _, back = parse([command, "--config", str(file), *(["--model", model] if model else [])])
    skipped = NOT_RECORDED.get(command, set())
    expected = {k: v for k, v in config.as_record(original).items() if k not in skipped}
    assert {k: v for k, v in config.as_record(back).items() if k not in skipped} == expected
    assert main([command, "--config", str(file), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("command", ["train", "study"])
def test_a_custom_model_prints_without_width(command, tmp_path, capsys):
    model = f"{MODELS_FILE}:mlp_autoencoder"
    assert main([command, "--model", model, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# width is not set\n" in printed
    (tmp_path / "c.toml").write_text(printed)
    _, cfg = parse([command, "--config", str(tmp_path / "c.toml"), "--model", model])
    assert "width" not in cfg.given and cfg.model == model
    assert main([command, "--model", model, "--width", "8", "--print-config"]) == 2  # refused, as the run does
    assert "--width is a setting of the built-in convolutional models" in capsys.readouterr().err


def test_required_settings_may_come_from_a_config_file(tmp_path, capsys):
    flags = ["--init-start", "a.pt", "--init-end", "b.pt", "--out", "c.pt"]
    assert main(["align", *flags, "--print-config"]) == 0
    (tmp_path / "align.toml").write_text(capsys.readouterr().out)
    _, cfg = parse(["align", "--config", str(tmp_path / "align.toml")])
    assert (cfg.init_start, cfg.init_end, cfg.out) == ("a.pt", "b.pt", "c.pt")

    assert main(["align", "--init-end", "b.pt", "--print-config"]) == 0  # prints what is set
    printed = capsys.readouterr().out
    assert "# init_start is not set\n" in printed and "# out is not set\n" in printed
    (tmp_path / "partial.toml").write_text(printed)
    assert main(["align", "--config", str(tmp_path / "partial.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--init-start and --out" in err and "--init-end" not in err
    assert err.count("\n") == 1  # one paragraph
    assert main(["export-point", "--t", "0.5"]) == 2
    assert "--ckpt and --out" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["export-point", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "curve checkpoint (from train-curve) (required)" in help_text


def test_config_help_says_what_each_command_reads(tmp_path, capsys):
    for command in config.COMMANDS:
        with pytest.raises(SystemExit):
            get_args_parser().parse_args([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        config_help = help_text.rsplit("--config FILE", 1)[1].split("--print-config print the")[0]
        assert "TOML file whose keys are the flag names" in config_help
        assert ("study.json" in config_help) is (command == "study"), command

    record = {"format_version": 1, "config": {"losses": ["mse"], "seeds": [1, 2], "epochs": 7}}
    (tmp_path / "study.json").write_text(json.dumps(record))
    assert main(["train", "--config", str(tmp_path / "study.json")]) == 2
    assert "only `aecurves study` reads" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "no such file" not in err
    assert main(["study", "--config", str(tmp_path)]) == 2
    assert f"--config {tmp_path / 'study.json'}" in capsys.readouterr().err  # the study record in that folder


def test_a_config_file_never_decides_what_code_runs(tmp_path, capsys):
    """A file may name a custom factory, but it is imported only when --model on the command line names it too."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                      "def factory(**kw):\n    raise SystemExit(0)\n")
    spec = f"{tmp_path}/evil.py:factory"
    for command in ("train", "study"):
        file = tmp_path / f"{command}.toml"
        file.write_text(f"model = {json.dumps(spec)}\nepochs = 1\nout = {json.dumps(str(tmp_path / command))}\n")
        assert main([command, "--config", str(file), "--dataset", "synthetic", "--limit", "64", "--image-size",
                     "16", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"add --model {spec}" in err and not marker.exists() and not (tmp_path / command).exists()
        _, cfg = parse([command, "--config", str(file), "--model", spec])  # named on the command line: allowed
        assert cfg.model == spec


def test_every_command_dispatches_to_a_module_with_run():
    import importlib

    from aecurves import cli

    assert set(cli.MODULES) == set(config.COMMANDS)
    for command, name in cli.MODULES.items():
        assert callable(importlib.import_module(name).run), command


def test_the_version_is_the_installed_packages():
    from importlib.metadata import version

    assert __version__ == version("aecurves") and __version__[0].isdigit()


def test_every_flag_that_takes_a_file_says_a_folder_is_a_folder(tiny_endpoints, tmp_path, capsys):
    """A folder passed where a file is expected once read 'no such file' or 'does not exist. It is a folder'."""
    a = tiny_endpoints[0]
    folder = tmp_path / "a folder"
    folder.mkdir()
    out = tmp_path / "out"
    small = ["--no-progress", "--device", "cpu"]
    uses = {"train --init": ["train", "--init", folder, "--out", out],
            "train --checkpoint": ["train", "--checkpoint", folder, "--out", out],
            "train --vgg-weights": ["train", "--dataset", "synthetic", "--limit", 64, "--image-size", 16, "--loss",
                                    "vgg", "--vgg-weights", folder, "--epochs", 1, "--out", out],
            "train-curve --init-start": ["train-curve", "--init-start", folder, "--init-end", a, "--out", out],
            "eval-curve --segment": ["eval-curve", "--segment", a, folder, "--out", out],
            "eval-curve --ckpt": ["eval-curve", "--ckpt", folder, "--out", out],
            "export-point --ckpt": ["export-point", "--ckpt", folder, "--t", 0.5, "--out", tmp_path / "p.pt"],
            "align --init-end": ["align", "--init-start", a, "--init-end", folder, "--out", tmp_path / "p.pt"],
            "plane --points": ["plane", "--points", a, a, folder, "--out", out],
            "plane --ckpt": ["plane", "--ckpt", folder, "--out", out],
            "fge --ckpt": ["fge", "--ckpt", folder, "--out", out],
            "--config": ["train", "--config", folder],
            "--model": ["train", "--model", f"{folder}.py:build", "--out", out]}
    (tmp_path / "a folder.py").mkdir()
    for use, argv in uses.items():
        assert main([str(v) for v in (*argv, *small)]) == 2, use
        err = capsys.readouterr().err
        assert "is a folder" in err and "no such file" not in err and "does not exist" not in err, (use, err)
        assert "Traceback" not in err and not out.exists() and not (tmp_path / "p.pt").exists(), use
