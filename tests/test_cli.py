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
    required = {"export-point": ["--ckpt", "c.pt", "--t", "0.5", "--out", "p.pt"]}
    for command, cls in config.COMMANDS.items():
        _, cfg = parse([command, *required.get(command, [])])
        fresh = cls(**{k: getattr(cfg, k) for k in cfg.given})
        assert config.as_record(cfg) == config.as_record(fresh), command


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["eval-curve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {config.BN_IMAGES})" in out and "(default: 61)" in out
    assert "--precision" not in out  # eval-curve always measures in fp32; the flag that did nothing is gone


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
