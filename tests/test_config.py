"""Tests for aecurves.config: one dataclass per command, defaults written once, validation, resume settling."""

import dataclasses

import pytest

from aecurves import config
from aecurves.config import (
    EvalCurveConfig,
    ExportPointConfig,
    StudyConfig,
    TrainConfig,
    TrainCurveConfig,
    as_record,
    make,
    settle_with_checkpoint,
)
from aecurves.errors import UserError


def default(cls, name):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_study_shares_the_commands_defaults_and_help():
    """The study's stage settings are the commands' own fields (same_as), not second copies; so are the data and
    runtime settings every command shares (DataConfig, RuntimeConfig)."""
    for study_name, cls, name in (("latent_dim", TrainConfig, "latent_dim"),
                                  ("num_points", EvalCurveConfig, "num_points"),
                                  ("bn_images", EvalCurveConfig, "bn_images"), ("curve", TrainCurveConfig, "curve"),
                                  ("curve_lr_schedule", TrainCurveConfig, "lr_schedule"),
                                  ("t_sampling", TrainCurveConfig, "t_sampling"), ("wd", TrainCurveConfig, "wd")):
        assert default(StudyConfig, study_name) == default(cls, name), study_name
    assert default(ExportPointConfig, "bn_images") == default(EvalCurveConfig, "bn_images") == config.BN_IMAGES
    assert StudyConfig.__dataclass_fields__["num_bends"].metadata["minimum"] == 3  # both ends fixed in a study
    assert TrainCurveConfig.__dataclass_fields__["num_bends"].metadata["minimum"] == 2
    for cls in config.COMMANDS.values():
        for shared in (config.DataConfig, config.RuntimeConfig):
            for f in dataclasses.fields(shared):
                evaluation = f.name == "precision" and cls in (EvalCurveConfig, config.PlaneConfig)  # fp32 or bf16
                if f.name in cls.__dataclass_fields__ and not evaluation:
                    mine = cls.__dataclass_fields__[f.name]
                    assert {k: mine.metadata[k] for k in ("choices", "minimum", "maximum", "aliases")} == \
                        {k: f.metadata[k] for k in ("choices", "minimum", "maximum", "aliases")}, (cls, f.name)
                    if default(cls, f.name) is not None:  # None: the checkpoint's (train-curve: the endpoints')
                        assert default(cls, f.name) == default(shared, f.name), (cls, f.name)


def test_preset_fields_default_to_none_and_every_preset_sets_them():
    for name in ("dataset", "epochs", "lr", "batch_size", "width", "curve_epochs", "curve_lr", "save_every_epoch"):
        assert default(StudyConfig, name) is None, name
        assert all(name in values for values in config.PRESETS.values()), name
    assert set().union(*config.PRESETS.values()) <= {f.name for f in dataclasses.fields(StudyConfig)}


def test_make_records_what_was_given_and_validates():
    cfg = make(TrainConfig, {"epochs": 3, "lr": 0.5})
    assert cfg.given == ("epochs", "lr") and cfg.epochs == 3 and cfg.batch_size == default(TrainConfig, "batch_size")
    assert "given" not in as_record(cfg) and as_record(cfg)["epochs"] == 3
    with pytest.raises(TypeError, match="no field"):
        make(TrainConfig, {"epoch": 3})
    for change, phrase in (({"epochs": 0}, "--epochs must be at least 1"), ({"lr": 0.0}, "--lr must be positive"),
                           ({"lr_schedule": "step"}, "Unknown --lr-schedule"), ({"batch_size": 2.5}, "integer"),
                           ({"wd": -1.0}, "--wd must be at least 0"), ({"latent_dim": True}, "integer")):
        with pytest.raises(UserError, match=phrase):
            make(TrainConfig, change)


