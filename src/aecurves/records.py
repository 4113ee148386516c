"""Typed records at the file boundary: what eval-curve writes to eval.json, read back by the study and the report.

Each record has FORMAT, the format_version its file gets, `to_json()` (the dict written) and `from_json(d)`, which
reads the current layout and the layout of the release before it (no format_version: the "old" layout), and raises
RecordError, saying what is wrong, for anything else.

eval.json, format 2: {"format_version": 2, "kind": "curve" | "segment", ..., "paths": {"curve": {...}, "segment":
{...}}, ...}: each path's summary scalars (summarize) without a prefix. A curve's evaluation has "curve" and, unless
its segment was left out, "segment"; a segment-only one (eval-curve --segment) has only "segment". The old layout
held them in "summary", the curve's plain and its segment's prefixed "segment_" (a segment-only evaluation's plain:
the segment was its only path). curve.npz keeps that flat layout (like the paper's files): `flat_summary()`.

eval.json and plane.json of a VAE's path say "vae": true and "kl_weight" (β), "loss" being the objective, and hold
its terms beside it (distortion, rate); these keys came without a new format: a file without "vae" is an
autoencoder's (`vae`).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from aecurves.errors import UserError

SEGMENT_PREFIX = "segment_"


class RecordError(UserError):
    """A file that is no record of its kind this release reads; the message says which file and what is wrong."""


class NewerFormat(RecordError):
    """A record of a format newer than this release reads: written by a later release, not damaged. Readers that
    treat a damaged record as unfinished work (and redo it) must let this one through: redoing it would delete or
    downgrade that release's files."""


def check_format(d: dict, newest: int, source: str, key: str = "format_version") -> None:
    """NewerFormat when the record `d` says (under `key`) it has an integer format beyond `newest`."""
    version = d.get(key)
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise NewerFormat(f"{source} has {key} {version}, newer than this release of aecurves reads (up to "
                          f"{newest}): it was written by another release. Use that release for it.")


# An endpoint's reconstructions.pt (train writes it, the report reads it): {"format": HELD_OUT_FORMAT, "images",
# "reconstructions"}, uint8 pixels of the fixed held-out images (CHANGELOG.md).
HELD_OUT_FORMAT = 1


def snapshot_file(index: int) -> str:
    """The file name of FGE snapshot `index` (from 1) in an fge run's folder: fge writes it, the study reads it."""
    return f"snapshot_{index}.pt"


# What each command leaves in its output folder, by the names only it writes there (train and eval-curve both write
# reconstructions.png, so that name tells neither): one command writing into a folder of another's would replace
# its files or mix its own among them, and a study re-run would take the mixture for either.
OUTPUTS = {"training run": ("checkpoint.pt", "metrics.jsonl", "reconstructions.pt"),
           "evaluation": ("eval.json", "curve.npz", "loss_along_path.png", "reconstructions_segment.png",
                          "ensemble.png"),
           "plane": ("plane.json", "plane.npz", "plane.png")}


def other_outputs(folder, others: tuple) -> dict:
    """{kind: [its file names found in `folder`]} for the kinds of output `others` (keys of OUTPUTS)."""
    folder = Path(folder)
    found = {kind: [n for n in OUTPUTS[kind] if os.path.lexists(folder / n)] for kind in others}
    return {kind: names for kind, names in found.items() if names}


def with_article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def refuse_other_outputs(out, command: str, others: tuple, hint: str = "") -> None:
    """UserError, before any work, when the output folder `out` of `command` holds the files of another kind of
    output (`others`, keys of OUTPUTS); --overwrite does not change this (it replaces a command's own output)."""
    found = other_outputs(out, others)
    if found:
        kind, names = next(iter(found.items()))
        raise UserError(f"The output folder {out} holds the files of {with_article(kind)} "
                        f"({', '.join(names)}), not of {command}: writing there would replace them or mix its files "
                        f"with them. Choose another --out folder{hint}; nothing was changed.")


def _need_dict(d, what: str, source: str) -> dict:
    if not isinstance(d, dict):
        text = json.dumps(d, default=str)
        raise RecordError(f"{source} is damaged: {what} is {text if len(text) <= 40 else text[:39] + '…'}, not an "
                          "object. Re-run the command that wrote it.")
    return d


