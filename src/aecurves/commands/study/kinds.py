"""The stage kinds: one `Kind` declaration each, in KINDS. Everything the study knows of a kind is there: the command
that makes its stages and the config section it starts from, its folder, what its stages are made from, what they
cost, its line in study.json, how its outputs are read back and judged. The plan, the loss groups of study.json, the
study's layout record and the package's docstring are made from KINDS.

Adding a kind: write its command (a module of aecurves.commands with run(config)), give it a section in
config.STUDY_SECTIONS, and add one Kind here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aecurves.config import AlignConfig, EnsemblesConfig, EvalCurveConfig, FgeConfig, replace_given
from aecurves.errors import UserError
from aecurves.files import read_json
from aecurves.records import (
    EndpointRecord,
    EnsemblesRecord,
    EvalRecord,
    FgeRecord,
    NewerFormat,
    PlaneRecord,
    RecordError,
    check_format,
    snapshot_file,
)

from .settings import Settings, fge_snapshots

# the newest checkpoint format this release reads (checkpoint.FORMAT_VERSION: that module imports torch, this one
# does not), for refusing a newer release's files rather than redoing them
CHECKPOINT_FORMAT = 1

# First guesses of what the VGG16 features cost per image, relative to the autoencoder's forward pass, for the time
# estimate before a stage of that kind has run (then the measured rate is used). Measured on the demo on this
# project's 2-core CPU: a vgg training stage took 15x its mse twin; an evaluation with VGG metrics ~48 units/image.
VGG_TRAIN_COST = 15.0
VGG_EVAL_COST = 48.0


@dataclass(frozen=True)
class Sizes:
    """What a stage's cost is counted in: images passed through the autoencoder (a training step counts 3: forward
    and backward); VGG features add VGG_TRAIN_COST or VGG_EVAL_COST per image. Training scales with epochs × images,
    an evaluation with points × images. On the demo the measured seconds per unit of the three kinds of mse stage
    agree within 15% (1.4e-4 to 1.6e-4 s on this project's 2-core CPU), so the first stages' rate predicts the rest.
    `perceptual`: evaluations also measure the VGG perceptual metric."""

    n_train: int = 0
    n_test: int = 0
    perceptual: bool = False

    def bn(self, s: Settings) -> int:
        return min(s.bn_images, self.n_train)

    def training(self, s: Settings, loss: str, epochs: int, steps: int = 3) -> float:
        """`epochs` of training steps (each `steps` passes), then the held-out images."""
        return epochs * (steps * self.n_train + self.n_test) * (VGG_TRAIN_COST if loss == "vgg" else 1.0)

    def point(self, s: Settings, loss: str, perceptual: bool) -> float:
        """One network of a path: BatchNorm statistics, then the train and test metrics."""
        metric = 1 + (VGG_EVAL_COST if loss == "vgg" or perceptual else 0.0)
        return self.bn(s) + (min(s.train_images, self.n_train) + self.n_test) * metric


@dataclass(frozen=True)
class Kind:
    """One kind of stage. Its stages are named `{name}:{loss}:{seed}` (per "seed") or `{name}:{loss}:{a}-{b}` (per
    "pair", or only the first pair: "first pair"), and exist when `when(settings)`.

    - `kind`: the kind of work, as study.json records it and the time estimate groups it (an aligned curve is a curve);
    - `command`, `section`: the command whose run(config) makes a stage, from that section of the study's settings
      (config.STUDY_SECTIONS; also the name --force takes for every stage of the kind);
    - `folder`, `label`: patterns of {loss}, {s} or {a}, {b}; `inputs(settings, loss, seeds)`: the files (relative to
      the study folder) a stage is made from; `makes(settings)`: those of its files other stages take;
    - `configure(settings, section, stage, folder, inputs, resume)`: the stage's own files, seed and folder added to
      its section, which gives its command's config; `cost(sizes, settings, loss)`: its relative cost;
    - the settings of that config's `roles` define the result (config.result_settings; the VGG weights too for a
      vgg-loss stage when `vgg_weights`); `read(folder, stage)` finds the record of the settings its outputs were
      made with (`records_all`: a setting every record holds, so one without it is compared as its legacy value or
      None; else only those it holds are compared), with facts that `judge(config, stage, facts)` turns into done /
      resume / redo;
    - `keep`: folders inside its own that belong to other stages; `foreign`: other commands' outputs
      (records.OUTPUTS) that can never be in its folder; `distributed`: trains as DistributedDataParallel processes;
      `keeps_result`: its command's result goes into study_stage.json;
    - `group_key`: its folders' key in study.json's loss group (per seed a {seed: folder}; per pair in each pair);
      `layout`: its line of study.json's layout, (key, text); `round`: kinds of one round are planned seed by seed
      (pair by pair) together, so a pair's curve and its aligned curve are neighbours in the plan."""

    name: str
    kind: str
    command: str
    section: str
    per: str
    round: int
    folder: str
    label: str
    configure: Callable
    cost: Callable
    read: Callable
    judge: Callable
    group_key: str
    layout: tuple | None = None
    inputs: Callable = lambda s, loss, seeds: []
    makes: Callable = lambda s: ("checkpoint.pt",)
    when: Callable = lambda s: True
    roles: tuple = ("data", "model", "result")
    vgg_weights: bool = True
    records_all: bool = True
    keep: tuple = ()
    foreign: tuple = ()
    distributed: bool = False
    keeps_result: bool = False

    def folder_of(self, loss: str, seeds: tuple) -> str:
        return self.folder.format(**_names(loss, seeds))


