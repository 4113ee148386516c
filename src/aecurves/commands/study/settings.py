"""The study's settings, resolved once: the preset's values for what was left unset, checked, and frozen.

`resolve(StudyConfig)` gives `Settings`, every field of StudyConfig with its resolved value (the losses and seeds as
tuples, the FGE cycle chosen, the width dropped for a model without one). Each stage's config is its section's
(`section`), made from these settings as each field's `sets` metadata says.
"""

import dataclasses
import functools
import operator
import typing
from pathlib import Path

from aecurves.config import (
    BUILTIN_MODEL,
    DEFAULT_IMAGE_SIZE,
    FGE_LR_2_RATIO,
    LOSSES,
    MAX_SEED,
    MAX_SEEDS,
    PRESETS,
    SLURM,
    STUDY_SECTIONS,
    FgeConfig,
    StudyConfig,
    as_record,
    check_needs,
    section_settings,
    study_setting_of,
    takes_width,
    validate,
)
from aecurves.errors import UserError

# the fields whose resolved type differs from StudyConfig's: lists become tuples (Settings is frozen), and a value
# a preset fills is never None once resolved
_TUPLES = {"losses": tuple[str, ...], "seeds": tuple[int, ...], "force": tuple[str, ...],
           "slurm_setup": tuple[str, ...], "slurm_extra": tuple[str, ...]}


def _resolved_type(f: dataclasses.Field):
    if f.name in _TUPLES:
        return _TUPLES[f.name]
    kept = tuple(a for a in typing.get_args(f.type) if a is not type(None))
    if f.name in PRESETS["demo"] and kept:
        return functools.reduce(operator.or_, kept)
    return f.type


# Settings: StudyConfig's fields (but `given`), resolved; generated so that no field or default is written twice.
Settings = dataclasses.make_dataclass(
    "Settings", [(f.name, _resolved_type(f)) for f in dataclasses.fields(StudyConfig) if f.name != "given"],
    frozen=True,
    namespace={"__doc__": "The study's resolved settings (resolve): StudyConfig's fields with the values it runs "
                          "with; frozen, picklable (a stage's job carries them to its worker or Slurm job).",
               "pairs": property(lambda self: [(a, b) for i, a in enumerate(self.seeds) for b in self.seeds[i + 1:]]),
               "root": property(lambda self: Path(self.out))})
Settings.__module__ = __name__  # where pickle finds it (make_dataclass takes module= only from Python 3.12)


def resolve(config: StudyConfig) -> "Settings":
    """The study's settings: the preset's values for every field left at None, validated and normalised."""
    validate(config)
    values = as_record(config)
    for k, v in PRESETS[config.preset].items():
        if values[k] is None:
            values[k] = v
    values["losses"] = _losses(values["losses"])
    values["seeds"] = _seeds(values["seeds"])

    from aecurves.curves import make_coefficients

    values["curve"] = make_coefficients(values["curve"], values["num_bends"]).name
    resolve_fge_cycle(values)
    _check_data(values)
    if values["image_size"] is None:
        values["image_size"] = DEFAULT_IMAGE_SIZE.get(values["dataset"], 64)
    check_executor_flags(values)
    if values["wandb"] and not values["wandb_group"]:  # the study's W&B runs are grouped under its folder's name
        values["wandb_group"] = Path(values["out"]).resolve().name
    unset = {**values, "fge": False, "fge_cycle": None}
    resolve_fge_cycle(unset)  # the cycle when none is given, as study.json records it: no request of its own
    check_needs(StudyConfig, values, defaults={"fge_cycle": unset["fge_cycle"]})  # e.g. --no-align --align-method
    if not takes_width(values["model"]):
        if "width" in config.given:
            raise UserError(f"--width is a setting of the built-in convolutional models; pass the settings of --model "
                            f"{values['model']} with --model-kwargs JSON.")
        values["width"] = None
    return Settings(**{k: tuple(v) if k in _TUPLES else v for k, v in values.items()})