def _version(d: dict, known: tuple, source: str):
    check_format(d, max(known), source)
    version = d.get("format_version")
    if version is not None and version not in known:
        raise RecordError(f"{source} has format_version {version!r}, which this release of aecurves does not read "
                          f"(it reads {', '.join(str(v) for v in known)} and files without one). It was written by "
                          "another release: use that one, or re-run the command that wrote it.")
    return version


@dataclass
class EvalRecord:
    """eval.json. `paths` maps "curve" / "segment" to that path's summary scalars; `rest` holds every other key as
    written (loss, data, bn, series, notes, ensemble, renormalization...)."""

    FORMAT: ClassVar[int] = 2
    KEYS: ClassVar[tuple] = ("kind", "checkpoint", "endpoints", "segment_evaluated", "config", "files")

    kind: str
    paths: dict
    config: dict
    checkpoint: str | None = None
    endpoints: list = field(default_factory=list)
    segment_evaluated: bool = False
    files: dict = field(default_factory=dict)
    rest: dict = field(default_factory=dict)

    @staticmethod
    def split_summary(kind: str, summary: dict) -> dict:
        """The old flat summary as paths: a curve's plain keys are its own, segment_* its segment's; a segment-only
        evaluation's plain keys are the segment's."""
        if kind == "segment":
            return {"segment": dict(summary)}
        paths = {"curve": {k: v for k, v in summary.items() if not k.startswith(SEGMENT_PREFIX)}}
        segment = {k[len(SEGMENT_PREFIX):]: v for k, v in summary.items() if k.startswith(SEGMENT_PREFIX)}
        if segment:
            paths["segment"] = segment
        return paths

    def flat_summary(self) -> dict:
        """The summary in the old flat layout (curve.npz's, the console's): a curve's keys plain and its segment's
        prefixed segment_; a segment-only evaluation's plain."""
        if self.kind == "segment":
            return dict(self.paths.get("segment", {}))
        return {**self.paths.get("curve", {}),
                **{SEGMENT_PREFIX + k: v for k, v in self.paths.get("segment", {}).items()}}

    def path(self, name: str) -> dict | None:
        """The summary of the path "curve" or "segment", or None when it was not evaluated."""
        return self.paths.get(name)

    @property
    def vae(self) -> bool:
        """Whether the networks evaluated are VAEs ("loss" their objective): false for a file from before VAEs."""
        return self.rest.get("vae") is True

    def get(self, key: str, default=None):
        """Any other key of the file, as written."""
        return self.rest.get(key, default)

    def to_json(self) -> dict:
        return {"format_version": self.FORMAT, "kind": self.kind, "checkpoint": self.checkpoint,
                "endpoints": self.endpoints, "segment_evaluated": self.segment_evaluated, **self.rest,
                "paths": self.paths, "config": self.config, "files": self.files}

    @classmethod
    def from_json(cls, d, source: str = "eval.json") -> "EvalRecord":
        d = _need_dict(d, "the file", source)
        version = _version(d, (cls.FORMAT,), source)
        kind = d.get("kind")
        if version is None:  # the old layout: "summary", the segment's keys prefixed
            summary = _need_dict(d.get("summary"), "summary", source)
            if kind is None:  # written before eval.json recorded its kind
                curve = (d.get("path") or {}).get("curve") if isinstance(d.get("path"), dict) else None
                kind = "segment" if curve == "segment" and not any(k.startswith(SEGMENT_PREFIX) for k in summary) \
                    else "curve"
            paths = cls.split_summary(kind, summary) if kind in ("curve", "segment") else None
            rest = {k: v for k, v in d.items() if k not in cls.KEYS and k != "summary"}
        else:
            paths = _need_dict(d.get("paths"), "paths", source)
            rest = {k: v for k, v in d.items() if k not in cls.KEYS and k not in ("paths", "format_version")}
        if kind not in ("curve", "segment"):
            raise RecordError(f"{source} is damaged: its kind is {kind!r}, not \"curve\" or \"segment\". Re-run "
                              "eval-curve.")
        for name, values in paths.items():
            if name not in ("curve", "segment"):
                raise RecordError(f"{source} is damaged: paths.{name} is no path (curve or segment). Re-run "
                                  "eval-curve.")
            _need_dict(values, f"paths.{name}", source)
        if kind == "segment" and "curve" in paths:
            raise RecordError(f"{source} is damaged: a segment's evaluation has a curve in its paths. Re-run "
                              "eval-curve.")
        config = _need_dict(d.get("config"), "config", source)
        files = d.get("files") or {}
        _need_dict(files, "files", source)
        return cls(kind=kind, paths=paths, config=config, checkpoint=d.get("checkpoint"),
                   endpoints=d.get("endpoints") or [], segment_evaluated=d.get("segment_evaluated") is True,
                   files=files, rest=rest)