def _names(loss: str, seeds: tuple) -> dict:
    if len(seeds) == 1:
        return {"loss": loss, "s": seeds[0]}
    return {"loss": loss, "a": seeds[0], "b": seeds[1]}


def checkpoint(name: str, loss: str, *seeds) -> str:
    """The checkpoint.pt of the stage of kind `name` for `seeds`, relative to the study folder."""
    return f"{KINDS[name].folder_of(loss, seeds)}/checkpoint.pt"


def ensemble_members(s: Settings, loss: str, a: int, b: int) -> tuple[list[str], dict]:
    """(the input files of a pair's ensembles stage, relative to the study folder; {average: indices into them}):
    the FGE snapshots of A's and B's runs, each run's alone and pooled, and the two extra-trained endpoints, each
    alone and averaged (each kind when the study runs it)."""
    files, averages = [], {}
    if s.fge:
        n = fge_snapshots(s.curve_epochs, s.fge_cycle)
        for seed, which in ((a, "start"), (b, "end")):
            averages[f"fge_{which}"] = list(range(len(files), len(files) + n))
            files += [f"{KINDS['fge'].folder_of(loss, (seed,))}/{snapshot_file(k)}" for k in range(1, n + 1)]
        averages["fge_pooled"] = averages["fge_start"] + averages["fge_end"]
    if s.extra_training:
        averages.update(extra_start=[len(files)], extra_end=[len(files) + 1],
                        extra_average=[len(files), len(files) + 1])
        files += [checkpoint("extra", loss, seed) for seed in (a, b)]
    return files, averages


# ----------------------------------------------------------------------------------------------------------
# reading a stage's outputs back: (the settings they record, or None when there are none; facts for its judge)


def load_checkpoint_or_none(path: Path, kind: str):
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


def _record(cls, path: Path):
    """The file's record of type `cls`, or None when it is missing or damaged (a newer one raises NewerFormat)."""
    try:
        return cls.from_json(read_json(path), str(path))
    except NewerFormat:
        raise
    except RecordError:
        return None


def _all_there(folder: Path, files) -> bool:
    return bool(files) and all(isinstance(f, str) and (folder / Path(f).name).is_file() for f in files)


