"""`aecurves study`: the whole experiment in one command, resumable, ending in a report.

For every loss in `losses` (default mse, vgg) and every seed in `seeds` (default 1, 2, 3) an endpoint is
trained; within each loss group every pair of endpoints (A, B) is connected by a curve (Bezier, 3 bends, both ends
fixed), and every curve is evaluated at `num_points` values of t together with the straight segment between its
ends. With --align (the default) B is also aligned to A (`aecurves align`: its hidden units permuted, its latent
code mapped, the same function), and a curve to the aligned B is trained and evaluated with its segment, the
aligned segment. With --extra-training (the default) every endpoint is also trained on for as long as a curve
(`aecurves train --init`), and those endpoints are measured like the paths' points: the fair comparison for a
path's best point. With --fge (the default) every endpoint is also the start of fast geometric ensembling for as
long as a curve (`aecurves fge`), and every pair's ensembles at that equal budget are measured on the held-out
images (ensembles.run: the FGE snapshots of both endpoints' runs pooled, and the two extra-trained endpoints
averaged), for the report's table beside the curve ensemble. Finally report.html / report.md are written. Each
stage calls the same function as its own subcommand (train.run, align.run, train_curve.run, eval_curve.run,
fge.run; the ensembles stage, which has no command of its own, ensembles.run) with that command's config: the
section of its kind (config.STUDY_SECTIONS: endpoints, extras, fges, aligns, curves, evals, ensembles, planes),
made from the study's settings as each one's `sets` metadata says, with the stage's own files, seed and folder. So
defaults cannot drift and each stage folder holds exactly that command's files.

Layout of the study folder (`--out`, default runs/study):

    study.json                          resolved configuration, groups (run / skipped and why), stage list
    endpoints/{loss}_seed{s}/           `aecurves train` run: checkpoint.pt, metrics.jsonl, reconstructions.png
    endpoints/{loss}_seed{s}_extra/     `aecurves train --init` of that endpoint, as long as a curve
    aligned/{loss}_seed{b}-to-seed{a}/  `aecurves align`: checkpoint.pt, B aligned to A
    curves/{loss}_seed{a}-seed{b}/      `aecurves train-curve` run: checkpoint.pt, metrics.jsonl
    curves/{loss}_seed{a}-seed{b}/eval/ `aecurves eval-curve` of that curve AND of the straight segment between
                                        its ends: eval.json, curve.npz (segment_* keys), loss_along_path.png,
                                        reconstructions.png, reconstructions_segment.png
    curves/{loss}_seed{a}-seed{b}_aligned/[eval/]  the same, from A to the aligned B
    baselines/{loss}_seed{a}-seed{b}/   `aecurves eval-curve --segment` of the two extra-trained endpoints, t = 0, 1
    fge/{loss}_seed{s}/                 `aecurves fge --ckpt` that endpoint, as long as a curve: snapshot_K.pt, fge.json
    ensembles/{loss}_seed{a}-seed{b}/   ensembles.json: output averages of the pair's FGE snapshots (each run's and
                                        pooled) and of its extra-trained endpoints, on the held-out images
    curves/{loss}_seed{a}-seed{b}/plane/  `aecurves plane` through that curve's bends (first pair; --plane-grid)
    report.html, report.md, report.json the report (report.json: every number it shows)
    report_files/                       the report's figures
Every stage folder also holds study_stage.json (the stage's status and a SHA-256 of each input file).

Stage names (for --force): endpoint:{loss}:{s}, extra:{loss}:{s}, fge:{loss}:{s}, align:{loss}:{a}-{b},
curve:{loss}:{a}-{b}, aligned-curve:{loss}:{a}-{b}, eval:{loss}:{a}-{b}, aligned-eval:{loss}:{a}-{b},
baseline:{loss}:{a}-{b}, ensembles:{loss}:{a}-{b}, plane:{loss}:{a}-{b}, report. --force also takes `endpoints`,
`extras`, `fges`, `aligns`, `curves`, `evals`, `ensembles`, `planes`, a loss (`mse`, `vgg`: its whole group), a
prefix such as `curve:mse`, or `all`.

Resuming. A stage is finished when its outputs are complete (an endpoint's checkpoint.pt at the requested
epoch, a curve's checkpoint at the requested curve epoch, an evaluation's eval.json and every file it lists),
they were made with the requested settings (read back from the checkpoint's / eval.json's own record), and
the input files they were made from are unchanged (SHA-256 in study_stage.json). Finished stages are skipped;
an interrupted training stage resumes from its last checkpoint; a stage whose inputs changed (e.g. its
endpoint was redone) is redone. When the requested settings differ from those of existing outputs (say
--epochs changed), the study refuses before doing anything and names the stages and settings: pass
`--force STAGE` to redo them (what is built on them is then redone too) or choose another --out.
Runtime settings (device, precision, progress bars, cache folder) never invalidate anything.
Outputs from the same commands run by hand (e.g. endpoints trained under torchrun into
endpoints/mse_seed1) are adopted when they match.

The stages form a graph: each names the stages that make its input files (`deps`), and each kind of stage is one
entry of KINDS (its command and section, what the stage adds to the section, how its outputs are read back and
judged). The settings that define a stage's result are its config's fields of a result role (config.ROLES), the
same that its command compares on --resume. The Driver hands every stage whose dependencies are finished to an
executor (executors.py): serial, local worker processes or Slurm jobs, each running a StageJob, a picklable call of
COMMAND.run(config).
"""

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aecurves import runtime
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
    AlignConfig,
    EnsemblesConfig,
    EvalCurveConfig,
    FgeConfig,
    StudyConfig,
    as_record,
    check_needs,
    recorded_value,
    replace_given,
    result_settings,
    section_settings,
    study_setting_of,
    takes_width,
    to_toml,
    validate,
)
from aecurves.errors import UserError, call_guarded
from aecurves.files import clear_folder, folder_lock, read_json, refuse_study_links, sha256, write_json
from aecurves.records import (
    EndpointRecord,
    EvalRecord,
    NewerFormat,
    PlaneRecord,
    RecordError,
    StageRecord,
    StudyRecord,
    check_format,
    other_outputs,
    with_article,
)

FORMAT_VERSION = StudyRecord.FORMAT  # of study.json (CHANGELOG.md; records.StudyRecord)
# the newest formats of the files this release writes that have no records type (checkpoint.FORMAT_VERSION,
# fge.FORMAT, ensembles.FORMAT; those modules import torch, this one does not), for refusing a newer release's
CHECKPOINT_FORMAT, FGE_FORMAT, ENSEMBLES_FORMAT = 1, 1, 1
STAGE_RECORD = "study_stage.json"
INTERRUPTED = ("\ninterrupted; every finished stage is kept in {out}. Re-run the same command to continue: finished "
               "stages are skipped and an interrupted training stage resumes from its last checkpoint.")

# First guesses of what the VGG16 features cost per image, relative to the autoencoder's forward pass, for the time
# estimate before a stage of that kind has run (then the measured rate is used). Measured on the demo on this
# project's 2-core CPU: a vgg training stage took 15x its mse twin; an evaluation with VGG metrics ~48 units/image.
VGG_TRAIN_COST = 15.0
VGG_EVAL_COST = 48.0
RUNTIME_NOTE = "device, precision, progress bars and the cache folder never invalidate finished stages"
VGG_REMEDY = ("Re-run the same command with --vgg-weights PATH (a saved vgg16 state dict), or once torchvision's "
              "VGG16 ImageNet file is in its cache (see the reason); the finished stages are kept and only the vgg "
              "group runs.")


# ----------------------------------------------------------------------------------------------------------
# configuration