@dataclass
class PlaneRecord:
    """plane.json. `summary` the grid's scalars, `rest` every other key as written (inputs, plane, grid, bends,
    loss, data...). The old layout is the same keys without format_version."""

    FORMAT: ClassVar[int] = 2
    KEYS: ClassVar[tuple] = ("kind", "summary", "config", "files")

    kind: str
    summary: dict
    config: dict
    files: dict = field(default_factory=dict)
    rest: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.rest.get(key, default)

    @property
    def vae(self) -> bool:
        """Whether the networks evaluated are VAEs (EvalRecord.vae)."""
        return self.rest.get("vae") is True

    def to_json(self) -> dict:
        return {"format_version": self.FORMAT, "kind": self.kind, **self.rest, "summary": self.summary,
                "config": self.config, "files": self.files}

    @classmethod
    def from_json(cls, d, source: str = "plane.json") -> "PlaneRecord":
        d = _need_dict(d, "the file", source)
        _version(d, (cls.FORMAT,), source)
        kind = d.get("kind")
        if not isinstance(kind, str):
            raise RecordError(f"{source} is damaged: its kind is {kind!r}, not a string. Re-run plane.")
        files = d.get("files") or {}
        return cls(kind=kind, summary=_need_dict(d.get("summary"), "summary", source),
                   config=_need_dict(d.get("config"), "config", source), files=_need_dict(files, "files", source),
                   rest={k: v for k, v in d.items() if k not in cls.KEYS and k != "format_version"})


@dataclass
class StageRecord:
    """study_stage.json: a study's record of one stage (its name, status, the hashes of its inputs) and what the
    status brings (executor, job_id and logs, error, ran, result, adopted) in `extra`. The old layout is the same
    keys without format_version."""

    FORMAT: ClassVar[int] = 2

    stage: str
    status: str
    inputs: dict
    extra: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.extra.get(key, default)

    def to_json(self) -> dict:
        return {"format_version": self.FORMAT, "stage": self.stage, "status": self.status, "inputs": self.inputs,
                **self.extra}

    @classmethod
    def from_json(cls, d, source: str = "study_stage.json") -> "StageRecord":
        d = _need_dict(d, "the file", source)
        _version(d, (cls.FORMAT,), source)
        for key in ("stage", "status"):
            if not isinstance(d.get(key), str):
                raise RecordError(f"{source} is damaged: its {key} is {d.get(key)!r}, not a string. Re-run the "
                                  "study with --force for that stage.")
        return cls(stage=d["stage"], status=d["status"], inputs=_need_dict(d.get("inputs"), "inputs", source),
                   extra={k: v for k, v in d.items() if k not in ("format_version", "stage", "status", "inputs")})


@dataclass
class StudyRecord:
    """study.json: the resolved config, each section's settings, provenance, the groups, the stage list and the
    folder layout. Format 1 (0.1.0) had no "sections": it reads with sections None. config and provenance are kept
    as written (the report checks them entry by entry and is made without them)."""

    FORMAT: ClassVar[int] = 2
    KEYS: ClassVar[tuple] = ("config", "sections", "provenance", "groups", "stages", "layout")

    config: dict | None
    groups: dict
    sections: dict | None = None
    provenance: dict | None = None
    stages: list = field(default_factory=list)
    layout: dict = field(default_factory=dict)
    rest: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format_version": self.FORMAT, "config": self.config, "sections": self.sections,
                "provenance": self.provenance, "groups": self.groups, "stages": self.stages, "layout": self.layout,
                **self.rest}

    @classmethod
    def from_json(cls, d, source: str = "study.json") -> "StudyRecord":
        d = _need_dict(d, "the file", source)
        version = _version(d, (1, cls.FORMAT), source)
        sections = d.get("sections") if version == cls.FORMAT else None
        if sections is not None:
            _need_dict(sections, "sections", source)
        stages = d.get("stages") or []
        if not isinstance(stages, list):
            raise RecordError(f"{source} is damaged: stages is not a list. Re-run the study.")
        return cls(config=d.get("config"), groups=_need_dict(d.get("groups"), "groups", source), sections=sections,
                   provenance=d.get("provenance"), stages=stages,
                   layout=d.get("layout") if isinstance(d.get("layout"), dict) else {},
                   rest={k: v for k, v in d.items() if k not in cls.KEYS and k != "format_version"})


