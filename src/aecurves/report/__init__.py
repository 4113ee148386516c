"""The study report: report.html (self-contained), report.md and report.json, from a study folder's files alone.

`write_report(study_dir)` reads study.json, each endpoint's metrics.jsonl and reconstructions.pt (or, in folders
written before, reconstructions.png), each evaluation's eval.json, curve.npz and reconstruction strips, each FGE
run's fge.json and each pair's ensembles.json, and writes

    report.html   one file, figures embedded as data URIs: opens from disk, no server
    report.md     the same content, figures linked from report_files/
    report.json   every number the report shows, each group's conclusions (code, text, numbers), the summary
                  sentences, study.json's provenance, and a fingerprint of the inputs
    report_files/ the figures

in steps, each a module, with no side effect until the last: collect (inputs, specs, model, numbers: every file
read once, checked, and made typed records) → conclusions (a code, its text, its numbers) → figures (planned from
the collected data) → document (layout: a Doc, referencing the planned figures) → then the figures drawn and the
renderers' Markdown and HTML (render, report.css) written. Every conclusion is chosen by comparing the numbers with
the thresholds in conclusions.py, so the text cannot contradict the tables.

Each input file is checked against the shape its stage writes: one that is unreadable or holds something else is
named as damaged (in the report and on stderr) and left out, and the rest of the report is written. Strings from
the files (folder names, notes, provenance, the model factory) are text in both renderings, never markup.
"""

import sys
import time
from pathlib import Path

from aecurves.config import ReportConfig
from aecurves.errors import UserError
from aecurves.files import atomic_path, check_no_link, read_json, refuse_study_links, write_json
from aecurves.records import NewerFormat, check_format

from . import inputs as _inputs
from .collect import collect
from .conclusions import LOSS_NAMES, MOST, NO_BARRIER, PSNR_TOLERANCE, SOME, Conclusion, Findings, findings
from .figures import FILES_DIR, draw, plan
from .fmt import fdb, finterval, fnum, fpct, fseconds, fsigned
from .inputs import input_files
from .layout import build
from .model import EQUAL_BUDGET_ROWS, EQUAL_BUDGET_SHORT, to_json
from .numbers import CONVERGED_GAIN, convergence, equal_budget_summary
from .render import md_text, to_html, to_markdown

REPORT_VERSION = 5  # 3: aligned paths, extra-trained endpoints, intervals over pairs; 4: equal-budget ensembles
# (FGE), convergence judged from the extra training; 5: conclusions as codes (groups.LOSS.conclusions), the endpoint
# pictures read from reconstructions.pt, the answer first (older reports are redone)

__all__ = ["REPORT_VERSION", "FILES_DIR", "CONVERGED_GAIN", "EQUAL_BUDGET_ROWS", "EQUAL_BUDGET_SHORT", "LOSS_NAMES",
           "Conclusion", "Findings", "collect", "convergence", "equal_budget_summary", "fdb", "finterval", "findings",
           "fnum", "fpct", "fseconds", "fsigned", "input_files", "inputs_fingerprint", "md_text", "read_report_json",
           "run", "write_report"]


def read_report_json(study_dir) -> dict:
    data = read_json(Path(study_dir) / "report.json")
    return data if isinstance(data, dict) else {}


def inputs_fingerprint(study_dir) -> str:
    """SHA-256 over the report's version, study.json's config and groups, and every input file's bytes."""
    return _inputs.inputs_fingerprint(study_dir, REPORT_VERSION)


def write_report(study_dir) -> dict:
    """Writes report.html, report.md, report.json and report_files/ in `study_dir`, reading only its files, and
    names on stderr the input files it found damaged (and made the report without). A folder holding a link, or the
    report of a newer release, is refused before anything is read (docs/reliability.md#folders-someone-sent)."""
    study_dir = Path(study_dir)
    check_report_folder(study_dir)
    fingerprint = inputs_fingerprint(study_dir)
    study = collect(study_dir)
    for rel, reason in study.damaged.items():
        print(f"warning: {study_dir / rel} is damaged ({reason}); the report is made without it", file=sys.stderr)
    found = {loss: findings(g) for loss, g in study.groups.items()}
    figures = plan(study, study_dir)
    doc = build(study, found, figures, study_dir, time.strftime("%Y-%m-%d %H:%M"))
    # from here on, the writes; each through aecurves.files: atomic, and a failure (a full disk) names its file
    for rel in (*figures.files, "report.md", "report.html", "report.json"):
        check_no_link(study_dir, study_dir / rel)  # a link made since the check above: never written through
    draw(figures, study_dir)
    images = {rel: (study_dir / rel).read_bytes() for rel in figures.files}
    _write_text(study_dir / "report.md", to_markdown(doc))
    _write_text(study_dir / "report.html", to_html(doc, "aecurves study report", images))
    record = report_record(study, found, fingerprint)
    write_json(study_dir / "report.json", record)  # last: its fingerprint marks the report complete
    print(f"wrote report.html, report.md, report.json and {FILES_DIR}/ in {study_dir}")
    return record


def check_report_folder(study_dir: Path) -> None:
    """UserError for a study folder the report cannot trust: one with links inside, or whose report.json a newer
    release wrote (this one would replace it with an older report)."""
    refuse_study_links(study_dir)
    try:
        existing = read_json(study_dir / "report.json")
        if isinstance(existing, dict):
            check_format(existing, REPORT_VERSION, str(study_dir / "report.json"))
    except NewerFormat as exc:
        raise UserError(f"{exc} Nothing was changed.") from None


def summary_line(loss: str, group, conclusion) -> str:
    """A conclusion as one line of the study's closing summary. A skipped group's gives the first sentence of its
    reason only: the study prints the full reason and remedy just before these lines, and the report holds both."""
    if conclusion.code != "group-skipped":
        return conclusion.text
    reason = group.reason.split(". ")[0].rstrip(".") or "no reason recorded"
    return (f"The {loss} group was skipped: {reason}. The {loss} section of the report gives the full reason and the "
            "remedy (e.g. --vgg-weights PATH); the other groups are complete.")


def report_record(study, found: dict[str, Findings], fingerprint: str) -> dict:
    """report.json: the collected data as it is laid out in model.py, with each group's conclusions (codes, texts,
    numbers; the caveat last) and its caveat's text, and every conclusion's text in summary_lines."""
    groups = to_json(study.groups)
    for loss, f in found.items():
        groups[loss]["conclusions"] = to_json(f.all + ([f.caveat] if f.caveat else []))
        groups[loss]["caveat"] = f.caveat.text if f.caveat else None
    lines = [summary_line(loss, study.groups[loss], c) for loss, f in found.items() for c in f.all]
    lines += [f.caveat.text for f in found.values() if f.caveat]
    return {"format_version": REPORT_VERSION, "inputs_fingerprint": fingerprint,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary_lines": lines,
            "thresholds": {"no_barrier": NO_BARRIER, "most": MOST, "some": SOME, "psnr_tolerance_db": PSNR_TOLERANCE,
                           "converged_gain": CONVERGED_GAIN},
            "config": study.config, "provenance": to_json(study.provenance), "groups": groups,
            "ran": to_json(study.ran),
            "damaged": study.damaged}


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def run(cfg: ReportConfig) -> dict:
    """`aecurves report DIR`."""
    study_dir = Path(cfg.study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir} is not a folder; pass the folder of a study (the --out of `aecurves study`).")
    return write_report(study_dir)