def resolve_study_config(config: StudyConfig) -> dict:
    """The study's settings: the preset's values for every field left at None, validated and normalised."""
    validate(config)
    cfg = as_record(config)
    for k, v in PRESETS[config.preset].items():
        if cfg[k] is None:
            cfg[k] = v

    losses = [s.strip().lower() for s in str(cfg["losses"]).split(",") if s.strip()]
    bad = [s for s in losses if s not in LOSSES]
    if not losses or bad or len(set(losses)) != len(losses):
        raise UserError(f"--losses takes a comma-separated list of distinct losses from {', '.join(LOSSES)} "
                        f"(e.g. mse,vgg); got {cfg['losses']!r}.")
    cfg["losses"] = losses
    try:
        seeds = [int(s) for s in str(cfg["seeds"]).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma-separated list of integers, e.g. 1,2,3; got {cfg['seeds']!r}.") \
            from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs at least two distinct seeds (one curve per pair), e.g. 1,2,3; "
                        f"got {cfg['seeds']!r}.")
    if len(seeds) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in seeds):
        raise UserError(f"--seeds takes 2 to {MAX_SEEDS} seeds, each from 0 to {MAX_SEED}; got {cfg['seeds']!r}.")
    cfg["seeds"] = sorted(seeds)

    from aecurves.curves import make_coefficients

    cfg["curve"] = make_coefficients(cfg["curve"], cfg["num_bends"]).name
    resolve_fge_cycle(cfg)
    if cfg["dataset"] in ("celeba", "folder") and not cfg["data_dir"]:
        where = ("the folder holding img_align_celeba/ (or img_align_celeba.zip) and, optionally, "
                 "list_eval_partition.txt" if cfg["dataset"] == "celeba" else "a folder of images")
        raise UserError(f"The {cfg['dataset']} dataset needs --data-dir DIR: {where}. "
                        + ("For example: aecurves study --preset celeba --data-dir data/celeba. "
                           if cfg["dataset"] == "celeba" else "")
                        + "Without data, `aecurves study` (the demo preset) runs on embedded LFW faces.")
    if cfg["data_dir"]:
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
        from aecurves.data import check_outside_data

        check_outside_data(cfg["out"], cfg["data_dir"], "--out")
    if cfg["image_size"] is None:
        cfg["image_size"] = DEFAULT_IMAGE_SIZE.get(cfg["dataset"], 64)
    check_executor_flags(cfg)
    unset = {**cfg, "fge": False, "fge_cycle": None}
    resolve_fge_cycle(unset)  # the cycle when none is given, as study.json records it: no request of its own
    check_needs(StudyConfig, cfg, defaults={"fge_cycle": unset["fge_cycle"]})  # e.g. --no-align --align-method
    if not takes_width(cfg["model"]):
        if "width" in config.given:
            raise UserError(f"--width is a setting of the built-in convolutional models; pass the settings of --model "
                            f"{cfg['model']} with --model-kwargs JSON.")
        cfg["width"] = None
    return cfg


def fge_snapshots(epochs: int, cycle: int) -> int:
    """How many snapshots an FGE run of `epochs` epochs in cycles of `cycle` takes (fge.py's rule)."""
    from aecurves.schedules import snapshot_epochs

    return len(snapshot_epochs(epochs, cycle))


def resolve_fge_cycle(cfg: dict) -> None:
    """--fge-cycle: when not given, FGE's own default cycle (4, as in fge.py) if it takes at least 2 snapshots within
    the equal budget (--curve-epochs), else 2, the shortest cycle (a snapshot every other epoch). A cycle that takes
    no snapshot within the budget is refused, before anything runs."""
    default = FgeConfig.__dataclass_fields__["cycle"].default
    epochs = cfg["curve_epochs"]
    if cfg["fge_cycle"] is None:
        cfg["fge_cycle"] = default if not epochs or fge_snapshots(epochs, default) >= 2 else 2
    cycle = cfg["fge_cycle"]
    if not cfg["fge"] or not epochs:
        return
    if cycle % 2:
        raise UserError(f"--fge-cycle must be an even number of epochs, got {cycle}: FGE takes a snapshot at the end "
                        "of each cycle's first half, where the lr is lowest. Pass --fge-cycle 2, 4 ..., or --no-fge.")
    if fge_snapshots(epochs, cycle) == 0:
        raise UserError(f"--fge-cycle {cycle} takes no FGE snapshot within the study's equal budget of --curve-epochs "
                        f"{epochs} epochs: the first is taken at the end of epoch {cycle // 2} (counting from 1). "
                        f"Pass an even --fge-cycle of at most {2 * epochs} (2 takes one every other epoch), more "
                        "--curve-epochs, or --no-fge; nothing was run.")


def resolved_config(config: StudyConfig) -> dict:
    """The settings the study runs with (`aecurves study --print-config`), as its study.json records them."""
    return study_record(resolve_study_config(config))


def study_record(cfg: dict) -> dict:
    """study.json's "config": the resolved settings that say what the study is, not how this run was asked to go
    (--force, --plan, progress bars, the executor: recorded=False), so a study folder reads the same whoever ran it
    where (where it ran is in its provenance)."""
    keep = {f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get("recorded", True)}
    return {k: v for k, v in cfg.items() if k in keep}


def section(cfg: dict, name: str):
    """The config every stage of the section `name` starts from: its command's config with what the study fixes for
    it (config.STUDY_SECTIONS) and every study setting copied into the fields its `sets` names. A setting left unset
    (None) leaves its field unset; the others count as given, as if they were flags."""
    cls, fixed = STUDY_SECTIONS[name]
    values = {**fixed, **section_settings(cfg, name)}
    if name != "endpoints" and values.get("model") == BUILTIN_MODEL:
        del values["model"]  # a command that reads checkpoints takes --model only to allow a factory outside aecurves
    if name == "aligns" and values["method"] != "learned":
        del values["vgg_weights"]  # only the learned method runs the loss (a vgg group's needs the study's weights)
    if name == "fges":  # fge's own lr_2, resolved, so that fge.json records the value the study compares
        values["lr_2"] = values["lr_1"] * FGE_LR_2_RATIO
    return cls(**values, given=tuple(k for k, v in values.items() if v is not None))


def section_record(cfg: dict, name: str) -> dict:
    """study.json's record of a section: what every stage of that kind gets from the study (the settings its
    section gives), besides the stage's own files, seed and folder; like the study's record, without the settings
    that only say how this run was asked to go (progress bars)."""
    config = section(cfg, name)
    setting_of = study_setting_of()
    unrecorded = {f.name for f in dataclasses.fields(StudyConfig) if not f.metadata["recorded"]}
    return {k: getattr(config, k) for k in config.given if setting_of.get((name, k)) not in unrecorded}


def ensemble_members(cfg: dict, loss: str, a: int, b: int) -> tuple[list[str], dict]:
    """(the input files of a pair's ensembles stage, relative to the study folder; {average: indices into them}):
    the FGE snapshots of A's and B's runs, each run's alone and pooled, and the two extra-trained endpoints, each
    alone and averaged (each kind when the study runs it)."""
    files, averages = [], {}
    if cfg["fge"]:
        n = fge_snapshots(cfg["curve_epochs"], cfg["fge_cycle"])
        for seed, which in ((a, "start"), (b, "end")):
            averages[f"fge_{which}"] = list(range(len(files), len(files) + n))
            files += [f"{fge_folder(loss, seed)}/{snapshot_file(k)}" for k in range(1, n + 1)]
        averages["fge_pooled"] = averages["fge_start"] + averages["fge_end"]
    if cfg["extra_training"]:
        averages.update(extra_start=[len(files)], extra_end=[len(files) + 1],
                        extra_average=[len(files), len(files) + 1])
        files += [f"{extra_folder(loss, s)}/checkpoint.pt" for s in (a, b)]
    return files, averages


def snapshot_file(k: int) -> str:
    return f"snapshot_{k}.pt"  # fge.snapshot_name (fge is not imported here: it imports torch)


# ----------------------------------------------------------------------------------------------------------
# stages


@dataclass
class Stage:
    name: str           # endpoint:mse:1, extra:mse:1, align:mse:1-2, curve:mse:1-2, aligned-curve:mse:1-2, ...
    kind: str           # endpoint, extra, align, curve, eval, report
    label: str          # what the progress line shows
    folder: str         # relative to the study folder
    loss: str | None = None
    seeds: tuple = ()
    inputs: list = field(default_factory=list)  # files (relative) this stage is made from
    units: float = 0.0  # relative cost, for the time estimate
    deps: tuple = ()    # the stages that make its inputs (the report: every other stage)
    makes: tuple = ("checkpoint.pt",)  # its files other stages take as inputs (relative to its folder)

    @property
    def step(self) -> str:
        """What the stage does: its name up to the loss (curve and aligned-curve are both of kind curve)."""
        return self.name.split(":")[0]


def endpoint_folder(loss: str, seed: int) -> str:
    return f"endpoints/{loss}_seed{seed}"


def extra_folder(loss: str, seed: int) -> str:
    return f"endpoints/{loss}_seed{seed}_extra"


def curve_folder(loss: str, a: int, b: int, aligned: bool = False) -> str:
    return f"curves/{loss}_seed{a}-seed{b}" + ("_aligned" if aligned else "")


def aligned_folder(loss: str, a: int, b: int) -> str:
    return f"aligned/{loss}_seed{b}-to-seed{a}"


def baseline_folder(loss: str, a: int, b: int) -> str:
    return f"baselines/{loss}_seed{a}-seed{b}"


def fge_folder(loss: str, seed: int) -> str:
    return f"fge/{loss}_seed{seed}"


def ensembles_folder(loss: str, a: int, b: int) -> str:
    return f"ensembles/{loss}_seed{a}-seed{b}"