@dataclass
class EndpointRecord:
    """The non-tensor part of an endpoint's checkpoint: its kind, epoch, args and metrics (the rows of metrics.jsonl
    so far). train.py writes it beside the tensors (checkpoint.save_checkpoint writes the file, its format_version
    checkpoint.FORMAT_VERSION == FORMAT); the study reads it; one without format_version reads as format 1."""

    FORMAT: ClassVar[int] = 1

    kind: str
    epoch: int | None
    args: dict
    metrics: list
    format_version: int = 1

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "kind": self.kind, "epoch": self.epoch, "args": self.args,
                "metrics": self.metrics}

    @classmethod
    def from_json(cls, d, source: str = "checkpoint.pt") -> "EndpointRecord":
        d = _need_dict({k: v for k, v in d.items() if k in ("format_version", "kind", "epoch", "args", "metrics")}
                       if isinstance(d, dict) else d, "the checkpoint", source)
        check_format(d, cls.FORMAT, source)
        version = d.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > cls.FORMAT:
            raise RecordError(f"{source} has format_version {version!r}, which this release of aecurves does not "
                              f"read (it reads up to {cls.FORMAT}). Use the release that wrote it.")
        epoch = d.get("epoch")
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise RecordError(f"{source} is damaged: its epoch is {epoch!r}, not an integer. Retrain it.")
        return cls(kind=str(d.get("kind") or "endpoint"), epoch=epoch, args=dict(d.get("args") or {}),
                   metrics=list(d.get("metrics") or []), format_version=version)


def _in_order(keys: tuple, values: dict) -> dict:
    """`values` with the keys of `keys` first, in that order (a record file's layout), then any others as given."""
    return {**{k: values[k] for k in keys if k in values}, **{k: v for k, v in values.items() if k not in keys}}


def _format(d: dict, newest: int, source: str) -> int:
    """The "format" of an fge.json / ensembles.json (their key; 1 when absent): NewerFormat beyond `newest`,
    RecordError for anything but an integer this release reads."""
    check_format(d, newest, source, "format")
    version = d.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= newest:
        raise RecordError(f"{source} has format {version!r}, which this release of aecurves does not read (it reads "
                          f"up to {newest}). It was written by another release: use that one, or re-run the command "
                          "that wrote it.")
    return version


def _need_kind(d: dict, kind: str, source: str) -> None:
    if d.get("kind", kind) != kind:
        raise RecordError(f"{source} is damaged or no {kind} record: its kind is {d.get('kind')!r}, not "
                          f"{kind!r}. Re-run the command that wrote it.")


def _need_strings(values, what: str, source: str) -> list:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RecordError(f"{source} is damaged: {what} is {json.dumps(values, default=str)[:40]}, not a list of "
                          "file names. Re-run the command that wrote it.")
    return values