def test_settle_with_checkpoint():
    """Each field of a role not given takes the checkpoint's value (a checkpoint from before a setting: the field's
    legacy value); one given must agree; a carried one takes the checkpoint's unless given, and may change."""
    saved = {"loss": "vgg", "seed": 7, "epochs": 12}
    cfg = make(TrainCurveConfig, {"seed": 7, "lr": 0.5})
    settle_with_checkpoint(cfg, saved, "ckpt.pt")
    assert (cfg.loss, cfg.seed, cfg.lr_schedule, cfg.t_sampling) == ("vgg", 7, "constant", "uniform")  # legacy
    assert (cfg.epochs, cfg.lr) == (12, 0.5)  # carried: the checkpoint's unless given
    cfg = make(TrainCurveConfig, {"loss": "mse", "seed": 8, "epochs": 20})
    with pytest.raises(UserError, match="loss='vgg' vs loss='mse'; seed=7 vs seed=8"):
        settle_with_checkpoint(cfg, saved, "ckpt.pt")
    cfg = make(TrainConfig, {"epochs": 3, "latent_dim": 8})  # train --init: the data and the model, nothing carried
    settle_with_checkpoint(cfg, {"dataset": "synthetic", "latent_dim": 8, "seed": 5, "epochs": 9}, "init.pt",
                           roles=("data", "model"), carry=False)
    assert (cfg.dataset, cfg.latent_dim, cfg.seed, cfg.epochs) == ("synthetic", 8, 42, 3)


def test_roles_say_what_resume_and_the_study_compare():
    """The fields of each role, in the commands' order: what --resume compares, what train --init keeps, what
    train-curve takes from its endpoints, and the data two endpoints must share."""
    assert config.role_fields(config.DataConfig, "data") == ("dataset", "data_dir", "image_size", "limit",
                                                             "val_fraction", "use_test")
    assert config.role_fields(TrainConfig, "data", "model") == (
        "dataset", "data_dir", "image_size", "limit", "val_fraction", "use_test", "model", "model_kwargs",
        "latent_dim", "width", "loss", "kl_weight")
    assert config.role_fields(TrainConfig, "input", "result") == ("batch_size", "epochs", "lr", "lr_schedule", "wd",
                                                                  "seed", "init")
    carried = {cls: [f.name for f in dataclasses.fields(cls) if f.metadata["carried"]]
               for cls in (TrainConfig, TrainCurveConfig, config.FgeConfig)}
    assert carried == {TrainConfig: ["epochs", "lr", "save_every_epoch"],
                       TrainCurveConfig: ["epochs", "lr", "save_every_epoch"], config.FgeConfig: ["epochs"]}
    # train-curve takes every data setting, use_test too, and the loss from its endpoints unless given
    inherited = config.role_fields(TrainCurveConfig, "data", "model")
    assert inherited == ("dataset", "data_dir", "image_size", "limit", "val_fraction", "use_test", "loss", "kl_weight")
    assert all(default(TrainCurveConfig, k) is None for k in inherited)
    # runtime settings never define a result
    for cls in config.COMMANDS.values():
        runtime = {f.name for f in dataclasses.fields(config.RuntimeConfig)} & {f.name for f in dataclasses.fields(cls)}
        assert not set(config.role_fields(cls, *config.ROLES)) & runtime, cls


def test_parse_json_object():
    assert config.parse_json_object('{"hidden": 5}') == {"hidden": 5}
    with pytest.raises(UserError, match="not JSON"):
        config.parse_json_object("{hidden: 5}")
    with pytest.raises(UserError, match="JSON object"):
        config.parse_json_object("[5]")


def test_non_finite_numbers_and_empty_out_are_refused():
    for change, phrase in (({"lr": float("nan")}, "--lr must be a finite number"),
                           ({"wd": float("nan")}, "--wd must be a finite number"),
                           ({"lr": float("inf")}, "--lr must be a finite number"),
                           ({"out": ""}, "--out must name a folder")):
        with pytest.raises(UserError, match=phrase):
            make(TrainConfig, change)
    with pytest.raises(UserError, match="--t must be a finite number"):
        make(ExportPointConfig, {"ckpt": "c.pt", "t": float("nan"), "out": "p.pt"})


def test_to_toml_reads_back_exactly(tmp_path):
    """TOML has no null: a table holding one is written as JSON text, which read_config_file parses back."""
    tables = {"plain": {"hidden": 5, "f": 1e-05, "inf": float("inf"), "deep": {"l": [1, [2.5, "é"], {}]}},
              "null": {"hidden": None, "deep": [{"a": None}, "😀"], "f": -0.0},
              "keys": {"😀 \"q\" \\ \x7f\n": 1, "": "\x7f\t"}}
    for name, kwargs in tables.items():
        record = {"model_kwargs": kwargs, "out": "dir é \"q\" \x7f", "limit": None, "lr": 0.1 + 0.2}
        file = tmp_path / f"{name}.toml"
        file.write_text(config.to_toml(record), encoding="utf-8")
        assert "# limit is not set\n" in config.to_toml(record)
        assert config.read_config_file(str(file), TrainConfig) == {k: v for k, v in record.items() if v is not None}
    assert config.to_toml({"model_kwargs": tables["null"]}).startswith('model_kwargs = "{')
    assert config.to_toml({"model_kwargs": tables["plain"]}).startswith('model_kwargs = {"hidden" = 5, ')