def _losses(text) -> list[str]:
    losses = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    bad = [s for s in losses if s not in LOSSES]
    if not losses or bad or len(set(losses)) != len(losses):
        raise UserError(f"--losses takes a comma-separated list of distinct losses from {', '.join(LOSSES)} "
                        f"(e.g. mse,vgg); got {text!r}.")
    return losses


def _seeds(text) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma-separated list of integers, e.g. 1,2,3; got {text!r}.") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs at least two distinct seeds (one curve per pair), e.g. 1,2,3; got {text!r}.")
    if len(seeds) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in seeds):
        raise UserError(f"--seeds takes 2 to {MAX_SEEDS} seeds, each from 0 to {MAX_SEED}; got {text!r}.")
    return sorted(seeds)


def _check_data(values: dict) -> None:
    """--data-dir where the dataset needs one, made absolute, and never the parent of --out."""
    dataset = values["dataset"]
    if dataset in ("celeba", "folder") and not values["data_dir"]:
        where = ("the folder holding img_align_celeba/ (or img_align_celeba.zip) and, optionally, "
                 "list_eval_partition.txt" if dataset == "celeba" else "a folder of images")
        raise UserError(f"The {dataset} dataset needs --data-dir DIR: {where}. "
                        + ("For example: aecurves study --preset celeba --data-dir data/celeba. "
                           if dataset == "celeba" else "")
                        + "Without data, `aecurves study` (the demo preset) runs on embedded LFW faces.")
    if values["data_dir"]:
        values["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
        from aecurves.data import check_outside_data

        check_outside_data(values["out"], values["data_dir"], "--out")


def fge_snapshots(epochs: int, cycle: int) -> int:
    """How many snapshots an FGE run of `epochs` epochs in cycles of `cycle` takes (fge.py's rule)."""
    from aecurves.schedules import snapshot_epochs

    return len(snapshot_epochs(epochs, cycle))


def resolve_fge_cycle(values: dict) -> None:
    """--fge-cycle: when not given, FGE's own default cycle (4, as in fge.py) if it takes at least 2 snapshots within
    the equal budget (--curve-epochs), else 2, the shortest cycle (a snapshot every other epoch). A cycle that takes
    no snapshot within the budget is refused, before anything runs."""
    default = FgeConfig.__dataclass_fields__["cycle"].default
    epochs = values["curve_epochs"]
    if values["fge_cycle"] is None:
        values["fge_cycle"] = default if not epochs or fge_snapshots(epochs, default) >= 2 else 2
    cycle = values["fge_cycle"]
    if not values["fge"] or not epochs:
        return
    if cycle % 2:
        raise UserError(f"--fge-cycle must be an even number of epochs, got {cycle}: FGE takes a snapshot at the end "
                        "of each cycle's first half, where the lr is lowest. Pass --fge-cycle 2, 4 ..., or --no-fge.")
    if fge_snapshots(epochs, cycle) == 0:
        raise UserError(f"--fge-cycle {cycle} takes no FGE snapshot within the study's equal budget of --curve-epochs "
                        f"{epochs} epochs: the first is taken at the end of epoch {cycle // 2} (counting from 1). "
                        f"Pass an even --fge-cycle of at most {2 * epochs} (2 takes one every other epoch), more "
                        "--curve-epochs, or --no-fge; nothing was run.")


def check_executor_flags(values: dict) -> None:
    """--slurm-* settings only with --executor slurm, --jobs/--devices/--gpus-per-train only with local (a value
    other than the default is a request the other executors would silently ignore)."""
    fields = dataclasses.fields(StudyConfig)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in fields}
    # each executor's settings are those of its --help group (RuntimeConfig): the local one's share the group
    # of --executor itself
    for executor, group in (("slurm", SLURM), ("local", "executor")):
        names = [f.name for f in fields if f.metadata.get("group") == group and f.name != "executor"]
        set_ = [k for k in names if values[k] != defaults[k]]
        if set_ and values["executor"] != executor:
            flags = ", ".join("--" + k.replace("_", "-") for k in set_)
            raise UserError(f"{flags} {'is a setting' if len(set_) == 1 else 'are settings'} of --executor "
                            f"{executor}; add --executor {executor}, or leave "
                            f"{'it' if len(set_) == 1 else 'them'} out.")
    bad = [kv for kv in values["slurm_extra"] if "=" not in kv or not kv.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"--slurm-extra takes KEY=VALUE (e.g. constraint=a100), got {', '.join(map(repr, bad))}.")


