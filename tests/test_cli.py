"""Tests for aecurves.cli: flags built from the config dataclasses."""

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
    from aecurves import train

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