def test_required_settings_and_list_lengths():
    cfg = make(ExportPointConfig, {"t": 0.5})  # a config may be incomplete until its --config file is merged
    with pytest.raises(UserError, match=r"^Missing required setting\(s\) --ckpt and --out: "):
        config.check_required(cfg)
    config.check_required(make(ExportPointConfig, {"ckpt": "c.pt", "t": 0.5, "out": "p.pt"}))
    for value in (["a.pt"], ["a.pt", 2]):  # a config file bypasses argparse's nargs=2 and its str type
        with pytest.raises(UserError, match=r"--segment takes exactly 2 values \(START END\)"):
            make(EvalCurveConfig, {"segment": value})


# ----------------------------------------------------------------------------------------------------------
# a setting whose feature is off is refused, not ignored (`needs`)

NEEDS = {("AlignConfig", "alpha"), ("AlignConfig", "steps"), ("AlignConfig", "ste_lr"), ("AlignConfig", "match_at"),
         ("AlignConfig", "images"), ("AlignConfig", "seed"), ("AlignConfig", "vgg_weights"),
         ("StudyConfig", "fge_cycle"), ("StudyConfig", "align_method"), ("StudyConfig", "align_latent")}


def _changed(f: dataclasses.Field):
    """A valid value other than the field's default."""
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != f.default)
    kind = config.value_type(f)
    if kind is int:
        return (f.default or 2) + 2
    return f.default / 2 if kind is float else "random"


def test_every_setting_with_needs_is_refused_while_its_feature_is_off_and_used_while_on():
    found = set()
    for cls in config.COMMANDS.values():
        for f in dataclasses.fields(cls):
            needs = f.metadata.get("needs")
            if not needs:
                continue
            found.add((cls.__name__, f.name))
            fields = cls.__dataclass_fields__
            values = as_record(make(cls, {}))
            for k, ok in needs:  # every feature it needs off
                values[k] = next(v for v in (fields[k].metadata.get("choices") or (False, True)) if v not in ok)
            values[f.name] = _changed(f)
            with pytest.raises(UserError, match=f"^{config.flag_name(f.name)} .* would be ignored with "):
                config.check_needs(cls, values)
            config.check_needs(cls, {**values, f.name: default(cls, f.name)})  # the default is no request
            for k, ok in needs:  # any one of its needs on: used
                config.check_needs(cls, {**values, k: ok[0]})
    assert found == NEEDS


def test_the_study_refuses_settings_of_stages_it_does_not_run_but_reads_its_own_record_back(tmp_path):
    import json

    from aecurves.cli import parse
    from aecurves.commands import study

    for given, flag in (({"fge": False, "fge_cycle": 6}, "--fge-cycle 6 would be ignored with --no-fge"),
                        ({"align": False, "align_method": "weights"}, "--align-method weights would be ignored with "
                                                                      "--no-align"),
                        ({"align": False, "align_latent": "none"}, "--align-latent none would be ignored")):
        with pytest.raises(UserError, match=flag):
            study.resolve(make(StudyConfig, {"losses": "mse", **given}))
    # study.json records the resolved cycle and the default alignment even when those stages are off: read back
    # (aecurves study --config study.json), they are no request
    cfg = study.resolve(make(StudyConfig, {"losses": "mse", "fge": False, "align": False}))
    assert cfg.fge_cycle is not None
    (tmp_path / "study.json").write_text(json.dumps({"config": study.study_record(cfg)}))
    again = study.resolve(parse(["study", "--config", str(tmp_path / "study.json")])[1])
    assert again.fge_cycle == cfg.fge_cycle and again.align_method == cfg.align_method
    # the study's own align stages never trip align's check, whatever the method
    for method in config.ALIGN_METHODS:
        cfg = study.resolve(make(StudyConfig, {"losses": "mse,vgg", "align_method": method}))
        config.check_needs(config.AlignConfig, vars(study.section(cfg, "aligns")))