def read_training(folder: Path, st) -> tuple[dict | None, dict]:
    """An endpoint's, extra endpoint's or curve's checkpoint: its recorded config, epoch and promised files."""
    path = folder / "checkpoint.pt"
    state = load_checkpoint_or_none(path, "curve" if st.kind == "curve" else "endpoint")
    try:
        record = EndpointRecord.from_json(state, str(path)) if state is not None else None
    except NewerFormat:
        raise
    except RecordError:
        record = None
    if record is None:
        return None, {"exists": path.exists()}
    args = record.args
    promised = ["metrics.jsonl"] + (["reconstructions.png"] if st.kind != "curve" else [])
    return args, {"epoch": record.epoch, "outputs": all((folder / name).is_file() for name in promised),
                  "init": [args.get("init")] if st.kind == "extra" else [args.get("init_start"), args.get("init_end")]}


def read_align(folder: Path, st) -> tuple[dict | None, dict]:
    """The aligned endpoint's record of its alignment, which holds a setting only where its method uses it (alpha
    with mixed; the learned method's under "learned"): records_all is False."""
    state = load_checkpoint_or_none(folder / "checkpoint.pt", "endpoint")
    if state is None:
        return None, {"exists": (folder / "checkpoint.pt").exists()}
    aligned = state.get("aligned_to") or {}
    return aligned, {"init": [aligned.get("start"), aligned.get("end")]}


def read_eval(folder: Path, st) -> tuple[dict | None, dict]:
    """An evaluation's eval.json (records.EvalRecord, either layout) and the files it lists."""
    record = _record(EvalRecord, folder / "eval.json")
    if record is None:
        return None, {"exists": (folder / "eval.json").exists()}
    complete = _all_there(folder, record.files.values()) and record.segment_evaluated is (st.step != "baseline")
    made_from = record.endpoints if st.step == "baseline" else [record.checkpoint]
    return record.config, {"complete": complete, "init": made_from or []}


def read_plane(folder: Path, st) -> tuple[dict | None, dict]:
    """A plane's plane.json (records.PlaneRecord, either layout) and the files it lists."""
    record = _record(PlaneRecord, folder / "plane.json")
    if record is None:
        return None, {"exists": (folder / "plane.json").exists()}
    return record.config, {"complete": _all_there(folder, record.files.values()),
                           "init": [str(Path(record.config.get("ckpt") or "").resolve())]}


def read_fge(folder: Path, st) -> tuple[dict | None, dict]:
    """An FGE run: fge.json (records.FgeRecord, written last, when it finished) and the files it lists; else its
    checkpoint.pt (the training state after its last finished epoch)."""
    record = _record(FgeRecord, folder / "fge.json")
    if record is not None:
        return record.config, {"finished": True, "complete": _all_there(folder, record.listed_files()),
                               "epoch": record.budget_epochs, "init": [record.config.get("ckpt")]}
    state = load_checkpoint_or_none(folder / "checkpoint.pt", "fge")
    if state is None:
        return None, {"exists": (folder / "checkpoint.pt").exists() or (folder / "fge.json").exists()
                      or any(folder.glob("snapshot_*.pt"))}
    args = state.get("args", {})
    return args, {"finished": False, "complete": False, "epoch": state.get("epoch"), "init": [args.get("ckpt")]}


def read_ensembles(folder: Path, st) -> tuple[dict | None, dict]:
    """A pair's ensembles.json (records.EnsemblesRecord)."""
    record = _record(EnsemblesRecord, folder / "ensembles.json")
    if record is None:
        return None, {"exists": (folder / "ensembles.json").exists()}
    return record.config, {"averages": record.config.get("averages"),
                           "init": [str(Path(p).resolve()) for p in record.networks()]}


# ----------------------------------------------------------------------------------------------------------
# judging them: (done | resume | redo, why)


def judge_training(config, st, facts: dict) -> tuple[str, str]:
    target = config.epochs
    if facts["epoch"] == target and not facts["outputs"]:
        return "resume", "some of its outputs are missing"  # a resumed run writes them again
    if facts["epoch"] == target:
        return "done", ""
    if facts["epoch"] < target:
        return "resume", f"interrupted at epoch {facts['epoch']} of {target}"
    return "redo", f"its checkpoint is at epoch {facts['epoch']}, beyond {target}"