def as_values(settings: "Settings") -> dict:
    """The settings as study.json writes them: plain JSON values (lists for the tuples)."""
    return {f.name: list(v) if isinstance(v := getattr(settings, f.name), tuple) else v
            for f in dataclasses.fields(settings)}


def study_record(settings: "Settings") -> dict:
    """study.json's "config": the resolved settings that say what the study is, not how this run was asked to go
    (--force, --plan, progress bars, the executor: recorded=False), so a study folder reads the same whoever ran it
    where (where it ran is in its provenance)."""
    keep = {f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get("recorded", True)}
    return {k: v for k, v in as_values(settings).items() if k in keep}


def resolved_config(config: StudyConfig) -> dict:
    """The settings the study runs with (`aecurves study --print-config`), as its study.json records them."""
    return study_record(resolve(config))


def section(settings: "Settings", name: str):
    """The config every stage of the section `name` starts from: its command's config with what the study fixes for
    it (config.STUDY_SECTIONS) and every study setting copied into the fields its `sets` names. A setting left unset
    (None) leaves its field unset; the others count as given, as if they were flags."""
    cls, fixed = STUDY_SECTIONS[name]
    values = {**fixed, **section_settings(as_values(settings), name)}
    if name != "endpoints" and values.get("model") == BUILTIN_MODEL:
        del values["model"]  # a command that reads checkpoints takes --model only to allow a factory outside aecurves
    if name == "aligns" and values["method"] != "learned":
        del values["vgg_weights"]  # only the learned method runs the loss (a vgg group's needs the study's weights)
    if name == "fges":  # fge's own lr_2, resolved, so that fge.json records the value the study compares
        values["lr_2"] = values["lr_1"] * FGE_LR_2_RATIO
    return cls(**values, given=tuple(k for k, v in values.items() if v is not None))


def section_record(settings: "Settings", name: str) -> dict:
    """study.json's record of a section: what every stage of that kind gets from the study (the settings its
    section gives), besides the stage's own files, seed and folder; like the study's record, without the settings
    that only say how this run was asked to go (progress bars)."""
    config = section(settings, name)
    setting_of = study_setting_of()
    unrecorded = {f.name for f in dataclasses.fields(StudyConfig) if not f.metadata["recorded"]}
    return {k: getattr(config, k) for k in config.given if setting_of.get((name, k)) not in unrecorded}


def gpus_per_train(settings: "Settings") -> int:
    """DistributedDataParallel processes per endpoint and extra training stage."""
    if settings.executor == "slurm":
        return settings.slurm_train_tasks or max(1, settings.slurm_gpus)
    return settings.gpus_per_train if settings.executor == "local" else 1


def local_devices(settings: "Settings") -> list[str]:
    from aecurves.executors import visible_devices

    return [d.strip() for d in settings.devices.split(",")] if settings.devices else visible_devices()


def slurm_settings(settings: "Settings"):
    """executors.SlurmSettings from the study's --slurm-* flags (their names without the prefix)."""
    from aecurves.executors import SlurmSettings

    return SlurmSettings(**{f.name: getattr(settings, "slurm_" + f.name) for f in dataclasses.fields(SlurmSettings)})