@dataclass
class FgeRecord:
    """fge.json, written last by `aecurves fge` (its presence marks a finished run). `config` is the run's resolved
    config, `budget_epochs` its epochs, `files` what it wrote ({"json", "metrics", "checkpoint", "snapshots": [...],
    "reconstructions"}); `rest` holds every other key as written (endpoint, schedule, epochs, snapshots, start,
    ensemble...). Format 1 throughout; a file without "format" reads as 1, and one from before issue 28 (no
    "kl_weight") reads as it is."""

    FORMAT: ClassVar[int] = 1
    KIND: ClassVar[str] = "fge"
    # the file's layout: to_json() writes the keys in this order, so a record read and written again is the same file
    LAYOUT: ClassVar[tuple] = (
        "reference", "endpoint", "config", "optimizer", "schedule", "budget_epochs", "steps_per_epoch",
        "train_images", "test_images", "loss", "kl_weight", "loss_description", "data", "bn", "metrics", "epochs",
        "snapshot_epochs", "snapshots", "start", "ensemble", "ensemble_mse_gain", "notes", "device", "precision",
        "seconds", "files")

    config: dict
    budget_epochs: int
    files: dict = field(default_factory=dict)
    rest: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        """Any other key of the file, as written."""
        return self.rest.get(key, default)

    def listed_files(self) -> list[str]:
        """Every file the run lists under "files", its snapshots' list flattened in."""
        return [v for k, v in self.files.items() if k != "snapshots"] + list(self.files.get("snapshots", []))

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "kind": self.KIND, **_in_order(self.LAYOUT, {
            **self.rest, "config": self.config, "budget_epochs": self.budget_epochs, "files": self.files})}

    @classmethod
    def from_json(cls, d, source: str = "fge.json") -> "FgeRecord":
        d = _need_dict(d, "the file", source)
        _format(d, cls.FORMAT, source)
        _need_kind(d, cls.KIND, source)
        config = _need_dict(d.get("config"), "config", source)
        epochs = d.get("budget_epochs")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise RecordError(f"{source} is damaged: its budget_epochs is {epochs!r}, not a number of epochs. Re-run "
                              "fge.")
        files = _need_dict(d.get("files", {}), "files", source)
        for key, value in files.items():
            if key == "snapshots":
                _need_strings(value, "files.snapshots", source)
            elif not isinstance(value, str):
                raise RecordError(f"{source} is damaged: files.{key} is {value!r}, not a file name. Re-run fge.")
        snapshots = d.get("snapshots", [])
        if not isinstance(snapshots, list) or not all(isinstance(s, dict) for s in snapshots):
            raise RecordError(f"{source} is damaged: its snapshots are not a list of objects. Re-run fge.")
        return cls(config=config, budget_epochs=epochs, files=files,
                   rest={k: v for k, v in d.items() if k not in ("format", "kind", "config", "budget_epochs", "files")})


@dataclass
class EnsemblesRecord:
    """ensembles.json, written last by the study's ensembles stage (ensembles.py). `config` is its config (the
    networks' files and the averages asked for), `averages` the measured ones ({name: {"members", "files", "mse",
    "psnr", ...}}); `rest` holds every other key as written (networks with their SHA-256, metrics, bn, notes...).
    Format 1 throughout; a file without "format" reads as 1, and one without "vae" (from before issue 28) is an
    autoencoders' (`vae`)."""

    FORMAT: ClassVar[int] = 1
    KIND: ClassVar[str] = "ensembles"
    LAYOUT: ClassVar[tuple] = ("config", "networks", "averages", "metrics", "vae", "test_images", "train_images", "bn",
                               "data", "notes", "device", "seconds", "files")

    config: dict
    averages: dict
    rest: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        """Any other key of the file, as written."""
        return self.rest.get(key, default)

    def networks(self) -> list[str]:
        """The checkpoint files of the networks measured, as the config names them ([] when it names none)."""
        return list(self.config.get("networks", []))

    @property
    def vae(self) -> bool:
        return self.rest.get("vae") is True

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "kind": self.KIND,
                **_in_order(self.LAYOUT, {**self.rest, "config": self.config, "averages": self.averages})}

    @classmethod
    def from_json(cls, d, source: str = "ensembles.json") -> "EnsemblesRecord":
        d = _need_dict(d, "the file", source)
        _format(d, cls.FORMAT, source)
        _need_kind(d, cls.KIND, source)
        config = _need_dict(d.get("config"), "config", source)
        _need_strings(config.get("networks", []), "config.networks", source)
        averages = _need_dict(d.get("averages"), "averages", source)
        for name, values in averages.items():
            _need_dict(values, f"averages.{name}", source)
        return cls(config=config, averages=averages,
                   rest={k: v for k, v in d.items() if k not in ("format", "kind", "config", "averages")})