def judge_written_last(config, st, facts: dict) -> tuple[str, str]:
    """An evaluation or plane: eval.json / plane.json is renamed into place last, after every file it lists."""
    return ("done", "") if facts["complete"] else ("redo", "its evaluation files are incomplete")


def judge_fge(config: FgeConfig, st, facts: dict) -> tuple[str, str]:
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


def judge_ensembles(config: EnsemblesConfig, st, facts: dict) -> tuple[str, str]:
    if facts["averages"] != config.averages:
        return "redo", "it measured other averages"
    return "done", ""


def judge_done(config, st, facts: dict) -> tuple[str, str]:
    return "done", ""


# ----------------------------------------------------------------------------------------------------------
# the declarations


def _evaluation(s: Settings, section: EvalCurveConfig, st, folder: Path, inputs: list, resume: bool):
    """eval-curve --ckpt CURVE: the curve and its segment, in one evaluation."""
    return replace_given(section, ckpt=str(inputs[0]), out=str(folder))


def _baseline(s: Settings, section: EvalCurveConfig, st, folder: Path, inputs: list, resume: bool):
    """eval-curve --segment of the two extra-trained endpoints at t = 0 and 1 only, measured exactly like every point
    of the paths."""
    return replace_given(section, segment=[str(p) for p in inputs], num_points=2, num_images=0, ensemble=0,
                         out=str(folder))


def _curve_cost(z: Sizes, s: Settings, loss: str) -> float:
    """per epoch: training steps (mixing the bends adds about one pass), then the midpoint monitor"""
    return s.curve_epochs * ((4 * z.n_train + z.n_test) * (VGG_TRAIN_COST if loss == "vgg" else 1.0) + z.bn(s))


def _eval_cost(z: Sizes, s: Settings, loss: str) -> float:
    """both paths' points, the data statistics, and the curve ensemble's members and average"""
    return (2 * s.num_points * z.point(s, loss, z.perceptual) + z.n_train
            + (s.ensemble + 1) * (z.bn(s) + z.n_test))


def _fge_cost(z: Sizes, s: Settings, loss: str) -> float:
    """training, then BN statistics and the held-out images for every snapshot"""
    n = fge_snapshots(s.curve_epochs, s.fge_cycle)
    return z.training(s, loss, s.curve_epochs) + (n + 1) * (z.bn(s) + 2 * z.n_test)


TRAINING_OUTPUTS = ("evaluation", "plane")  # records.OUTPUTS that a training folder never holds
EVALUATION_OUTPUTS = ("training run",)

KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("endpoint", "endpoint", "train", "endpoints", "seed", 0, "endpoints/{loss}_seed{s}", "train {loss} seed {s}",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, loss=st.loss, seed=st.seeds[0], out=str(folder), resume=resume),
         lambda z, s, loss: z.training(s, loss, s.epochs),
         read_training, judge_training, group_key="endpoints", foreign=TRAINING_OUTPUTS, distributed=True,
         layout=("endpoints", "endpoints/{loss}_seed{s}/ (aecurves train)")),
    # trained on from its endpoint (train --init), whose data and model it keeps: the study checks that file's hash
    Kind("extra", "extra", "train", "extras", "seed", 1, "endpoints/{loss}_seed{s}_extra",
         "train {loss} seed {s} as long as a curve",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, init=str(inputs[0]), seed=st.seeds[0], out=str(folder), resume=resume),
         lambda z, s, loss: z.training(s, loss, s.curve_epochs),
         read_training, judge_training, group_key="extra_endpoints",
         inputs=lambda s, loss, seeds: [checkpoint("endpoint", loss, *seeds)], when=lambda s: s.extra_training,
         roles=("result",), vgg_weights=False, foreign=TRAINING_OUTPUTS, distributed=True,
         layout=("extras", "endpoints/{loss}_seed{s}_extra/ (aecurves train --init: trained on as long as a curve)")),
    Kind("fge", "fge", "fge", "fges", "seed", 2, "fge/{loss}_seed{s}", "fge {loss} seed {s} as long as a curve",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, ckpt=str(inputs[0]), seed=st.seeds[0], out=str(folder), resume=resume),
         _fge_cost, read_fge, judge_fge, group_key="fge",
         inputs=lambda s, loss, seeds: [checkpoint("endpoint", loss, *seeds)], when=lambda s: s.fge,
         makes=lambda s: ("checkpoint.pt", *(snapshot_file(k) for k in
                                             range(1, fge_snapshots(s.curve_epochs, s.fge_cycle) + 1))),
         layout=("fge", "fge/{loss}_seed{s}/ (aecurves fge: fast geometric ensembling from the endpoint for as long "
                        "as a curve; snapshot_K.pt, fge.json)")),
    Kind("align", "align", "align", "aligns", "pair", 3, "aligned/{loss}_seed{b}-to-seed{a}",
         "align {loss} seed {b} to seed {a}",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, init_start=str(inputs[0]), init_end=str(inputs[1]), out=str(folder / "checkpoint.pt")),
         lambda z, s, loss: 4 * min(AlignConfig.images, z.n_train),
         read_align, judge_done, group_key="aligned_endpoint",
         inputs=lambda s, loss, seeds: [checkpoint("endpoint", loss, seed) for seed in seeds], when=lambda s: s.align,
         vgg_weights=False, records_all=False, keeps_result=True,
         layout=("aligned", "aligned/{loss}_seed{b}-to-seed{a}/ (aecurves align: B aligned to A)")),
    Kind("curve", "curve", "train_curve", "curves", "pair", 4, "curves/{loss}_seed{a}-seed{b}",
         "train-curve {loss} seeds {a}-{b}",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, init_start=str(inputs[0]), init_end=str(inputs[1]), out=str(folder), resume=resume),
         _curve_cost, read_training, judge_training, group_key="curve",
         inputs=lambda s, loss, seeds: [checkpoint("endpoint", loss, seed) for seed in seeds],
         keep=("eval", "plane"), foreign=TRAINING_OUTPUTS,
         layout=("curves", "curves/{loss}_seed{a}-seed{b}[_aligned]/ (aecurves train-curve; _aligned: to the aligned "
                           "B)")),
    Kind("aligned-curve", "curve", "train_curve", "curves", "pair", 4, "curves/{loss}_seed{a}-seed{b}_aligned",
         "train-curve {loss} seeds {a}-{b} aligned",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, init_start=str(inputs[0]), init_end=str(inputs[1]), out=str(folder), resume=resume),
         _curve_cost, read_training, judge_training, group_key="aligned_curve",
         inputs=lambda s, loss, seeds: [checkpoint("endpoint", loss, seeds[0]), checkpoint("align", loss, *seeds)],
         when=lambda s: s.align, keep=("eval", "plane"), foreign=TRAINING_OUTPUTS),
    Kind("eval", "eval", "eval_curve", "evals", "pair", 5, "curves/{loss}_seed{a}-seed{b}/eval",
         "eval-curve {loss} seeds {a}-{b} (curve and segment)",
         _evaluation, _eval_cost, read_eval, judge_written_last, group_key="eval",
         inputs=lambda s, loss, seeds: [checkpoint("curve", loss, *seeds)], foreign=EVALUATION_OUTPUTS,
         layout=("evals", "curves/{loss}_seed{a}-seed{b}[_aligned]/eval/ (aecurves eval-curve: curve and segment)")),
    Kind("aligned-eval", "eval", "eval_curve", "evals", "pair", 5, "curves/{loss}_seed{a}-seed{b}_aligned/eval",
         "eval-curve {loss} seeds {a}-{b} aligned (curve and segment)",
         _evaluation, _eval_cost, read_eval, judge_written_last, group_key="aligned_eval",
         inputs=lambda s, loss, seeds: [checkpoint("aligned-curve", loss, *seeds)], when=lambda s: s.align,
         foreign=EVALUATION_OUTPUTS),
    Kind("baseline", "eval", "eval_curve", "evals", "pair", 5, "baselines/{loss}_seed{a}-seed{b}",
         "eval-curve {loss} seeds {a}-{b} trained as long as a curve",
         _baseline, lambda z, s, loss: 2 * z.point(s, loss, z.perceptual) + z.n_train,
         read_eval, judge_written_last, group_key="baseline_eval",
         inputs=lambda s, loss, seeds: [checkpoint("extra", loss, seed) for seed in seeds],
         when=lambda s: s.extra_training, foreign=EVALUATION_OUTPUTS,
         layout=("baselines", "baselines/{loss}_seed{a}-seed{b}/ (aecurves eval-curve of the extra-trained "
                              "endpoints at t = 0 and 1)")),
    Kind("ensembles", "ensembles", "ensembles", "ensembles", "pair", 5, "ensembles/{loss}_seed{a}-seed{b}",
         "ensembles {loss} seeds {a}-{b} at equal budget",
         lambda s, c, st, folder, inputs, resume: replace_given(
             c, networks=[str(p) for p in inputs], averages=ensemble_members(s, st.loss, *st.seeds)[1],
             out=str(folder)),
         lambda z, s, loss: len(ensemble_members(s, loss, *s.seeds[:2])[0]) * (z.bn(s) + z.n_test),  # any pair's
         read_ensembles, judge_ensembles, group_key="ensembles",
         inputs=lambda s, loss, seeds: ensemble_members(s, loss, *seeds)[0], when=lambda s: s.fge or s.extra_training,
         vgg_weights=False,
         layout=("ensembles", "ensembles/{loss}_seed{a}-seed{b}/ (ensembles.json: the output averages of the pair's "
                              "FGE snapshots, pooled, and of its extra-trained endpoints)")),
    Kind("plane", "plane", "plane", "planes", "first pair", 6, "curves/{loss}_seed{a}-seed{b}/plane",
         "plane {loss} seeds {a}-{b}",
         lambda s, c, st, folder, inputs, resume: replace_given(c, ckpt=str(inputs[0]), out=str(folder)),
         lambda z, s, loss: (s.plane_grid ** 2 + 3) * z.point(s, loss, False) + z.n_train,
         read_plane, judge_written_last, group_key="plane",
         inputs=lambda s, loss, seeds: [checkpoint("curve", loss, *seeds)], when=lambda s: bool(s.plane_grid),
         vgg_weights=False, foreign=EVALUATION_OUTPUTS,
         layout=("plane", "curves/{loss}_seed{a}-seed{b}/plane/ (aecurves plane, the first pair of each group)")),
)}
REPORT_LAYOUT = ("report", "report.html, report.md, report.json, report_files/")


def layout() -> dict:
    """study.json's "layout": each kind's line, then the report's."""
    return dict([*(k.layout for k in KINDS.values() if k.layout), REPORT_LAYOUT])


def describe() -> str:
    """The study folder's layout and the stage names, for the package's docstring."""
    lines = [f"    {text}" for text in layout().values()]
    names = ", ".join(f"{k.name}:{{loss}}:{'{s}' if k.per == 'seed' else '{a}-{b}'}" for k in KINDS.values())
    sections = ", ".join(f"`{s}`" for s in dict.fromkeys(k.section for k in KINDS.values()))
    return ("Layout of the study folder (`--out`, default runs/study), from the kinds' declarations (kinds.py):\n\n"
            + "\n".join(lines) + "\n\nStage names (for --force): " + names + ", report. --force also takes "
            + sections + ", a loss (`mse`, `vgg`: its whole group), a prefix such as `curve:mse`, or `all`.\n")