def plan(cfg: dict, n_train: int, n_test: int, perceptual: bool = False) -> list[Stage]:
    """Every stage of the study in order (all loss groups, then the report).

    A stage's `units` estimate its cost in images passed through the autoencoder (a training step counts 3:
    forward and backward); VGG features add VGG_TRAIN_COST or VGG_EVAL_COST per image. Training scales with
    epochs × images, an evaluation with points × images. On the demo the measured seconds per unit of the three
    kinds of mse stage agree within 15% (1.4e-4 to 1.6e-4 s on this project's 2-core CPU), so the first stages'
    rate predicts the rest. `perceptual`: evaluations also measure the VGG perceptual metric.
    """
    stages = []
    bn = min(cfg["bn_images"], n_train)
    pairs = list(itertools.combinations(cfg["seeds"], 2))
    for loss in cfg["losses"]:
        heavy = VGG_TRAIN_COST if loss == "vgg" else 1.0
        ckpt = {s: f"{endpoint_folder(loss, s)}/checkpoint.pt" for s in cfg["seeds"]}
        for s in cfg["seeds"]:
            stages.append(Stage(f"endpoint:{loss}:{s}", "endpoint", f"train {loss} seed {s}",
                                endpoint_folder(loss, s), loss, (s,),
                                units=cfg["epochs"] * (3 * n_train + n_test) * heavy))
        if cfg["extra_training"]:
            for s in cfg["seeds"]:
                stages.append(Stage(f"extra:{loss}:{s}", "extra", f"train {loss} seed {s} as long as a curve",
                                    extra_folder(loss, s), loss, (s,), [ckpt[s]],
                                    units=cfg["curve_epochs"] * (3 * n_train + n_test) * heavy))
        if cfg["fge"]:
            n = fge_snapshots(cfg["curve_epochs"], cfg["fge_cycle"])
            for s in cfg["seeds"]:  # training, then BN statistics and the held-out images for every snapshot
                stages.append(Stage(f"fge:{loss}:{s}", "fge", f"fge {loss} seed {s} as long as a curve",
                                    fge_folder(loss, s), loss, (s,), [ckpt[s]],
                                    units=cfg["curve_epochs"] * (3 * n_train + n_test) * heavy
                                    + (n + 1) * (bn + 2 * n_test),
                                    makes=("checkpoint.pt", *(snapshot_file(k) for k in range(1, n + 1)))))
        if cfg["align"]:
            for a, b in pairs:
                stages.append(Stage(f"align:{loss}:{a}-{b}", "align", f"align {loss} seed {b} to seed {a}",
                                    aligned_folder(loss, a, b), loss, (a, b), [ckpt[a], ckpt[b]],
                                    units=4 * min(AlignConfig.images, n_train)))
        # per epoch: training steps (mixing the bends adds about one pass), then the midpoint monitor
        curve_units = cfg["curve_epochs"] * ((4 * n_train + n_test) * heavy + bn)
        for a, b in pairs:
            stages.append(Stage(f"curve:{loss}:{a}-{b}", "curve", f"train-curve {loss} seeds {a}-{b}",
                                curve_folder(loss, a, b), loss, (a, b), [ckpt[a], ckpt[b]], units=curve_units))
            if cfg["align"]:
                stages.append(Stage(f"aligned-curve:{loss}:{a}-{b}", "curve",
                                    f"train-curve {loss} seeds {a}-{b} aligned", curve_folder(loss, a, b, True),
                                    loss, (a, b), [ckpt[a], f"{aligned_folder(loss, a, b)}/checkpoint.pt"],
                                    units=curve_units))
        # per point of a path: BN statistics, then the train and test metrics
        metric = 1 + (VGG_EVAL_COST if loss == "vgg" or perceptual else 0.0)
        per_point = bn + (min(cfg["train_images"], n_train) + n_test) * metric
        for a, b in pairs:
            for aligned in (False, True)[:1 + cfg["align"]]:
                folder = curve_folder(loss, a, b, aligned)
                stages.append(Stage(f"{'aligned-' * aligned}eval:{loss}:{a}-{b}", "eval",
                                    f"eval-curve {loss} seeds {a}-{b}{' aligned' * aligned} (curve and segment)",
                                    folder + "/eval", loss, (a, b), [folder + "/checkpoint.pt"],
                                    units=2 * cfg["num_points"] * per_point + n_train
                                    + (cfg["ensemble"] + 1) * (bn + n_test)))
            if cfg["extra_training"]:
                stages.append(Stage(f"baseline:{loss}:{a}-{b}", "eval",
                                    f"eval-curve {loss} seeds {a}-{b} trained as long as a curve",
                                    baseline_folder(loss, a, b), loss, (a, b),
                                    [f"{extra_folder(loss, s)}/checkpoint.pt" for s in (a, b)],
                                    units=2 * per_point + n_train))
            if cfg["fge"] or cfg["extra_training"]:
                files, _ = ensemble_members(cfg, loss, a, b)
                stages.append(Stage(f"ensembles:{loss}:{a}-{b}", "ensembles",
                                    f"ensembles {loss} seeds {a}-{b} at equal budget", ensembles_folder(loss, a, b),
                                    loss, (a, b), files, units=len(files) * (bn + n_test)))
        if cfg["plane_grid"]:
            a, b = pairs[0]
            folder = curve_folder(loss, a, b)
            plane_point = bn + (min(cfg["train_images"], n_train) + n_test) * (1 + VGG_EVAL_COST * (loss == "vgg"))
            stages.append(Stage(f"plane:{loss}:{a}-{b}", "plane", f"plane {loss} seeds {a}-{b}", folder + "/plane",
                                loss, (a, b), [folder + "/checkpoint.pt"],
                                units=(cfg["plane_grid"] ** 2 + 3) * plane_point + n_train))
    stages.append(Stage("report", "report", "report", "."))
    return with_dependencies(stages)


def with_dependencies(stages: list[Stage]) -> list[Stage]:
    """Each stage's deps: the stages whose outputs are its input files (so they are not written twice); the report
    depends on every other stage. The list's order stays a valid order to run them in."""
    made_by = {}
    for st in stages:
        if st.kind == "report":
            st.deps = tuple(s.name for s in stages if s.kind != "report")
        else:
            st.deps = tuple(dict.fromkeys(made_by[p] for p in st.inputs))
        for name in st.makes:
            made_by[f"{st.folder}/{name}"] = st.name
    return stages


def select_forced(selectors: list[str], stages: list[Stage]) -> set[str]:
    """Stage names matched by the --force selectors; an unknown selector is an error."""
    chosen = set()
    kinds = {kind.section: name for name, kind in KINDS.items()}  # a section is named as --force names its kind
    for sel in selectors:
        sel = sel.strip().lower()
        hit = {s.name for s in stages
               if sel == "all" or sel == s.name or kinds.get(sel) == s.kind or sel == s.loss
               or s.name.startswith(sel + ":")}
        if not hit:
            names = ", ".join(s.name for s in stages)
            raise UserError(f"--force {sel!r} matches no stage of this study. Stage names: {names}; or one of "
                            "endpoints, extras, fges, aligns, curves, evals, ensembles, planes, report, a loss (e.g. "
                            "mse), a prefix such as curve:mse, or all.")
        chosen |= hit
    return chosen


def _load_ckpt(path: Path, kind: str):
    """A checkpoint of `kind`, or None when missing or unreadable; NewerFormat when a newer release wrote it (its
    layout may be what this release cannot read: it is no damaged file to redo)."""
    from aecurves.checkpoint import load_checkpoint

    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, kind)
    except UserError:
        state = _peek(path)
        if isinstance(state, dict):
            check_format(state, CHECKPOINT_FORMAT, str(path))
        return None
    check_format(state, CHECKPOINT_FORMAT, str(path))
    return state


def _peek(path: Path):
    """The file as torch.load(weights_only=True) reads it, or None."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: damaged, as load_checkpoint said
        return None


# ----------------------------------------------------------------------------------------------------------
# the stage table: per kind of stage, the command that makes it and its section, what the stage adds to it, how its
# outputs are read back, and when they are finished


def read_stage_record(folder: Path) -> StageRecord | None:
    """A stage's study_stage.json (records.StageRecord, either layout), or None when it is missing or damaged."""
    try:
        return StageRecord.from_json(read_json(folder / STAGE_RECORD), str(folder / STAGE_RECORD))
    except NewerFormat:
        raise
    except RecordError:
        return None


