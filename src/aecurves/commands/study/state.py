"""The study's state: what each stage should be made with, what its outputs say they were made with, and whether it
is finished; study.json and each stage's study_stage.json; progress."""

import math
import time
from pathlib import Path

from aecurves.config import STUDY_SECTIONS, recorded_value, result_settings, validate
from aecurves.errors import UserError
from aecurves.files import check_no_link, clear_folder, read_json, sha256, write_json
from aecurves.records import (
    NewerFormat,
    RecordError,
    StageRecord,
    StudyRecord,
    check_format,
    other_outputs,
    with_article,
)

from .kinds import KINDS, layout
from .planning import Stage
from .settings import Settings, section, section_record, study_record

STAGE_RECORD = "study_stage.json"
RUNTIME_NOTE = "device, precision, progress bars and the cache folder never invalidate finished stages"


def read_stage_record(folder: Path) -> StageRecord | None:
    """A stage's study_stage.json (records.StageRecord, either layout), or None when it is missing or damaged."""
    try:
        return StageRecord.from_json(read_json(folder / STAGE_RECORD), str(folder / STAGE_RECORD))
    except NewerFormat:
        raise
    except RecordError:
        return None


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


class Study:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.out)
        self.stages: list[Stage] = []
        self.groups: dict = {}
        self.forced: set[str] = set()
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.t0 = time.perf_counter()
        self.provenance: dict = {}  # set by run_stages; kept from the last run that ran stages when nothing runs
        self.previous_provenance: dict | None = None
        self.rates: dict = {}  # kind -> (seconds, units) of stages run now, for the estimate

    # --- settings each stage should have, and the settings its outputs record (its kind's declaration)

    def config(self, st: Stage, resume: bool = False):
        """The config of the command that makes the stage: its section's, with the stage's own files."""
        kind = KINDS[st.step]
        return kind.configure(self.settings, section(self.settings, kind.section), st, self.root / st.folder,
                              [self.root / p for p in st.inputs], resume)

    def expected(self, st: Stage) -> dict:
        """The settings that define the stage's result, as its config has them."""
        kind = KINDS.get(st.step)
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
        kind = KINDS[st.step]
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
        state, why = KINDS[st.step].judge(self.config(st), st, facts)
        if state == "done" and record is None:
            return "done", "adopted"
        return state, why

    def clear(self, st: Stage) -> None:
        """Removes one stage's own outputs (for a curve: not its eval/ and plane/ folders, other stages'), following
        no link: a stage folder that is a link, or lies below one, is refused before anything is removed (N2)."""
        if st.kind != "report":
            clear_folder(self.root, self.root / st.folder, KINDS[st.step].keep)

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
        check_no_link(self.root, self.root / st.folder / STAGE_RECORD)  # a link made since the study started
        write_json(self.root / st.folder / STAGE_RECORD,
                   StageRecord(stage=st.name, status=status, inputs=self.input_hashes(st), extra=extra).to_json())

    # --- the study record

    def write_study_json(self) -> None:
        check_no_link(self.root, self.root / "study.json")  # a link made since the study started
        trained = [n for n in self.ran if n != "report"]
        sections = dict.fromkeys(KINDS[st.step].section for st in self.stages if st.step in KINDS)
        write_json(self.root / "study.json", StudyRecord(
            config=study_record(self.settings),
            sections={name: section_record(self.settings, name) for name in sections},
            provenance=self.provenance if trained or not self.previous_provenance else self.previous_provenance,
            groups=self.groups,
            stages=[{"name": s.name, "kind": s.kind, "loss": s.loss, "seeds": list(s.seeds), "folder": s.folder}
                    for s in self.stages],
            layout=layout(),
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


# ----------------------------------------------------------------------------------------------------------
# refusals before anything runs


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
        found = other_outputs(study.root / st.folder, KINDS[st.step].foreign if st.step in KINDS else ())
        if found:
            kind, names = next(iter(found.items()))
            raise UserError(f"The folder {study.root / st.folder} of the stage {st.name} holds the files of "
                            f"{with_article(kind)} "
                            f"({', '.join(names)}), which its command ({KINDS[st.step].command}) does not write: "
                            "the stage would replace them or take them for its own. Move them out, or choose "
                            "another --out folder; nothing was changed.")


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
            KINDS[st.step].read(root / st.folder, st)


def refuse_stale_outputs(study: Study) -> None:
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

    return importlib.import_module(f"aecurves.commands.{KINDS[st.step].command}")


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