def _read_training(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    """An endpoint's, extra endpoint's or curve's checkpoint: its recorded config, epoch and promised files."""
    checkpoint = folder / "checkpoint.pt"
    state = _load_ckpt(checkpoint, "curve" if st.kind == "curve" else "endpoint")
    try:
        record = EndpointRecord.from_json(state, str(checkpoint)) if state is not None else None
    except NewerFormat:
        raise
    except RecordError:
        record = None
    if record is None:
        return None, {"exists": checkpoint.exists()}
    args = record.args
    promised = ["metrics.jsonl"] + (["reconstructions.png"] if st.kind != "curve" else [])
    return args, {"epoch": record.epoch, "outputs": all((folder / name).is_file() for name in promised),
                  "init": [args.get("init")] if st.kind == "extra" else [args.get("init_start"), args.get("init_end")]}


def _read_align(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    """The aligned endpoint's record of its alignment, which holds a setting only where its method uses it (alpha
    with mixed; the learned method's under "learned"): Kind.records_all is False."""
    state = _load_ckpt(folder / "checkpoint.pt", "endpoint")
    if state is None:
        return None, {"exists": (folder / "checkpoint.pt").exists()}
    aligned = state.get("aligned_to") or {}
    return aligned, {"init": [aligned.get("start"), aligned.get("end")]}


def _read_eval(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    """An evaluation's eval.json (records.EvalRecord, either layout) and the files it lists."""
    try:
        record = EvalRecord.from_json(read_json(folder / "eval.json"), str(folder / "eval.json"))
    except NewerFormat:
        raise
    except RecordError:
        return None, {"exists": (folder / "eval.json").exists()}
    files = record.files
    complete = bool(files) and all(isinstance(f, str) and (folder / Path(f).name).is_file() for f in files.values()) \
        and record.segment_evaluated is (st.step != "baseline")
    made_from = record.endpoints if st.step == "baseline" else [record.checkpoint]
    return record.config, {"complete": complete, "init": made_from or []}


def _read_plane(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    """A plane's plane.json (records.PlaneRecord, either layout) and the files it lists."""
    try:
        record = PlaneRecord.from_json(read_json(folder / "plane.json"), str(folder / "plane.json"))
    except NewerFormat:
        raise
    except RecordError:
        return None, {"exists": (folder / "plane.json").exists()}
    files = record.files
    complete = bool(files) and all(isinstance(f, str) and (folder / Path(f).name).is_file() for f in files.values())
    return record.config, {"complete": complete, "init": [str(Path(record.config.get("ckpt") or "").resolve())]}


def _read_fge(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    """An FGE run: fge.json (written last, when it finished) and the files it lists; else its checkpoint.pt (the
    training state after its last finished epoch)."""
    record = read_json(folder / "fge.json")
    if isinstance(record, dict):
        check_format(record, FGE_FORMAT, str(folder / "fge.json"), "format")
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        files = record.get("files") if isinstance(record.get("files"), dict) else {}
        listed = [v for k, v in files.items() if k != "snapshots"] + list(files.get("snapshots") or [])
        complete = bool(listed) and all(isinstance(f, str) and (folder / Path(f).name).is_file() for f in listed)
        return record["config"], {"finished": True, "complete": complete, "epoch": record.get("budget_epochs"),
                                  "init": [record["config"].get("ckpt")]}
    state = _load_ckpt(folder / "checkpoint.pt", "fge")
    if state is None:
        return None, {"exists": (folder / "checkpoint.pt").exists() or (folder / "fge.json").exists()
                      or any(folder.glob("snapshot_*.pt"))}
    args = state.get("args", {})
    return args, {"finished": False, "complete": False, "epoch": state.get("epoch"), "init": [args.get("ckpt")]}


def _judge_fge(config: FgeConfig, st: Stage, facts: dict) -> tuple[str, str]:
    target, epoch = config.epochs, facts["epoch"]
    if facts["finished"]:
        if epoch == target:
            return ("done", "") if facts["complete"] else ("redo", "some of its outputs are missing")
        return "redo", f"it ran {epoch} epochs, not {target}"
    if not isinstance(epoch, int):
        return "redo", "its checkpoint records no epoch"
    if epoch > target:
        return "redo", f"its checkpoint is at epoch {epoch}, beyond {target}"
    if epoch == target:
        return "resume", "interrupted while measuring its snapshots"
    return "resume", f"interrupted at epoch {epoch} of {target}"


def _read_ensembles(folder: Path, st: Stage) -> tuple[dict | None, dict]:
    record = read_json(folder / "ensembles.json")
    if isinstance(record, dict):
        check_format(record, ENSEMBLES_FORMAT, str(folder / "ensembles.json"), "format")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) \
            or not isinstance(record.get("averages"), dict):
        return None, {"exists": (folder / "ensembles.json").exists()}
    config = record["config"]
    networks = config.get("networks") if isinstance(config.get("networks"), list) else []
    return config, {"averages": config.get("averages"), "init": [str(Path(p).resolve()) for p in networks]}


def _judge_ensembles(config: EnsemblesConfig, st: Stage, facts: dict) -> tuple[str, str]:
    if facts["averages"] != config.averages:
        return "redo", "it measured other averages"
    return "done", ""


def _judge_training(config, st: Stage, facts: dict) -> tuple[str, str]:
    target = config.epochs
    if facts["epoch"] == target and not facts["outputs"]:
        return "resume", "some of its outputs are missing"  # a resumed run writes them again
    if facts["epoch"] == target:
        return "done", ""
    if facts["epoch"] < target:
        return "resume", f"interrupted at epoch {facts['epoch']} of {target}"
    return "redo", f"its checkpoint is at epoch {facts['epoch']}, beyond {target}"


def _judge_written_last(config, st: Stage, facts: dict) -> tuple[str, str]:
    """An evaluation or plane: eval.json / plane.json is renamed into place last, after every file it lists."""
    return ("done", "") if facts["complete"] else ("redo", "its evaluation files are incomplete")


def _eval_stage(cfg: dict, evals: EvalCurveConfig, st: Stage, folder: Path, inputs: list, resume: bool):
    """eval-curve --ckpt CURVE: the curve and its segment, in one evaluation; a baseline: eval-curve --segment of
    the two extra-trained endpoints at t = 0 and 1 only, measured exactly like every point of the paths."""
    if st.step == "baseline":
        return replace_given(evals, segment=[str(p) for p in inputs], num_points=2, num_images=0, ensemble=0,
                             out=str(folder))
    return replace_given(evals, ckpt=str(inputs[0]), out=str(folder))


@dataclass(frozen=True)
class Kind:
    """One kind of stage, made by `command` from the section `section` of the study's settings (section(), from
    config.STUDY_SECTIONS): `stage(cfg, section, st, folder, inputs, resume)` adds the stage's own files, seed and
    folder, which gives the config of the command's run(config). That config's settings of `roles` define the
    result (config.result_settings; the VGG weights too for a vgg-loss stage when `vgg_weights`); `read(folder,
    st)` finds the record of the settings its outputs were made with (`records_all`: a setting every record holds,
    so one without it is compared as its legacy value or None; else only those it holds are compared), with facts
    that `judge(config, st, facts)` turns into done / resume / redo; `keep` are the folders inside its own that
    belong to other stages."""

    command: str
    section: str
    stage: Callable
    read: Callable
    judge: Callable
    roles: tuple = ("data", "model", "result")
    vgg_weights: bool = True
    records_all: bool = True
    keep: tuple = ()


KINDS = {
    "endpoint": Kind("train", "endpoints",
                     lambda cfg, s, st, folder, inputs, resume: replace_given(
                         s, loss=st.loss, seed=st.seeds[0], out=str(folder), resume=resume),
                     _read_training, _judge_training),
    # trained on from its endpoint (train --init), whose data and model it keeps: the study checks that file's hash
    "extra": Kind("train", "extras",
                  lambda cfg, s, st, folder, inputs, resume: replace_given(
                      s, init=str(inputs[0]), seed=st.seeds[0], out=str(folder), resume=resume),
                  _read_training, _judge_training, roles=("result",), vgg_weights=False),
    "align": Kind("align", "aligns",
                  lambda cfg, s, st, folder, inputs, resume: replace_given(
                      s, init_start=str(inputs[0]), init_end=str(inputs[1]), out=str(folder / "checkpoint.pt")),
                  _read_align, lambda config, st, facts: ("done", ""), vgg_weights=False, records_all=False),
    "curve": Kind("train_curve", "curves",
                  lambda cfg, s, st, folder, inputs, resume: replace_given(
                      s, init_start=str(inputs[0]), init_end=str(inputs[1]), out=str(folder), resume=resume),
                  _read_training, _judge_training, keep=("eval", "plane")),
    "eval": Kind("eval_curve", "evals", _eval_stage, _read_eval, _judge_written_last),
    "plane": Kind("plane", "planes",
                  lambda cfg, s, st, folder, inputs, resume: replace_given(s, ckpt=str(inputs[0]), out=str(folder)),
                  _read_plane, _judge_written_last, vgg_weights=False),
    "fge": Kind("fge", "fges",
                lambda cfg, s, st, folder, inputs, resume: replace_given(
                    s, ckpt=str(inputs[0]), seed=st.seeds[0], out=str(folder), resume=resume),
                _read_fge, _judge_fge),
    "ensembles": Kind("ensembles", "ensembles",
                      lambda cfg, s, st, folder, inputs, resume: replace_given(
                          s, networks=[str(p) for p in inputs], averages=ensemble_members(cfg, st.loss, *st.seeds)[1],
                          out=str(folder)),
                      _read_ensembles, _judge_ensembles, vgg_weights=False),
}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


class Study:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.root = Path(cfg["out"])
        self.stages: list[Stage] = []
        self.groups: dict = {}
        self.forced: set[str] = set()
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.t0 = time.perf_counter()
        self.provenance: dict = {}  # set by run_study; kept from the last run that ran stages when nothing runs
        self.previous_provenance: dict | None = None
        self.rates: dict = {}  # kind -> (seconds, units) of stages run now, for the estimate

    # --- settings each stage should have, and the settings its outputs record (the stage table, KINDS)

    def config(self, st: Stage, resume: bool = False):
        """The config of the command that makes the stage: its section's, with the stage's own files."""
        kind = KINDS[st.kind]
        return kind.stage(self.cfg, section(self.cfg, kind.section), st, self.root / st.folder,
                          [self.root / p for p in st.inputs], resume)

    def expected(self, st: Stage) -> dict:
        """The settings that define the stage's result, as its config has them."""
        kind = KINDS.get(st.kind)
        if kind is None:
            return {}
        config = self.config(st)
        want = result_settings(config, kind.roles)
        if st.loss == "vgg" and kind.vgg_weights:
            want["vgg_weights"] = config.vgg_weights
        return want

    def recorded(self, st: Stage) -> tuple[dict | None, dict]:
        """(those settings as the stage's outputs record them, or None when there are none; facts about
        completeness)."""
        kind = KINDS[st.kind]
        record, facts = kind.read(self.root / st.folder, st)
        if record is None:
            return None, facts
        cls = STUDY_SECTIONS[kind.section][0]
        return {k: recorded_value(cls, k, record) for k in self.expected(st) if kind.records_all or k in record}, facts

    def settings_diff(self, st: Stage) -> list[str]:
        rec, _ = self.recorded(st)
        if rec is None:
            return []
        want = self.expected(st)
        return [f"{k}={rec[k]!r} (existing) vs {want[k]!r} (requested)" for k in want
                if k in rec and not _same(rec[k], want[k])]

    # --- judging a stage

    def input_hashes(self, st: Stage) -> dict:
        return {p: sha256(self.root / p) for p in st.inputs}

    def status(self, st: Stage) -> tuple[str, str]:
        """('done' | 'resume' | 'redo' | 'new', why)."""
        folder = self.root / st.folder
        record = read_stage_record(folder)
        rec, facts = self.recorded(st)
        if rec is None:
            if facts.get("exists"):
                return "redo", "its output files are incomplete or unreadable"
            return "new", ""
        inputs_now = self.input_hashes(st)
        if record is not None:
            if record.inputs != inputs_now:
                return "redo", "its inputs changed since it was made"
        else:  # outputs made outside the study (e.g. under torchrun): adopt them if they were made from these inputs
            own = {str((self.root / p).resolve()) for p in st.inputs}
            if st.kind != "endpoint" and set(facts.get("init", [])) != own:
                return "redo", "its outputs were not made from this study's inputs"
        state, why = KINDS[st.kind].judge(self.config(st), st, facts)
        if state == "done" and record is None:
            return "done", "adopted"
        return state, why

    def clear(self, st: Stage) -> None:
        """Removes one stage's own outputs (for a curve: not its eval/ and plane/ folders, other stages'), following
        no link: a stage folder that is a link, or lies below one, is refused before anything is removed (N2)."""
        if st.kind != "report":
            clear_folder(self.root, self.root / st.folder, KINDS[st.kind].keep)

    def will_run(self) -> set[str]:
        """Names of the stages expected to run now (for the time estimate and --plan): not finished, forced, or built
        on one of those."""
        out = set()
        for st in self.stages:  # in order: a stage's dependencies come before it
            if st.kind == "report" or st.name in self.forced or any(d in out for d in st.deps) \
                    or self.status(st)[0] != "done":
                out.add(st.name)
        return out

    def write_record(self, st: Stage, status: str, **extra) -> None:
        from aecurves.files import check_no_link

        check_no_link(self.root, self.root / st.folder / STAGE_RECORD)  # a link made since the study started
        write_json(self.root / st.folder / STAGE_RECORD,
                   StageRecord(stage=st.name, status=status, inputs=self.input_hashes(st), extra=extra).to_json())

    # --- the study record

    def write_study_json(self) -> None:
        from aecurves.files import check_no_link

        check_no_link(self.root, self.root / "study.json")  # a link made since the study started
        trained = [n for n in self.ran if n != "report"]
        sections = dict.fromkeys(KINDS[st.kind].section for st in self.stages if st.kind in KINDS)
        write_json(self.root / "study.json", StudyRecord(
            config=study_record(self.cfg),
            sections={name: section_record(self.cfg, name) for name in sections},
            provenance=self.provenance if trained or not self.previous_provenance else self.previous_provenance,
            groups=self.groups,
            stages=[{"name": s.name, "kind": s.kind, "loss": s.loss, "seeds": list(s.seeds), "folder": s.folder}
                    for s in self.stages],
            layout={"endpoints": "endpoints/{loss}_seed{s}/ (aecurves train)",
                    "extras": "endpoints/{loss}_seed{s}_extra/ (aecurves train --init: trained on as long as a "
                              "curve)",
                    "aligned": "aligned/{loss}_seed{b}-to-seed{a}/ (aecurves align: B aligned to A)",
                    "curves": "curves/{loss}_seed{a}-seed{b}[_aligned]/ (aecurves train-curve; _aligned: to the "
                              "aligned B)",
                    "evals": "curves/{loss}_seed{a}-seed{b}[_aligned]/eval/ (aecurves eval-curve: curve and "
                             "segment)",
                    "baselines": "baselines/{loss}_seed{a}-seed{b}/ (aecurves eval-curve of the extra-trained "
                                 "endpoints at t = 0 and 1)",
                    "fge": "fge/{loss}_seed{s}/ (aecurves fge: fast geometric ensembling from the endpoint for as "
                           "long as a curve; snapshot_K.pt, fge.json)",
                    "ensembles": "ensembles/{loss}_seed{a}-seed{b}/ (ensembles.json: the output averages of the "
                                 "pair's FGE snapshots, pooled, and of its extra-trained endpoints)",
                    "plane": "curves/{loss}_seed{a}-seed{b}/plane/ (aecurves plane, the first pair of each group)",
                    "report": "report.html, report.md, report.json, report_files/"},
        ).to_json())

    # --- progress

    def estimate_left(self, remaining: list[Stage]) -> str:
        if not any(st.units for st in remaining):
            return "only the report left" if remaining else "nothing left"
        if not self.rates:
            return "time left: estimated after the first stage"
        total_s = sum(s for key, (s, _) in self.rates.items() if isinstance(key, str))
        total_u = sum(u for key, (_, u) in self.rates.items() if isinstance(key, str))
        default = total_s / max(total_u, 1e-9)
        left = 0.0
        for st in remaining:  # seconds per unit of the same kind and loss, else of the same kind, else overall
            s, u = self.rates.get((st.kind, st.loss)) or self.rates.get(st.kind) or (None, None)
            left += st.units * (s / u if u else default)
        return f"about {fmt_seconds(left)} left"

    def progress(self, i: int, st: Stage, todo: list[Stage], note: str = "") -> None:
        elapsed = fmt_seconds(time.perf_counter() - self.t0)
        print(f"\n=== study stage {i}/{len(self.stages)}: {st.label}{note} "
              f"[elapsed {elapsed}, {self.estimate_left(todo)}]", flush=True)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def check_vgg(weights: str) -> UserError | None:
    """None when the VGG16 weights for the perceptual loss can be loaded, else why not (with the remedy)."""
    from aecurves import losses

    try:
        losses.load_vgg_features(weights)
    except UserError as exc:
        return exc
    return None


# ----------------------------------------------------------------------------------------------------------
# running


def run(config: StudyConfig) -> dict:
    """Runs (or resumes) the study `config` describes; returns a summary."""
    return run_study(resolve_study_config(config))


def run_study(cfg: dict) -> dict:
    """Runs (or resumes) the study described by the resolved settings `cfg` (see resolve_study_config)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("`aecurves study` is one driver process, so do not start it with torchrun. On a machine "
                        "with several GPUs use --executor local (one stage per GPU at once; --gpus-per-train N "
                        "trains each endpoint on N GPUs), on a Slurm cluster --executor slurm.")
    from aecurves.data import load_data

    study = Study(cfg)
    root = study.root
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; pass a folder for the study.")
    if root.is_dir():  # a folder someone sent: no link inside is followed (docs/reliability.md#folders-someone-sent)
        refuse_study_links(root)
    if not cfg["epochs"] or not cfg["curve_epochs"]:
        raise UserError("--epochs and --curve-epochs are needed.")
    check_executor_machine(cfg)

    print(f"study in {root}: preset {cfg['preset']}, losses {','.join(cfg['losses'])}, seeds "
          f"{','.join(map(str, cfg['seeds']))}, {cfg['curve']} curves with {cfg['num_bends']} bends, "
          f"{cfg['num_points']} points per path", flush=True)
    data = load_data(cfg["dataset"], cfg["data_dir"], cfg["image_size"], cfg["limit"], cfg["val_fraction"],
                     cfg["use_test"], cfg["cache_dir"], progress=not cfg["no_progress"])
    n_train, n_test = len(data.train), len(data.test)
    print(f"data: {data.source}", flush=True)
    del data

    study.groups = {loss: loss_group(cfg, loss) for loss in cfg["losses"]}  # vgg: checked once, up front
    # evaluations also measure the perceptual metric when the real VGG weights load (the vgg group checked them)
    vgg = study.groups.get("vgg")
    perceptual = cfg["vgg_weights"] != "random" and (
        vgg["status"] == "run" if vgg else check_vgg(cfg["vgg_weights"]) is None)
    all_stages = plan(cfg, n_train, n_test, perceptual)
    study.forced = select_forced(cfg["force"], all_stages)
    study.stages = with_dependencies([s for s in all_stages
                                      if s.loss is None or study.groups[s.loss]["status"] == "run"])

    refuse_untrusted_files(study)  # before any stage is judged, --plan included
    check_stages(study)
    if cfg["plan"]:
        print_plan(study)
        return {"out": str(root), "plan": [s.name for s in study.stages]}
    refuse_stale_outputs(study)  # before anything changes
    executor = make_executor(cfg, root)
    with folder_lock(root, "study"):  # one study per folder: a second one would redo and interleave every stage
        return run_stages(study, cfg, executor)


def refuse_untrusted_files(study: Study) -> None:
    """Refuses, before anything is judged or written, the files of a study folder the study cannot trust (its links
    were refused already): any record of a newer release (study.json, report.json, a stage's study_stage.json or
    outputs), which redoing would delete or rewrite in an older format, and a stage folder holding another command's
    outputs, which the stage would replace or take for its own."""
    if not study.root.is_dir():
        return
    try:
        check_newer_records(study)
    except NewerFormat as exc:
        raise UserError(f"{exc} The study folder {study.root} holds files of another, newer release of aecurves: "
                        "continue the study with that release, or choose another --out folder for this one; "
                        "nothing was changed.") from None
    for st in study.stages:
        found = other_outputs(study.root / st.folder, FOREIGN_OUTPUTS.get(st.kind, ()))
        if found:
            kind, names = next(iter(found.items()))
            raise UserError(f"The folder {study.root / st.folder} of the stage {st.name} holds the files of "
                            f"{with_article(kind)} "
                            f"({', '.join(names)}), which its command ({KINDS[st.kind].command}) does not write: "
                            "the stage would replace them or take them for its own. Move them out, or choose "
                            "another --out folder; nothing was changed.")


# per kind of stage, the outputs of other commands (records.OUTPUTS) that can never be in its folder
FOREIGN_OUTPUTS = {"endpoint": ("evaluation", "plane"), "extra": ("evaluation", "plane"),
                   "curve": ("evaluation", "plane"), "eval": ("training run",), "plane": ("training run",)}


def check_newer_records(study: Study) -> None:
    """NewerFormat for the first record of the folder that a newer release wrote: every file the study reads."""
    from aecurves.report import REPORT_VERSION

    root = study.root
    try:
        StudyRecord.from_json(read_json(root / "study.json"), str(root / "study.json"))
    except NewerFormat:
        raise
    except RecordError:  # none, or damaged: written anew, as before
        pass
    report = read_json(root / "report.json")
    if isinstance(report, dict):
        check_format(report, REPORT_VERSION, str(root / "report.json"))
    for st in study.stages:
        if st.kind != "report":
            read_stage_record(root / st.folder)
            KINDS[st.kind].read(root / st.folder, st)


def check_executor_flags(cfg: dict) -> None:
    """--slurm-* settings only with --executor slurm, --jobs/--devices/--gpus-per-train only with local (a value
    other than the default is a request the other executors would silently ignore)."""
    fields = dataclasses.fields(StudyConfig)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in fields}
    # each executor's settings are those of its --help group (RuntimeConfig): the local one's share the group
    # of --executor itself
    for executor, group in (("slurm", SLURM), ("local", "executor")):
        names = [f.name for f in fields if f.metadata.get("group") == group and f.name != "executor"]
        set_ = [k for k in names if cfg[k] != defaults[k]]
        if set_ and cfg["executor"] != executor:
            flags = ", ".join("--" + k.replace("_", "-") for k in set_)
            raise UserError(f"{flags} {'is a setting' if len(set_) == 1 else 'are settings'} of --executor "
                            f"{executor}; add --executor {executor}, or leave "
                            f"{'it' if len(set_) == 1 else 'them'} out.")
    bad = [kv for kv in cfg["slurm_extra"] if "=" not in kv or not kv.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"--slurm-extra takes KEY=VALUE (e.g. constraint=a100), got {', '.join(map(repr, bad))}.")


def check_executor_machine(cfg: dict) -> None:
    """What the executor needs of this machine: the devices it names, or sbatch and the partition."""
    from aecurves import executors

    if cfg["executor"] == "local":
        devices = local_devices(cfg)
        executors.check_devices(devices)
        slots = cfg["jobs"] or len(devices)
        if cfg["gpus_per_train"] > slots:
            raise UserError(f"--gpus-per-train {cfg['gpus_per_train']} needs as many devices at once, but the local "
                            f"executor runs {slots} at a time ({', '.join(devices)}); pass more --devices (or --jobs), "
                            "or a smaller --gpus-per-train.")
    if cfg["executor"] == "slurm":
        executors.check_slurm(cfg["slurm_partition"], cfg["slurm_mem"], Path(cfg["out"]))


def local_devices(cfg: dict) -> list[str]:
    from aecurves.executors import visible_devices

    return [d.strip() for d in cfg["devices"].split(",")] if cfg["devices"] else visible_devices()


def make_executor(cfg: dict, root: Path):
    from aecurves import executors

    if cfg["executor"] == "local":
        devices = local_devices(cfg)
        return executors.LocalExecutor(cfg["jobs"] or len(devices), devices, root / "logs")
    if cfg["executor"] == "slurm":
        return executors.SlurmExecutor(root / "slurm", cfg["slurm_max_jobs"], cfg["slurm_partition"],
                                       cfg["slurm_time"], cfg["slurm_gpus"], cfg["slurm_train_tasks"],
                                       cfg["slurm_cpus"], cfg["slurm_mem"],
                                       cfg["slurm_account"], cfg["slurm_qos"], cfg["slurm_setup"],
                                       cfg["slurm_extra"])
    return executors.SerialExecutor()


def print_plan(study: Study) -> None:
    """Every stage with what it depends on and its state; nothing runs. Stages on the longest chain are marked."""
    will = study.will_run()
    chain = {}  # the longest chain of dependencies ending at each stage
    for st in study.stages:
        chain[st.name] = max((chain[d] for d in st.deps), key=len, default=[]) + [st.name]
    longest = max(chain.values(), key=len)
    print(f"\n{len(study.stages)} stages, {len(will)} to run; with enough workers the study takes the time of its "
          f"longest chain, {len(longest)} stages: {' -> '.join(longest)}\n")
    width = max(len(st.name) for st in study.stages)
    for st in study.stages:
        if st.kind == "report":
            state = "to run (last)"
        elif st.name in study.forced:
            state = "to redo (--force)"
        else:
            status, why = study.status(st)
            stale = study.settings_diff(st)
            upstream = [d for d in st.deps if d in will]
            if stale:
                state = f"stale: made with other settings ({'; '.join(stale)}); needs --force"
            elif status == "done" and upstream:
                state = f"to redo after {', '.join(upstream)}"
            else:
                state = {"done": "done" + (" (adopted)" if why == "adopted" else ""), "new": "to run",
                         "resume": f"to resume ({why})", "redo": f"to redo ({why})"}[status]
        deps = "all other stages" if st.kind == "report" else (", ".join(st.deps) or "-")
        print(f"  {st.name:<{width}}  {state}\n  {'':<{width}}  after: {deps}")


def run_stages(study: "Study", cfg: dict, executor=None) -> dict:
    """Every stage once the stages it depends on are finished: finished ones skipped, interrupted ones resumed,
    on `executor` (serial by default); then the report. Returns a summary."""
    from aecurves.executors import SerialExecutor

    executor = executor or SerialExecutor()
    root = study.root
    try:
        study.previous_provenance = StudyRecord.from_json(read_json(root / "study.json")).provenance
    except NewerFormat:  # refused before anything ran (refuse_untrusted_files): never rewritten as this format
        raise
    except RecordError:  # none yet, or one this release cannot read (run() refuses a study of other settings)
        study.previous_provenance = None
    study.provenance = {**runtime.provenance(cfg["device"], cfg["precision"]),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "wall_seconds": None,
                        "executor": executor.name,
                        "stage_seconds": dict((study.previous_provenance or {}).get("stage_seconds") or {})}
    study.write_study_json()
    driver = Driver(study, executor, study.will_run())
    try:
        driver.run()
    except KeyboardInterrupt:
        if executor.name == "slurm" and executor.running():
            print(f"\nthe driver stopped; {len(executor.running())} Slurm job(s) go on. Re-run the same command to "
                  "follow them again: no stage is submitted twice.", flush=True)
        raise
    finally:
        executor.close()

    report_stage = study.stages[-1]
    study.provenance.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            wall_seconds=round(time.perf_counter() - study.t0, 1))
    study.write_study_json()  # the report shows the provenance of the stages it reports on
    study.progress(len(study.stages), report_stage, [])
    run_report_stage(study, report_stage)

    from aecurves import report

    summary = report.read_report_json(root)
    print(f"\nstudy finished in {fmt_seconds(time.perf_counter() - study.t0)}: {len(study.ran)} stages run, "
          f"{len(study.skipped)} already finished")
    for loss, group in study.groups.items():
        if group["status"] == "skipped":
            print(f"\n{loss} group SKIPPED: {group['reason']}\nremedy: {group['remedy']}\n")
    for line in summary.get("summary_lines", []):
        print(f"  {line}")
    print(f"report: {root / 'report.html'} (and report.md)")
    return {"out": str(root), "ran": study.ran, "skipped": study.skipped, "groups": study.groups,
            "report": summary}


class Driver:
    """Submits each stage as soon as the stages it depends on are finished, at most the executor's slots at once,
    and records how each ran. A failure stops new submissions; the running stages are waited for, then the
    study stops with every failure named (serially: at once, as it always did)."""

    def __init__(self, study: Study, executor, will_run: set):
        self.study, self.executor, self.will_run = study, executor, will_run
        self.waiting = [st for st in study.stages if st.kind != "report"]
        self.finished: set[str] = set()
        self.failures: list[str] = []
        self.started: dict[str, tuple[float, object]] = {}  # name -> (perf_counter, handle)

    def run(self) -> None:
        while self.waiting or self.executor.running():
            if not self.failures:
                self.submit_ready()
            if not self.executor.running():
                if self.waiting and not self.failures:  # nothing runs and nothing can start: cannot happen
                    raise RuntimeError(f"stages left that can never start: {[s.name for s in self.waiting]}")
                break
            for outcome in self.executor.wait(timeout=5.0):
                self.finish(outcome)
        if self.failures:
            running_note = "" if self.executor.name == "serial" else " (the stages that were running have finished)"
            raise UserError("\n".join(self.failures) + f"\nThe finished stages are kept{running_note}; fix the "
                            "cause and re-run the same command to continue: only what is unfinished runs.")

    def submit_ready(self) -> None:
        for st in list(self.waiting):
            if self.failures:
                return
            if all(d in self.finished for d in st.deps) and self.executor.can_start(self.job(st)):
                self.waiting.remove(st)
                self.start(st)
                if self.executor.name == "serial":  # it ran already: record it before judging the next stage
                    for outcome in self.executor.wait():
                        self.finish(outcome)

    def start(self, st: Stage) -> None:
        study, i = self.study, self.study.stages.index(st) + 1
        todo = [s for s in study.stages[i - 1:] if s.name in self.will_run and s.name not in self.finished]
        record = read_stage_record(study.root / st.folder)
        handle = self.executor.attach(st.name, record.to_json()) if record is not None else None
        if handle is not None:  # submitted by an earlier driver and still queued or running: follow it
            study.progress(i, st, todo, f": following Slurm job {handle.job_id}, submitted by an earlier run")
            self.started[st.name] = (time.perf_counter(), handle)
            return
        forced = st.name in study.forced
        state, why = ("forced", "--force") if forced else study.status(st)
        if state == "done":
            study.skipped.append(st.name)
            self.finished.add(st.name)
            note = " (adopted existing outputs)" if why == "adopted" else ""
            study.progress(i, st, [s for s in todo if s is not st], f": finished already, skipped{note}")
            if why == "adopted":
                study.write_record(st, "done", adopted=True)
            return
        note = {"resume": f": resuming ({why})", "redo": f": redoing ({why})", "forced": ": redoing (--force)",
                "new": ""}[state]
        if state in ("redo", "forced"):
            study.clear(st)
        job = self.job(st, resume=state == "resume")
        study.write_record(st, "started", executor=self.executor.name)
        where = ""
        if self.executor.name != "serial":
            note += f" [{len(self.executor.running()) + 1} running]"
        study.progress(i, st, todo, note)
        t0 = time.perf_counter()  # before submit: the serial executor runs the stage inside it
        try:
            handle = self.executor.submit(st.name, job)
        except UserError as exc:  # it could not be started: the stage failed, and its record says so
            study.write_record(st, "failed", error=str(exc), executor=self.executor.name)
            self.failures.append(f"stage {st.name} ({st.label}) failed: {exc}")
            return
        except Exception as exc:  # a bug: its traceback follows, but the record must not say "started"
            study.write_record(st, "failed", error=f"an internal error, {type(exc).__name__}: {exc}",
                               executor=self.executor.name)
            raise
        if handle.job_id is not None:
            study.write_record(st, "submitted", executor=self.executor.name, job_id=handle.job_id, logs=handle.logs)
            where = f"Slurm job {handle.job_id}, log {handle.logs.get('stderr')}"
        elif self.executor.name == "local" and handle.logs:  # none when its log was refused: it failed already
            where = f"on {handle.device}, log {handle.logs['log']}"
        if where:
            print(f"    {st.name}: {where}", flush=True)
        self.started[st.name] = (t0, handle)

    def job(self, st: Stage, resume: bool = False) -> "StageJob":
        """The stage's job; endpoint and extra training run as gpus_per_train DistributedDataParallel processes."""
        return StageJob(self.study.cfg, st.name, resume=resume,
                        processes=gpus_per_train(self.study.cfg) if st.kind in ("endpoint", "extra") else 1)

    def finish(self, outcome) -> None:
        study = self.study
        st = next(s for s in study.stages if s.name == outcome.handle.stage)
        t0, handle = self.started.pop(st.name)
        ran = {"executor": self.executor.name, **({"job_id": handle.job_id} if handle.job_id else {}),
               **({"logs": handle.logs} if handle.logs else {}), **(outcome.result or {}).get("ran", {})}
        if outcome.error is not None:
            study.write_record(st, "failed", error=outcome.error, **ran)
            self.failures.append(f"stage {st.name} ({st.label}) failed: {outcome.error}")
            if self.executor.running():
                print(f"\nstage {st.name} failed; no new stage starts, waiting for the "
                      f"{len(self.executor.running())} running", flush=True)
            return
        seconds = time.perf_counter() - t0
        state_after, why_after = study.status(st)
        if state_after != "done":
            study.write_record(st, "failed", error=why_after or state_after, **ran)
            self.failures.append(f"stage {st.name} ran but its outputs are not complete ({why_after or state_after});"
                                 f" see {study.root / st.folder}.")
            return
        for key in (st.kind, (st.kind, st.loss)):
            s, u = study.rates.get(key, (0.0, 0.0))
            study.rates[key] = (s + seconds, u + st.units)
        study.ran.append(st.name)
        self.finished.add(st.name)
        study.provenance["stage_seconds"][st.name] = round(seconds, 1)
        result = (outcome.result or {}).get("result")
        study.write_record(st, "done", ran=ran, **({"result": result} if st.kind == "align" else {}))
        study.write_study_json()
        if self.executor.name != "serial":
            print(f"    {st.name}: done in {fmt_seconds(seconds)} [{len(self.finished)} finished, "
                  f"{len(self.executor.running())} running, {len(self.waiting)} waiting]", flush=True)


@dataclass
class StageJob:
    """One stage's work as a picklable callable: the study's resolved settings and the stage's name, nothing else,
    so it runs in this process, in a worker process or as a Slurm job on another machine, given the study folder on
    a shared file system. It returns how it ran and its command's result."""

    cfg: dict
    stage: str
    resume: bool = False
    device: str | None = None      # local: its worker's device, cuda:N (the worker sees only that GPU) or cpu
    log: str | None = None         # local: the file its output goes to
    processes: int = 1             # DistributedDataParallel processes: Slurm tasks, or local devices (torchrun)

    def __call__(self) -> dict:
        with _output_to(self.log, self.cfg["out"]):
            try:
                return self._run()
            except UserError as exc:
                if self.log is not None:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                raise
            except BaseException:  # a bug: the driver says its traceback is in the log, so it must be
                if self.log is not None:
                    import traceback

                    traceback.print_exc()
                raise

    def _run(self) -> dict:
        in_slurm = "SLURM_JOB_ID" in os.environ
        if self.processes > 1 and in_slurm:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR...
        study = Study(self.cfg)
        study.stages = plan(self.cfg, 0, 0)
        st = next(s for s in study.stages if s.name == self.stage)
        config = study.config(st, self.resume)
        if self.device:  # as if a flag: the torchrun file writes the given settings only
            config = replace_given(config, device="cpu" if self.device.startswith("cpu") else "cuda")
        if self.processes > 1 and not in_slurm:
            result = torchrun(config, self.device.split(","), Path(self.cfg["out"]))
        elif in_slurm:  # submitit's preemption handler requeues the job by raising SystemExit: it must go through
            result = stage_command(st).run(config)
        else:  # a --model's sys.exit(0) fails the stage, naming it (errors.call_guarded), in this process or a worker
            model = config.model if getattr(config, "model", BUILTIN_MODEL) != BUILTIN_MODEL else None
            result = call_guarded(lambda: stage_command(st).run(config), model, f"the study's stage {self.stage}")
        import socket

        return {"ran": {"host": socket.gethostname(), "pid": os.getpid(),
                        "device": self.device or self.cfg["device"]},
                "result": result if isinstance(result, dict) else None}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit when the job is preempted or reaches its time limit: it is requeued, and a training
        stage resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, resume=True))


def torchrun(config, devices: list[str], root: Path) -> None:
    """`torchrun --nproc_per_node len(devices) -m aecurves train --config FILE`: the stage's config through the
    file round trip every command has, on these devices (GPUs), or on CPUs with gloo. The agent and its training
    processes die with this worker (executors.die_with_this_process)."""
    import socket
    import subprocess

    from aecurves.executors import die_with_this_process

    file = torchrun_file(config, root)
    env = dict(os.environ)
    gpus = [d.removeprefix("cuda:") for d in devices if d.startswith("cuda:")]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(len(devices)), "--master_port",
            str(port), "-m", "aecurves.executors", "aecurves", "train", "--config", str(file)]
    if config.model != BUILTIN_MODEL:
        argv += ["--model", config.model]  # named on the command line: the trust rule
    argv, env = die_with_this_process(argv, env)
    done = subprocess.run(argv, env=env)
    if done.returncode != 0:
        raise UserError(f"the {len(devices)} training processes (torchrun) exited with code {done.returncode}; their "
                        "output, with the traceback of any internal error, is in the stage's log")
    return None


def torchrun_file(config, root: Path) -> Path:
    """ROOT/logs/NAME.toml, holding the settings the stage's config was given (the study's, as if they were flags)
    and nothing else: `train --config` rebuilds from it exactly the config the serial executor runs (a default
    written out would count as given, and `train --init` refuses a given data or model setting that differs from
    its endpoint's). Written atomically, through no link."""
    from aecurves.files import atomic_path, check_no_link

    file = root / "logs" / f"{Path(config.out).name}.toml"
    check_no_link(root, file)
    with atomic_path(file) as tmp:
        tmp.write_text(to_toml({k: getattr(config, k) for k in config.given}))
    return file


def gpus_per_train(cfg: dict) -> int:
    """DistributedDataParallel processes per endpoint and extra training stage."""
    if cfg["executor"] == "slurm":
        return cfg["slurm_train_tasks"] or max(1, cfg["slurm_gpus"])
    return cfg["gpus_per_train"] if cfg["executor"] == "local" else 1


@contextlib.contextmanager
def _output_to(log: str | None, root: str):
    """Everything the stage prints (Python's and C's, progress bars too) appended to `log`, when given: a file in
    the study folder `root`, reached and opened through no link (a linked logs/ or log file is refused)."""
    if log is None:
        yield
        return
    from aecurves.files import check_no_link, open_append

    check_no_link(root, log)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    with open_append(log) as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def loss_group(cfg: dict, loss: str) -> dict:
    """One loss group's record for study.json: its folders, and whether it runs (vgg needs the VGG weights)."""
    group = {"status": "run", "seeds": cfg["seeds"],
             "endpoints": {str(s): endpoint_folder(loss, s) for s in cfg["seeds"]},
             "pairs": [{"seeds": [a, b], "curve": curve_folder(loss, a, b), "eval": curve_folder(loss, a, b) + "/eval"}
                       for a, b in itertools.combinations(cfg["seeds"], 2)]}
    if cfg["extra_training"]:
        group["extra_endpoints"] = {str(s): extra_folder(loss, s) for s in cfg["seeds"]}
    if cfg["fge"]:
        group["fge"] = {str(s): fge_folder(loss, s) for s in cfg["seeds"]}
    for pair in group["pairs"]:
        a, b = pair["seeds"]
        if cfg["align"]:
            aligned = curve_folder(loss, a, b, aligned=True)
            pair.update(aligned_endpoint=aligned_folder(loss, a, b), aligned_curve=aligned,
                        aligned_eval=aligned + "/eval")
        if cfg["extra_training"]:
            pair["baseline_eval"] = baseline_folder(loss, a, b)
        if cfg["fge"] or cfg["extra_training"]:
            pair["ensembles"] = ensembles_folder(loss, a, b)
    if cfg["plane_grid"]:
        first = group["pairs"][0]
        group["plane"] = {"seeds": first["seeds"], "folder": first["curve"] + "/plane"}
    if loss == "vgg":
        problem = check_vgg(cfg["vgg_weights"])
        if problem:
            group.update(status="skipped", reason=str(problem), remedy=VGG_REMEDY)
            print(f"vgg group skipped: {getattr(problem, 'short', problem)} (the remedy follows at the end)",
                  flush=True)
        elif cfg["vgg_weights"] == "random":
            group["warning"] = ("--vgg-weights random: the vgg group was trained and evaluated with UNTRAINED "
                                "VGG16 features, so its loss is not perceptual; a smoke test only.")
        else:
            group["vgg_weights"] = cfg["vgg_weights"]
    return group


def refuse_stale_outputs(study: "Study") -> None:
    """Refuses, naming stages and settings, when existing outputs were made with other settings (not forced)."""
    stale = []
    for st in study.stages:
        if st.name in study.forced or st.kind == "report":
            continue
        diff = study.settings_diff(st)
        if diff:
            stale.append(f"  {st.name} ({st.folder}): " + "; ".join(diff))
    if stale:
        raise UserError(
            f"The study folder {study.root} holds finished work made with other settings:\n" + "\n".join(stale)
            + "\nNothing was changed. Re-run with the settings it was made with (see its study.json), or redo "
              "those stages with --force (e.g. --force endpoints; what is built on them is redone too), or choose "
              f"another --out folder. ({RUNTIME_NOTE}.)")


def stage_command(st: Stage):
    """The command module that makes a stage (imported on use: `aecurves --help` stays fast)."""
    import importlib

    return importlib.import_module(f"aecurves.commands.{KINDS[st.kind].command}")


def check_stages(study: Study) -> None:
    """Every stage's config as its command checks it before reading a file, for all stages before the first runs:
    a bad setting of the last stage must not wait for hours of training to be found."""
    for st in study.stages:
        if st.kind == "report":
            continue
        check = getattr(stage_command(st), "check_config", validate)
        try:
            check(study.config(st))
        except UserError as exc:
            raise UserError(f"{exc} (a setting of the study's stage {st.name}; nothing was run)") from None


def run_report_stage(study: Study, st: Stage) -> None:
    from aecurves import report

    forced = "report" in study.forced
    fingerprint = report.inputs_fingerprint(study.root)
    existing = report.read_report_json(study.root)
    complete = all((study.root / n).is_file() for n in ("report.html", "report.md", "report.json"))
    if not forced and complete and existing.get("inputs_fingerprint") == fingerprint:
        print("report: up to date with the study's files, skipped")
        study.skipped.append(st.name)
        return
    report.write_report(study.root)
    study.ran.append(st.name)
