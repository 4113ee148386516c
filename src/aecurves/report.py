"""The study report: report.html (self-contained), report.md and report.json, from a study folder's files alone.

`write_report(study_dir)` reads study.json, each endpoint's metrics.jsonl and reconstructions.png, each
evaluation's eval.json, curve.npz and reconstruction strips, each FGE run's fge.json and each pair's
ensembles.json, and writes

    report.html   one file, figures embedded as data URIs: opens from disk, no server
    report.md     the same content, figures linked from report_files/
    report.json   every number the report shows, the summary sentences, study.json's provenance, and a
                  fingerprint of the inputs; per loss group the equal-budget ensembles (groups.LOSS.equal_budget
                  over pairs, groups.LOSS.pairs[i].equal_budget per pair) and the convergence judgement
                  (groups.LOSS.convergence)
    report_files/ the figures (loss along the paths per loss group; the endpoints' reconstructions labelled and
                  enlarged; copies of the reconstruction strips along the paths)

Every number in the summary is computed here from those files, and every conclusion is chosen by comparing
the numbers with the thresholds below, so the text cannot contradict the tables.

Each input file is checked against the shape its stage writes: one that is unreadable or holds something else is
named as damaged (in the report and on stderr) and left out, and the rest of the report is written. Strings from
the files (folder names, notes, provenance, the model factory) are text in both renderings, never markup.
"""

import base64
import hashlib
import html
import json
import re
import shlex
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aecurves.config import BN_IMAGES, BUILTIN_MODEL, LOSSES, TRAIN_IMAGES, ReportConfig
from aecurves.errors import UserError
from aecurves.files import atomic_path, read_json, write_json
from aecurves.stats import mean_interval

REPORT_VERSION = 4  # 3: aligned paths, extra-trained endpoints, intervals over pairs; 4: equal-budget ensembles
# (FGE), convergence judged from the extra training (older reports are redone)
FILES_DIR = "report_files"
# Conclusions: a segment barrier below NO_BARRIER × the endpoints' mean test loss counts as "no clear barrier";
# a curve removing at least MOST of it removes "most of the barrier"; PSNR within PSNR_TOLERANCE dB is "as good".
NO_BARRIER = 0.05
MOST = 0.8
SOME = 0.3
PSNR_TOLERANCE = 0.5
# The caveat beside the result: endpoints trained on fewer than SMALL_TRAIN_SET images, or whose worst held-out PSNR
# is below LOW_PSNR_DB, show the method but say nothing about well-trained autoencoders on a dataset like CelebA.
SMALL_TRAIN_SET = 1000
LOW_PSNR_DB = 22.0
# Convergence: an endpoint whose held-out loss still falls by more than CONVERGED_GAIN when it is trained on for as
# long as a curve (the extra-trained endpoint, measured like every point of the paths) had not converged. 2%: the
# differences the report draws conclusions from are of that size (a curve ensemble beats the better endpoint by
# 2-3% in MSE on the CelebA sample; a barrier of 5% of the loss is "no clear barrier"), so an endpoint still 2% away
# from where more of the same training takes it is not a minimum at the resolution of those comparisons. The
# last-epoch gain cannot tell: under the paper's schedule the lr ends at 1% of its start, so it is near 0 by
# construction (measured on CelebA: 0.0-0.4% in the last epoch, yet 17-18% from 10 more epochs).
CONVERGED_GAIN = 0.02
ENDPOINT_KEYS = ("tr_loss", "te_loss", "tr_mse", "te_mse", "tr_psnr", "te_psnr")
PATH_KEYS = ("te_loss_max", "te_barrier", "tr_barrier", "length", "te_psnr_min", "te_mse_max", "te_ssim_min",
             "te_barrier_lo", "te_barrier_hi")
LOSS_NAMES = {"mse": "MSE loss", "vgg": "VGG perceptual loss"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1.2em;color:#1d1d1f;line-height:1.5;overflow-wrap:break-word}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%;margin:.8em 0 1.2em}
table{border-collapse:collapse;font-size:.92em}
th,td{border:1px solid #d0d0d0;padding:.3em .7em;text-align:left}th{background:#f4f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figure.pixels img{image-rendering:pixelated}
figcaption{color:#555;font-size:.9em}
.box{padding:.6em 1em;margin:1em 0;border-left:4px solid}
.summary{background:#eef7ee;border-color:#3a3}.warn{background:#fff5e6;border-color:#e90}
.muted{color:#666;font-size:.9em}
code{background:#f4f4f6;padding:0 .25em;border-radius:3px}
"""


# ----------------------------------------------------------------------------------------------------------
# reading: each input file checked against the shape its writer gives it


def read_report_json(study_dir) -> dict:
    data = read_json(Path(study_dir) / "report.json")
    return data if isinstance(data, dict) else {}


# Measured by benchmarks/eval_protocol.py (docs/performance.md gives the command and the table).
PROTOCOL_DEVIATION = ("The train-metric subset is stratified by the start endpoint's per-image MSE. Measured on "
                      "real CelebA images (benchmarks/eval_protocol.py), subsets of the default size keep every "
                      "measured point within 1% of --full at three standard deviations; docs/performance.md "
                      "('Evaluation subsets against --full') gives the table.")

NUMBER = "a number"  # a spec: an int or a float (NaN and infinities too), not a bool


@dataclass(frozen=True)
class Maybe:
    """A spec: `spec` or null; an object's entry of this spec may also be absent."""
    spec: object


@dataclass(frozen=True)
class Each:
    """A spec: an object of any keys, every value fitting `spec`, holding (not null) each key of `needs`."""
    spec: object
    needs: tuple = ()


KINDS = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list"}


OUTSIDE = "it lies outside the study folder (a '..' or a link out of it), so it is not read"


def inside(root: Path, rel: str) -> Path | None:
    """root/rel when it stays inside the study folder, else None. The relative paths come from study.json: a folder
    someone sent must not make the report read, and embed, files from elsewhere ('../..', or a link out)."""
    path = root / rel
    try:
        return path if path.resolve().is_relative_to(root.resolve()) else None
    except (OSError, RuntimeError):  # a link loop
        return None


class Damaged(Exception):
    """An input file that cannot be read or does not hold what its writer writes; the message says what is wrong."""


def mismatch(value, spec, where: str = "", whole: str = "the file") -> str | None:
    """Why `value` does not fit `spec` ('summary.te_barrier is "0.02", not a number'), or None when it does.

    A spec is NUMBER, a type of KINDS, Maybe(spec), Each(spec), {key: spec} (an object with those entries, others
    free), [spec] (a list of such items) or a tuple of specs (a list of exactly those). `where` names `value` in the
    message, `whole` when it is the whole file (or row)."""
    name = where or whole
    if isinstance(spec, Maybe):
        return None if value is None else mismatch(value, spec.spec, where, whole)
    if isinstance(spec, (dict, Each)):
        if not isinstance(value, dict):
            return _not(value, "an object", name)
        if isinstance(spec, Each):
            needed = spec.spec.spec if isinstance(spec.spec, Maybe) else spec.spec
            entries = [(k, needed) for k in spec.needs] + [(k, spec.spec) for k in value if k not in spec.needs]
        else:
            entries = list(spec.items())
        for key, sub in entries:
            at = f"{where}.{key}" if where else str(key)
            if key not in value:
                if not isinstance(sub, Maybe):
                    return f"{name} has no {key}"
            elif problem := mismatch(value[key], sub, at, whole):
                return problem
        return None
    if isinstance(spec, (list, tuple)):
        exact = isinstance(spec, tuple)
        if not isinstance(value, list) or (exact and len(value) != len(spec)):
            return _not(value, f"a list of {len(spec)}" if exact else "a list", name)
        for i, (item, sub) in enumerate(zip(value, spec if exact else spec * len(value))):
            if problem := mismatch(item, sub, f"{where}[{i}]", whole):
                return problem
        return None
    if spec is NUMBER:
        return None if _is_number(value) else _not(value, NUMBER, name)
    fits = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
    return None if fits else _not(value, KINDS[spec], name)


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)  # an int beyond float's range would break the formatting
    except OverflowError:
        return False
    return True


def _not(value, kind: str, name: str) -> str:
    text = json.dumps(value)
    return f"{name} is {text if len(text) <= 40 else text[:39] + '…'}, not {kind}"


def _checked(text: str, spec, whole: str = "the file"):
    """The value of the JSON `text` when it fits `spec`; else Damaged, saying why."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise Damaged(f"not JSON ({exc})") from None
    if problem := mismatch(value, spec, whole=whole):
        raise Damaged(problem)
    return value


def _checked_rows(text: str, spec) -> list:
    """The rows of a JSON-lines `text`, each fitting `spec`; else Damaged, naming the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(_checked(line, spec, "the row"))
            except Damaged as exc:
                raise Damaged(f"line {n}: {exc}") from None
    return rows


class Inputs:
    """The study's input files, each read once and checked against the shape its writer gives it.

    A file that is not there reads as None: its stage has not run ("missing"). One that cannot be read or decoded,
    or holds something else (a string where a number belongs, a list where an object does), reads as None too and
    goes into `damaged` with what is wrong: the report and the console name it, and the report is made without it.
    """

    def __init__(self, root: Path):
        self.root = root
        self.damaged: dict[str, str] = {}  # path relative to the study folder: what is wrong
        self._read: dict[str, object] = {}

    def status(self, rel: str) -> str:
        """"damaged", "missing" or "found"."""
        if rel in self.damaged:
            return "damaged"
        path = inside(self.root, rel)
        return "damaged" if path is None else "found" if path.is_file() else "missing"

    def json(self, rel: str, spec):
        return self.load(rel, lambda path: _checked(path.read_text(), spec))

    def jsonl(self, rel: str, row_spec) -> list | None:
        return self.load(rel, lambda path: _checked_rows(path.read_text(), row_spec))

    def load(self, rel: str, decode):
        """decode(path) of the file `rel` (decoded once: a later call gives the same), or None when it is missing
        or damaged."""
        if rel not in self._read:
            self._read[rel] = self._decode(rel, decode)
        return self._read[rel]

    def _decode(self, rel: str, decode):
        path = inside(self.root, rel)
        if path is None:
            self.damage(rel, OUTSIDE)
            return None
        if not path.is_file():
            return None
        try:
            return decode(path)
        except Damaged as exc:
            self.damage(rel, str(exc))
        except Exception as exc:  # decoders only read, and a damaged file fails each in its own way: an OSError,
            # a bad zip, PIL's SyntaxError for a truncated PNG, a UnicodeDecodeError...
            self.damage(rel, f"not readable ({type(exc).__name__}: {exc})")
        return None

    def entry(self, rel: str, name: str, value, spec):
        """`value`, the entry `name` of the file `rel` (read already), when it fits `spec`; else None, and `rel` is
        damaged (for a part the report can be made without)."""
        if problem := mismatch(value, spec, name):
            self.damage(rel, problem)
            return None
        return value

    def damage(self, rel: str, reason: str) -> None:
        self.damaged[rel] = f"{self.damaged[rel]}; {reason}" if rel in self.damaged else reason


# What the report reads of each input file, as its writer writes it.
NUM = Maybe(NUMBER)
PAIR = {"seeds": (int, int), "curve": str, "eval": str, "aligned_eval": Maybe(str), "aligned_endpoint": Maybe(str),
        "baseline_eval": Maybe(str), "ensembles": Maybe(str)}
RUN_GROUP = {"status": str, "endpoints": Each(str), "pairs": [PAIR], "warning": Maybe(str),
             "plane": Maybe({"seeds": (int, int), "folder": str}), "fge": Maybe(Each(str))}
SKIPPED_GROUP = {"status": str, "reason": Maybe(str), "remedy": Maybe(str)}
# every evaluation of a path holds these summary numbers (the others the report reads may be null: "n/a")
PATH_NEEDS = ("te_loss_start", "te_loss_end", "te_psnr_start", "te_psnr_end", "te_psnr_min", "te_barrier")
EVAL = {"notes": Maybe([str]), "num_points": Maybe(int), "loss_description": Maybe(str), "perceptual": Maybe(bool),
        "path": Maybe({"curve": Maybe(str), "num_bends": Maybe(int)}),
        "bn": Maybe({"images": Maybe(int), "recomputed": Maybe(bool)}),
        "data": Maybe({"train_images": Maybe(int), "test_images": Maybe(int)}),
        "train_metric_images": Maybe(int), "test_metric_images": Maybe(int), "device": Maybe(str),
        "ensemble": Maybe({"k": Maybe(int), "entries": Each({m: NUM for m in ("mse", "psnr", "ssim")})})}
SEGMENT_EVAL = {**EVAL, "summary": Each(NUM, PATH_NEEDS)}  # eval-curve --segment (the baselines)
CURVE_EVAL = {**EVAL, "summary": Each(NUM, PATH_NEEDS + tuple("segment_" + k for k in PATH_NEEDS))}  # and its segment
ENDPOINT_LOG_ROW = {"epoch": Maybe(int), "train_loss": NUM, "test_loss": NUM, "test_mse": NUM, "test_psnr": NUM,
                    "lr": NUM, "precision": Maybe(str)}
CURVE_LOG_ROW = {"precision": Maybe(str)}
STAGE = {"result": Maybe({"seconds": NUM})}
PLANE = {"summary": dict, "grid": Maybe(dict), "seconds": NUM}
ENSEMBLES = {"averages": Each({"members": [int], "mse": NUMBER, "psnr": NUMBER, "ssim": NUM})}  # ensembles.json
FGE = {"budget_epochs": int, "snapshots": [dict], "schedule": Maybe({"cycle": Maybe(int)})}  # fge.json
CURVE_ARRAYS = ("ts", "tr_loss", "te_loss")  # what the figure draws of a curve.npz, for the curve and its segment


def _curve_arrays(path: Path) -> dict:
    """A curve.npz's CURVE_ARRAYS of the curve and of its segment, checked to be numbers, one per t."""
    keys = [prefix + k for prefix in ("", "segment_") for k in CURVE_ARRAYS]
    with np.load(path, allow_pickle=False) as npz:
        if missing := [k for k in keys if k not in npz.files]:
            raise Damaged(f"it has no {', '.join(missing)}")
        arrays = {k: npz[k] for k in keys}
    for prefix in ("", "segment_"):
        ts = arrays[prefix + "ts"]
        for k in CURVE_ARRAYS:
            a = arrays[prefix + k]
            if a.dtype.kind not in "iuf" or a.ndim != 1 or a.shape != ts.shape:
                raise Damaged(f"{prefix + k} is not numbers, one per t")
    return arrays


def _gain(rows: list[dict]) -> float | None:
    """Relative fall of the held-out loss over the last epoch. Shown, but no measure of convergence: under the
    paper's schedule the lr ends at 1% of its start, so it is near 0 by construction (convergence() judges it)."""
    if len(rows) < 2:
        return None
    before, after = rows[-2].get("test_loss"), rows[-1].get("test_loss")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before > 0:
        return None
    return (before - after) / before


def _study(study_dir: Path) -> dict:
    """study.json, checked: the report is laid out from its groups, so without them there is no report."""
    inputs = Inputs(study_dir)
    study = inputs.json("study.json", {"groups": Each({"status": str})})
    problem = inputs.damaged.get("study.json") or (_groups_problem(study["groups"]) if study else None)
    if problem:
        raise UserError(f"{study_dir / 'study.json'} is damaged ({problem}): the report is laid out from it, so "
                        "none can be written.")
    if study is None:
        raise UserError(f"{study_dir} is not a study folder: it has no study.json (written by `aecurves study`).")
    return study


def _groups_problem(groups: dict) -> str | None:
    for loss, group in groups.items():
        where = f"groups.{loss}"
        if loss not in LOSSES:  # a group's name goes into file names and figure titles
            return f"{where}: {json.dumps(loss)} is not a loss ({', '.join(LOSSES)})"
        if problem := mismatch(group, RUN_GROUP if group["status"] == "run" else SKIPPED_GROUP, where):
            return problem
        if seed := next((s for s in group.get("endpoints", {}) if not re.fullmatch(r"-?\d+", s)), None):
            return f"{where}.endpoints: {json.dumps(seed)} is not a seed"
    return None


def input_files(study_dir) -> list[str]:
    """The files (relative to the study folder) the report is made from."""
    study_dir = Path(study_dir)
    study = _study(study_dir)
    files = []
    for loss, group in study["groups"].items():
        if group.get("status") != "run":
            continue
        for folder in group["endpoints"].values():
            files += [f"{folder}/metrics.jsonl", f"{folder}/reconstructions.png"]
        for pair in group["pairs"]:
            files.append(f"{pair['curve']}/metrics.jsonl")  # the curve's training precision
            for key in ("eval", "aligned_eval"):
                if key in pair:
                    files += [f"{pair[key]}/{n}" for n in ("eval.json", "curve.npz", "reconstructions.png",
                                                           "reconstructions_segment.png")]
            if "aligned_endpoint" in pair:
                files.append(f"{pair['aligned_endpoint']}/study_stage.json")  # how long the alignment took
            if "baseline_eval" in pair:
                files.append(f"{pair['baseline_eval']}/eval.json")
            if "ensembles" in pair:
                files.append(f"{pair['ensembles']}/ensembles.json")
        files += [f"{folder}/fge.json" for folder in group.get("fge", {}).values()]
        if "plane" in group:
            files += [f"{group['plane']['folder']}/{n}" for n in ("plane.json", "plane.png")]
    return files


def inputs_fingerprint(study_dir) -> str:
    """SHA-256 over the report's version, study.json's config and groups, and every input file's bytes.

    study.json's provenance (host, times) is left out on purpose: a re-run that skips every stage rewrites it, and
    must not rewrite the report.
    """
    study_dir = Path(study_dir)
    study = _study(study_dir)
    h = hashlib.sha256()
    config = study.get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "out"}  # a moved study is the same
    h.update(json.dumps({"version": REPORT_VERSION, "config": config, "groups": study["groups"]},
                        sort_keys=True).encode())
    for rel in input_files(study_dir):
        h.update(rel.encode())
        path = inside(study_dir, rel)
        h.update(_file_digest(path) if path is not None else b"outside")
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except FileNotFoundError:
        return b"missing"
    except OSError:  # the report names it as damaged
        return b"unreadable"


def collect(study_dir, inputs: Inputs | None = None) -> dict:
    """Every number of the report, read from the study's files: {config, provenance, groups: {loss: {...}}, ran,
    damaged} (ran: what the stages recorded they used, see what_ran; damaged: Inputs.damaged).

    Every input file is read here, the figures' too, so that the damaged ones are known before the report is laid
    out."""
    study_dir = Path(study_dir)
    inputs = inputs if inputs is not None else Inputs(study_dir)
    study = _study(study_dir)
    out = {"config": inputs.entry("study.json", "config", study.get("config"), Maybe(dict)) or {},
           "provenance": inputs.entry("study.json", "provenance", study.get("provenance"), Maybe(dict)),
           "groups": {}}
    for loss, group in study["groups"].items():
        g = {"status": group["status"], "loss": loss}
        out["groups"][loss] = g
        if group["status"] != "run":
            g.update(reason=group.get("reason") or "", remedy=group.get("remedy") or "")
            continue
        if group.get("warning"):
            g["warning"] = group["warning"]
        pairs, evals, extras = [], {}, {}
        for pair in group["pairs"]:
            a, b = pair["seeds"]
            rel = f"{pair['eval']}/eval.json"
            record = inputs.json(rel, CURVE_EVAL)
            p = {"seeds": [a, b], "eval": pair["eval"], "curve_folder": pair["curve"], "available": False,
                 "eval_status": inputs.status(rel),
                 "curve_precision": _precisions(inputs.jsonl(f"{pair['curve']}/metrics.jsonl", CURVE_LOG_ROW) or [])}
            if record is not None:
                s = record["summary"]
                bn, data = record.get("bn") or {}, record.get("data") or {}
                p.update(available=True, notes=record.get("notes") or [], num_points=record.get("num_points"),
                         loss_description=record.get("loss_description"), perceptual=record.get("perceptual"),
                         path=record.get("path") or {},
                         # what eval-curve really used (the request is in study.json's config)
                         protocol={"bn_images": bn.get("images"), "bn_recomputed": bn.get("recomputed"),
                                   "train_images": record.get("train_metric_images"),
                                   "n_train": data.get("train_images"),
                                   "test_images": record.get("test_metric_images"), "n_test": data.get("test_images"),
                                   "device": record.get("device")},
                         curve={k: s.get(k) for k in PATH_KEYS}, segment={k: s.get("segment_" + k) for k in PATH_KEYS})
                p["barrier_removed"] = _removed(p["segment"]["te_barrier"], p["curve"]["te_barrier"])
                p["train_barrier_removed"] = _removed(p["segment"]["tr_barrier"], p["curve"]["tr_barrier"])
                evals[(a, "start")] = evals.get((a, "start")) or (s, "start", pair["eval"])
                evals[(b, "end")] = evals.get((b, "end")) or (s, "end", pair["eval"])
                p.update(aligned_and_extra(inputs, pair, s))
                if record.get("ensemble"):
                    p["ensemble"] = record["ensemble"]
                p["equal_budget"] = equal_budget(inputs, group, pair, p, study.get("config") or {})
                inputs.load(f"{pair['eval']}/curve.npz", _curve_arrays)  # drawn by plot_group
            base = inputs.json(f"{pair['baseline_eval']}/eval.json", SEGMENT_EVAL) if "baseline_eval" in pair else None
            if base is not None:  # the extra-trained endpoints, measured like the paths' points
                for seed, which in ((a, "start"), (b, "end")):
                    extras.setdefault(seed, {"te_loss": base["summary"][f"te_loss_{which}"],
                                             "te_mse": base["summary"].get(f"te_mse_{which}"),
                                             "source": f"{pair['baseline_eval']}/eval.json ({which}, t="
                                                       f"{0 if which == 'start' else 1})"})
            pairs.append(p)
        endpoints = []
        for seed, folder in group["endpoints"].items():
            seed = int(seed)
            e = {"seed": seed, "folder": folder}
            rows = inputs.jsonl(f"{folder}/metrics.jsonl", ENDPOINT_LOG_ROW)
            if rows:
                last = rows[-1]
                e["training"] = {"epoch": last.get("epoch"), "train_loss": last.get("train_loss"),
                                 "test_loss": last.get("test_loss"), "test_mse": last.get("test_mse"),
                                 "test_psnr": last.get("test_psnr"), "lr": last.get("lr"),
                                 "last_epoch_gain": _gain(rows), "precision": _precisions(rows)}
            found = evals.get((seed, "start")) or evals.get((seed, "end"))
            if found:
                s, which, where = found
                e["eval"] = {k: s.get(f"{k}_{which}") for k in ENDPOINT_KEYS}
                e["eval_source"] = f"{where}/eval.json ({which} of the path, t={0 if which == 'start' else 1})"
            extra = extras.get(seed)
            if extra and e.get("eval"):
                before, after = e["eval"].get("te_loss"), extra["te_loss"]
                e["extra"] = {"te_loss": after, "te_mse": extra.get("te_mse"), "source": extra["source"],
                              "gain": (before - after) / before if _is_number(before) and before > 0 else None}
            inputs.load(f"{folder}/reconstructions.png", _endpoint_rows)  # drawn by endpoint_grid
            endpoints.append(e)
        g.update(endpoints=endpoints, pairs=pairs, summary=_group_summary(endpoints, pairs))
        g["equal_budget"] = equal_budget_summary(pairs, (out["config"] or {}).get("curve_epochs"))
        g["convergence"] = convergence(endpoints, any("baseline_eval" in pair for pair in group["pairs"]),
                                       (out["config"] or {}).get("curve_epochs"))
        if "plane" in group:
            rel = f"{group['plane']['folder']}/plane.json"
            record = inputs.json(rel, PLANE)
            g["plane"] = {**group["plane"], "available": record is not None, "status": inputs.status(rel),
                          **({"summary": record["summary"], "grid": record.get("grid"),
                              "seconds": record.get("seconds")} if record is not None else {})}
        g["caveat"] = caveat(loss, g)
    out["ran"] = what_ran(out["groups"])
    out["damaged"] = inputs.damaged
    return out


PATHS = (("segment", "straight segment"), ("aligned_segment", "aligned segment"), ("curve", "curve"),
         ("aligned_curve", "aligned curve"))


def aligned_and_extra(inputs: Inputs, pair: dict, naive: dict) -> dict:
    """A pair's four paths side by side (when the study aligned B): each one's test barrier, the share of the
    naive segment's barrier it removes, its best point's test loss against the better endpoint and, when the
    endpoints were trained on as long as a curve, against the better of those."""
    paths = {"segment": {"barrier": naive.get("segment_te_barrier"), "best": naive.get("segment_te_loss_min")},
             "curve": {"barrier": naive.get("te_barrier"), "best": naive.get("te_loss_min")}}
    out = {"paths": paths, "aligned_eval": pair.get("aligned_eval")}
    record = inputs.json(f"{pair['aligned_eval']}/eval.json", CURVE_EVAL) if "aligned_eval" in pair else None
    if record is not None:
        a = record["summary"]
        paths["aligned_segment"] = {"barrier": a.get("segment_te_barrier"), "best": a.get("segment_te_loss_min")}
        paths["aligned_curve"] = {"barrier": a.get("te_barrier"), "best": a.get("te_loss_min")}
        out["aligned_curve"] = {k: a.get(k) for k in PATH_KEYS}
        out["aligned_segment"] = {k: a.get("segment_" + k) for k in PATH_KEYS}
        inputs.load(f"{pair['aligned_eval']}/curve.npz", _curve_arrays)  # drawn by plot_group
        stage = inputs.json(f"{pair['aligned_endpoint']}/study_stage.json", STAGE) \
            if "aligned_endpoint" in pair else None
        out["align_seconds"] = ((stage or {}).get("result") or {}).get("seconds")
    better = min(naive["te_loss_start"], naive["te_loss_end"])
    extra = inputs.json(f"{pair['baseline_eval']}/eval.json", SEGMENT_EVAL) if "baseline_eval" in pair else None
    extra_best = min(extra["summary"]["te_loss_start"], extra["summary"]["te_loss_end"]) if extra is not None else None
    out.update(better_endpoint_te_loss=better, extra_endpoint_te_loss=extra_best)
    if extra is not None:  # the better extra-trained endpoint under every metric, as for the ensembles
        es = extra["summary"]
        out["extra_endpoint"] = {"mse": _better(min, es.get("te_mse_start"), es.get("te_mse_end")),
                                 "psnr": max(es["te_psnr_start"], es["te_psnr_end"]),
                                 "ssim": _better(max, es.get("te_ssim_start"), es.get("te_ssim_end"))}
    naive_barrier = paths["segment"]["barrier"]
    for path in paths.values():
        b, best = path["barrier"], path["best"]
        path["removed"] = _removed(naive_barrier, b)
        path["best_vs_endpoint"] = (best - better) / better if best is not None and better else None
        path["best_vs_extra"] = (best - extra_best) / extra_best if best is not None and extra_best else None
    return out


# The equal-budget ensembles of a pair, in the table's order: (key, label, training beyond the endpoints in units of
# --curve-epochs E). (a) one curve is E epochs of training of its bend; (c) pooled is both endpoints' FGE runs, E
# epochs each; (d) is both extra-trained endpoints; (e) is one of them (the better, chosen after training both).
EQUAL_BUDGET_ROWS = (
    ("curve_ensemble", "(a) curve ensemble: output average of {k} points of the curve", 1),
    ("endpoint_average", "(b) the two endpoints averaged", 0),
    ("fge_pooled", "(c) FGE: {n} from each endpoint's run, pooled", 2),
    ("fge_start", "(c) FGE from seed {a} alone ({n})", 1),
    ("fge_end", "(c) FGE from seed {b} alone ({n})", 1),
    ("extra_average", "(d) the two extra-trained endpoints averaged", 2),
    ("extra_best", "(e) the better extra-trained endpoint (per metric)", 1),
)
EQUAL_BUDGET_METRICS = ("mse", "psnr", "ssim")


def equal_budget(inputs: Inputs, group: dict, pair: dict, p: dict, config: dict) -> dict:
    """A pair's equal-budget ensembles on the held-out images, {"rows": {key: {mse, psnr, ssim, budget_epochs,
    members, source}}, "fge": {seed: what its FGE run recorded}}: (a) and (b) from the curve's eval.json
    ("ensemble"), (c) and (d) from the pair's ensembles.json, (e) from the baseline's eval.json (the better
    extra-trained endpoint, per metric). Each only when measured."""
    epochs = config.get("curve_epochs")
    budget = dict((k, f) for k, _, f in EQUAL_BUDGET_ROWS)
    rows, runs = {}, {}

    def add(key, values, members, source):
        metrics = {m: values.get(m) for m in EQUAL_BUDGET_METRICS}
        if _is_number(metrics["mse"]) and _is_number(metrics["psnr"]):
            rows[key] = {**metrics, "members": members, "source": source,
                         "budget_epochs": budget[key] * epochs if _is_number(epochs) else None}

    ens = p.get("ensemble")
    if ens:
        for key, entry in (("curve_ensemble", "path_average"), ("endpoint_average", "endpoint_average")):
            add(key, ens["entries"].get(entry) or {}, ens.get("k") if entry == "path_average" else 2,
                f"{pair['eval']}/eval.json: ensemble.entries.{entry}")
    rel = f"{pair['ensembles']}/ensembles.json" if "ensembles" in pair else None
    record = inputs.json(rel, ENSEMBLES) if rel else None
    if record is not None:
        for key in ("fge_pooled", "fge_start", "fge_end", "extra_average"):
            if key in record["averages"]:
                values = record["averages"][key]
                add(key, values, len(values["members"]), f"{rel}: averages.{key}")
    if p.get("extra_endpoint"):
        add("extra_best", p["extra_endpoint"], 1, f"{pair['baseline_eval']}/eval.json: the better of t=0 and t=1")
    for seed in pair["seeds"]:  # the FGE runs' own record: how long they trained, how many snapshots, the cycle
        folder = group.get("fge", {}).get(str(seed))
        fge = inputs.json(f"{folder}/fge.json", FGE) if folder else None
        if fge is not None:
            runs[str(seed)] = {"budget_epochs": fge["budget_epochs"], "snapshots": len(fge["snapshots"]),
                               "cycle": (fge.get("schedule") or {}).get("cycle")}
    return {"rows": rows, "fge": runs}


def equal_budget_summary(pairs: list, epochs) -> dict:
    """Over the pairs that measured them: per row, each metric's mean with its 95% t-interval; the winner by held-out
    MSE among the rows every such pair has, the runner-up, and per pair the winner's MSE relative to the runner-up's
    ((winner − runner-up) / runner-up, so negative means the winner is better) as a mean with its interval; the same
    for the best row at one curve's budget against the curve ensemble (or, when that is the best, the next)."""
    done = [p["equal_budget"]["rows"] for p in pairs if p.get("available") and p.get("equal_budget", {}).get("rows")]
    keys = [k for k, _, _ in EQUAL_BUDGET_ROWS if done and all(k in d for d in done)]
    out = {"pairs": len(done), "curve_epochs": epochs, "rows": {}}
    for key, _, _ in EQUAL_BUDGET_ROWS:
        have = [d[key] for d in done if key in d]
        if have:
            out["rows"][key] = {"pairs": len(have), "budget_epochs": have[0]["budget_epochs"], **{
                m: mean_interval([h[m] for h in have]) for m in EQUAL_BUDGET_METRICS}}
    if len(keys) < 2:
        return out

    def mean_mse(k):
        return float(np.mean([d[k]["mse"] for d in done]))

    def versus(k, other):
        return mean_interval([(d[k]["mse"] - d[other]["mse"]) / d[other]["mse"] for d in done if d[other]["mse"] > 0])

    ranked = sorted(keys, key=mean_mse)
    out.update(ranked=ranked, winner=ranked[0], runner_up=ranked[1], winner_vs_runner_up=versus(*ranked[:2]))
    psnr = sorted(keys, key=lambda k: -float(np.mean([d[k]["psnr"] for d in done])))
    out["winner_by_psnr"] = psnr[0]
    one = [k for k in ranked if dict((r[0], r[2]) for r in EQUAL_BUDGET_ROWS)[k] == 1]
    if one and "curve_ensemble" in keys:
        best = one[0]
        other = "curve_ensemble" if best != "curve_ensemble" else (one[1] if len(one) > 1 else None)
        if other is not None:
            out.update(best_at_one_curve=best, one_curve_other=other, one_curve_vs_other=versus(best, other))
    return out


def convergence(endpoints: list, extra_training: bool, epochs) -> dict:
    """Whether the endpoints had converged, judged from what the study measures: each endpoint's held-out loss gain
    when trained on for as long as a curve ((loss_endpoint − loss_extra) / loss_endpoint, both measured by
    eval-curve with BatchNorm recomputed); not converged when any gain exceeds CONVERGED_GAIN. Without extra training
    it is not measured (the last-epoch gain is no measure of it: see CONVERGED_GAIN)."""
    gains = {str(e["seed"]): e["extra"]["gain"] for e in endpoints
             if (e.get("extra") or {}).get("gain") is not None}
    out = {"threshold": CONVERGED_GAIN, "extra_epochs": epochs, "endpoints": len(endpoints), "gains": gains,
           "extra_training": extra_training, "measured": bool(gains),
           "metric": "held-out loss (the MSE in the mse group), extra-trained endpoint vs its starting endpoint"}
    if gains:
        values = list(gains.values())
        above = [seed for seed, g in gains.items() if g > CONVERGED_GAIN]
        out.update(min=min(values), max=max(values), above=above, converged=not above)
    else:
        out["converged"] = None
    return out


def _better(pick, a, b):
    """pick(a, b), None when either was not measured."""
    return None if a is None or b is None else pick(a, b)


def _precisions(rows: list[dict]) -> list[str]:
    """The precisions a training log's epochs ran in (a resumed run may have changed it)."""
    return sorted({str(r["precision"]) for r in rows if r.get("precision")})


def _group_summary(endpoints: list, pairs: list) -> dict:
    done = [p for p in pairs if p["available"]]
    ev = [e["eval"] for e in endpoints if "eval" in e]
    s = {"pairs": len(pairs), "pairs_evaluated": len(done),
         "pairs_damaged": sum(p["eval_status"] == "damaged" for p in pairs)}
    if not done or not ev:
        return s
    # the data the endpoints were trained and measured on, and how well they fit it (for the caveat)
    counts = [(p["protocol"]["n_train"], p["protocol"]["n_test"]) for p in done]
    n_train, n_test = (sorted({c[i] for c in counts if isinstance(c[i], int)}) for i in (0, 1))
    ratios = [e["te_mse"] / e["tr_mse"] for e in ev if e.get("te_mse") is not None and e.get("tr_mse")]
    s.update(train_set_images=n_train[0] if len(n_train) == 1 else None,
             test_set_images=n_test[0] if len(n_test) == 1 else None,
             endpoint_te_psnr_max=float(max(e["te_psnr"] for e in ev)),
             endpoint_mse_test_over_train=float(np.mean(ratios)) if ratios else None)
    seg = np.array([p["segment"]["te_barrier"] for p in done], dtype=float)
    cur = np.array([p["curve"]["te_barrier"] for p in done], dtype=float)
    removed = [p["barrier_removed"] for p in done if p["barrier_removed"] is not None]
    s.update(
        endpoint_te_loss_mean=float(np.mean([e["te_loss"] for e in ev])),
        segment_te_barrier_mean=float(seg.mean()), segment_te_barrier_min=float(seg.min()),
        segment_te_barrier_max=float(seg.max()),
        curve_te_barrier_mean=float(cur.mean()), curve_te_barrier_min=float(cur.min()),
        curve_te_barrier_max=float(cur.max()),
        barrier_removed_mean=float(np.mean(removed)) if removed else None,
        barrier_removed_min=float(np.min(removed)) if removed else None,
        worst_psnr_curves=float(min(p["curve"]["te_psnr_min"] for p in done)),
        worst_psnr_segments=float(min(p["segment"]["te_psnr_min"] for p in done)),
        worst_psnr_endpoints=float(min(e["te_psnr"] for e in ev)),
    )
    s["segment_barrier_relative"] = s["segment_te_barrier_mean"] / s["endpoint_te_loss_mean"] \
        if s["endpoint_te_loss_mean"] > 0 else None
    # over pairs, per path: the barrier, the share of the naive barrier removed, the best point against the
    # better endpoint and against the better extra-trained endpoint; each as mean, std, range and 95% t-interval
    s["paths"] = {name: {key: mean_interval([p["paths"][name][key] for p in done if name in p.get("paths", {})])
                         for key in ("barrier", "removed", "best_vs_endpoint", "best_vs_extra")}
                  for name, _ in PATHS if any(name in p.get("paths", {}) for p in done)}
    # per pair, whether the bootstrap interval over held-out images puts each path's barrier above 0
    s["bootstrap"] = {}
    for name, _ in PATHS:
        los = [p[name]["te_barrier_lo"] for p in done if (p.get(name) or {}).get("te_barrier_lo") is not None]
        if los:
            s["bootstrap"][name] = {"pairs": len(los), "above_zero": sum(lo > 0 for lo in los)}
    return s


# ----------------------------------------------------------------------------------------------------------
# formatting


def fnum(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def fdb(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fpct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fseconds(x) -> str:
    if not _is_number(x) or not np.isfinite(x):
        return "not recorded"
    if x < 60:
        return f"{x:.1f} s"
    s = int(round(x))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def summary_sentences(loss: str, g: dict) -> list[str]:
    """The group's conclusions, each chosen by the numbers it states."""
    name = LOSS_NAMES.get(loss, loss)
    if g["status"] != "run":
        reason = g.get("reason", "").split(". ")[0].rstrip(".")
        return [f"The {loss} group was skipped: {reason}. The {loss} section of the report gives the full reason "
                "and the remedy (e.g. --vgg-weights PATH); the other groups are complete."]
    s = g["summary"]
    if "segment_te_barrier_mean" not in s:
        damaged = f"; {s['pairs_damaged']} with a damaged eval.json" if s.get("pairs_damaged") else ""
        return [f"The {loss} group has no finished evaluation yet ({s['pairs_evaluated']} of {s['pairs']} pairs"
                f"{damaged})."]
    n = s["pairs_evaluated"]
    rel = s["segment_barrier_relative"]
    out = []
    seg_text = (f"{name}: on the straight segments between the endpoints the held-out loss rises above the chord by "
                f"{fnum(s['segment_te_barrier_mean'])} on average over {n} pair{'s' if n != 1 else ''} "
                f"(range {fnum(s['segment_te_barrier_min'])} to {fnum(s['segment_te_barrier_max'])}; "
                f"{fpct(rel)} of the endpoints' mean held-out loss {fnum(s['endpoint_te_loss_mean'])}); "
                f"along the curves the barrier is {fnum(s['curve_te_barrier_mean'])} on average "
                f"(range {fnum(s['curve_te_barrier_min'])} to {fnum(s['curve_te_barrier_max'])}).")
    out.append(seg_text)
    mean, worst = s["barrier_removed_mean"], s["barrier_removed_min"]
    if rel is None or rel < NO_BARRIER:
        out.append(f"The segments show no clear barrier (below {fpct(NO_BARRIER)} of the endpoints' loss), so "
                   "there is little for the curves to remove; this pair of minima is already nearly linearly "
                   "connected at this scale.")
    elif mean is None:
        out.append("The fraction of the barrier removed could not be computed.")
    elif worst >= MOST:
        out.append(f"The curves remove most of the barrier for every pair: {fpct(mean)} on average, at least "
                   f"{fpct(worst)}. The endpoints are connected by paths of nearly constant low loss.")
    elif mean >= MOST:
        out.append(f"On average the curves remove most of the barrier ({fpct(mean)}), but not for every pair "
                   f"(worst pair {fpct(worst)}).")
    elif mean >= SOME:
        out.append(f"The curves reduce the barrier by {fpct(mean)} on average (worst pair {fpct(worst)}), but do not "
                   "remove most of it.")
    else:
        out.append(f"The curves do not remove the barrier: {fpct(mean)} of it on average (worst pair {fpct(worst)}).")
    curve_removed = s.get("paths", {}).get("curve", {}).get("removed")
    if mean is not None and curve_removed and curve_removed["n"] == n:
        out[-1] += f" Over pairs, the share removed by the curves is {fpct(curve_removed['mean'])}" \
                   f"{_sure(curve_removed)}."
    out += barrier_interval_sentences(s, n)
    a, b, c = s["worst_psnr_curves"], s["worst_psnr_endpoints"], s["worst_psnr_segments"]
    psnr = (f"The worst held-out PSNR along the curves is {fdb(a)} dB, against {fdb(b)} dB for the worst endpoint "
            f"and {fdb(c)} dB along the segments")
    if a >= b - PSNR_TOLERANCE:
        psnr += f": every point of the curves reconstructs about as well as the endpoints (within {PSNR_TOLERANCE} dB)."
    else:
        psnr += f": some points of the curves reconstruct worse than the endpoints, by up to {fdb(b - a)} dB."
    out.append(psnr)
    out += alignment_sentences(s.get("paths", {}))
    out += equal_budget_sentences(g.get("equal_budget") or {})
    out.append(convergence_sentence(loss, g.get("convergence") or {}))
    if g.get("warning"):
        out.append(g["warning"])
    return out


EQUAL_BUDGET_SHORT = {"curve_ensemble": "(a) the curve ensemble", "endpoint_average": "(b) the two endpoints averaged",
                      "fge_pooled": "(c) FGE pooled from both endpoints' runs",
                      "fge_start": "(c) FGE from the pair's first endpoint alone",
                      "fge_end": "(c) FGE from the pair's second endpoint alone",
                      "extra_average": "(d) the two extra-trained endpoints averaged",
                      "extra_best": "(e) the better extra-trained endpoint"}


def _budget(rows: dict, key: str) -> str:
    epochs = rows.get(key, {}).get("budget_epochs")
    return "n/a" if epochs is None else f"{epochs:g}"


def equal_budget_sentences(eb: dict) -> list[str]:
    """Which ensemble of the equal-budget table reconstructs the held-out images best (by MSE), against the
    runner-up, with the 95% interval over pairs; and the best at one curve's budget against the curve ensemble."""
    if not eb.get("winner"):
        return []
    rows, n = eb["rows"], eb["pairs"]
    w, r = eb["winner"], eb["runner_up"]
    rel = eb["winner_vs_runner_up"]
    text = (f"Ensembles at equal training budget (held-out MSE over {n} pair{'s' if n != 1 else ''}; training beyond "
            f"the endpoints in epochs): {EQUAL_BUDGET_SHORT[w]} ({_budget(rows, w)} epochs) reconstructs best, MSE "
            f"{fnum(rows[w]['mse']['mean'])} on average; per pair its MSE is {fsigned(rel['mean'])} relative to the "
            f"runner-up, {EQUAL_BUDGET_SHORT[r]} ({_budget(rows, r)} epochs){_sure(rel)}.")
    if eb.get("winner_by_psnr") and eb["winner_by_psnr"] != w:
        text += f" By held-out PSNR the best is {EQUAL_BUDGET_SHORT[eb['winner_by_psnr']]}."
    out = [text]
    best, other = eb.get("best_at_one_curve"), eb.get("one_curve_other")
    if best and (best, other) != (w, r):
        one = eb["one_curve_vs_other"]
        out.append(f"At one curve's budget ({_budget(rows, best)} epochs) the best is {EQUAL_BUDGET_SHORT[best]}: per "
                   f"pair its MSE is {fsigned(one['mean'])} relative to {EQUAL_BUDGET_SHORT[other]}'s{_sure(one)}.")
    return out


def convergence_sentence(loss: str, c: dict) -> str:
    """Whether the endpoints had converged, from the extra-trained endpoints' held-out gain (CONVERGED_GAIN)."""
    what = "MSE" if loss == "mse" else "loss"
    if not c.get("extra_training"):
        return (f"Convergence of the {loss} endpoints was not measured: the study ran without extra training "
                "(--no-extra-training). The last-epoch gain in the endpoint table is no measure of it: under the "
                "paper's schedule the lr ends at 1% of its start, so that gain is near 0 by construction.")
    if not c.get("measured"):
        return (f"Convergence of the {loss} endpoints is not measured yet: their extra-trained copies have no "
                "finished evaluation (baselines/).")
    gains = c["gains"]
    span = fpct(c["min"]) if fpct(c["min"]) == fpct(c["max"]) else f"{fpct(c['min'])} to {fpct(c['max'])}"
    of = "" if len(gains) == c["endpoints"] else f" ({len(gains)} of {c['endpoints']} endpoints measured)"
    trained = (f"trained on for {c.get('extra_epochs')} more epochs (as long as a curve, aecurves train --init), "
               f"they gained {span} in held-out {what} (its relative fall){of}")
    if c["converged"]:
        return (f"The {loss} endpoints had converged by the study's measure: {trained}, within the "
                f"{fpct(c['threshold'])} threshold for every endpoint.")
    return (f"The {loss} endpoints had not converged: {trained}; {len(c['above'])} of {len(gains)} gained more than "
            f"the {fpct(c['threshold'])} threshold (seed{'s' if len(c['above']) != 1 else ''} "
            f"{', '.join(c['above'])}). The barrier and ensemble comparisons in this report are comparisons with "
            "unconverged networks.")


def _sure(r: dict) -> str:
    """Whether a mean's 95% interval settles its sign: the caution to add when it does not."""
    if r["lo"] is None:
        return " (one pair: no interval)"
    if r["lo"] <= 0 <= r["hi"]:
        return (f"; its 95% interval [{fpct(r['lo'])}, {fpct(r['hi'])}] includes 0, too wide to conclude from "
                f"{r['n']} pairs")
    return f" (95% interval {fpct(r['lo'])} to {fpct(r['hi'])})"


def barrier_interval_sentences(s: dict, n: int) -> list[str]:
    """Each path kind's test barrier over pairs (mean, 95% t-interval), the kinds whose interval is too wide to tell a
    barrier from none, and per pair how often the bootstrap interval over held-out images lies above 0."""
    out, parts, wide = [], [], []
    for name, label in PATHS:
        r = s.get("paths", {}).get(name, {}).get("barrier")
        if not r or r["lo"] is None:
            continue
        parts.append(f"{label} {fnum(r['mean'])} [{fnum(r['lo'])}, {fnum(r['hi'])}]")
        if r["lo"] <= 0 <= r["hi"]:
            wide.append(label)
    if parts:
        text = "Test barrier over pairs, mean [95% t-interval]: " + "; ".join(parts) + "."
        if wide:
            kinds = " and ".join(f"{w}s" for w in wide)
            text += (f" For the {kinds} the interval includes 0: too wide to tell from {n} pairs whether there is a "
                     "barrier at all.")
        out.append(text)
    boot = [(label, b) for name, label in PATHS if (b := s.get("bootstrap", {}).get(name))]
    if boot:
        text = ("Per pair, the 95% bootstrap interval over held-out images puts the barrier above 0 for "
                + ", ".join(f"{b['above_zero']} of {b['pairs']} {label}s" for label, b in boot))
        if any(b["above_zero"] < b["pairs"] for _, b in boot):
            text += "; for the others it includes 0, so this test set cannot tell their barrier from none"
        out.append(text + ".")
    return out


def alignment_sentences(paths: dict) -> list[str]:
    """What aligning B to A does to the straight segment and the curve, and how the paths' best points compare with
    endpoints given as much extra training, each with the interval over pairs."""
    out = []
    if "aligned_segment" in paths and paths["aligned_segment"]["removed"]["mean"] is not None:
        seg, cur = paths["aligned_segment"]["removed"], paths["aligned_curve"]["removed"]
        out.append(f"Aligning B to A (permuting its hidden units, mapping its latent code) removes "
                   f"{fpct(seg['mean'])} of the straight segment's barrier on average{_sure(seg)}; the curve to the "
                   f"aligned B removes {fpct(cur['mean'])}{_sure(cur)}.")
    vs_extra = {k: v["best_vs_extra"] for k, v in paths.items() if v["best_vs_extra"]["mean"] is not None}
    if "curve" in vs_extra:
        best = min(vs_extra, key=lambda k: vs_extra[k]["mean"])
        r = vs_extra[best]
        where = "below" if r["mean"] < 0 else "above"
        out.append(f"The best point along the {best.replace('_', ' ')} is {fpct(abs(r['mean']))} {where} the better "
                   f"endpoint trained on for as long as a curve, on average{_sure(r)}"
                   + ("." if r["mean"] < 0 else ": the paths' low points come from the extra training, not from "
                                                 "the path."))
    return out


def caveat(loss: str, g: dict) -> str | None:
    """The data's size and the endpoints' quality, stated plainly when the endpoints were trained on few images
    (under SMALL_TRAIN_SET) or reconstruct poorly (worst held-out PSNR under LOW_PSNR_DB); else None."""
    s = g.get("summary", {})
    n, worst = s.get("train_set_images"), s.get("worst_psnr_endpoints")
    if g.get("status") != "run" or n is None or worst is None:
        return None
    small, weak = n < SMALL_TRAIN_SET, worst < LOW_PSNR_DB
    if not (small or weak):
        return None
    best = s["endpoint_te_psnr_max"]
    psnr = fdb(worst) if fdb(worst) == fdb(best) else f"{fdb(worst)} to {fdb(best)}"
    held_out = f"{s['test_set_images']} held out" if s.get("test_set_images") is not None else "held-out count n/a"
    text = f"These {loss} endpoints were trained on {n} images ({held_out}); their held-out PSNR is {psnr} dB"
    ratio = s.get("endpoint_mse_test_over_train")
    if ratio is not None and ratio >= 1:
        text += f" and their train MSE is {ratio:.1f}× below the test MSE"
    elif ratio is not None:
        text += f" and their test MSE is {1 / ratio:.1f}× below the train MSE"
    what = {(True, True): "weak autoencoders on a tiny dataset", (True, False): "autoencoders on a tiny dataset",
            (False, True): "weak autoencoders"}[small, weak]
    why = [f"under {SMALL_TRAIN_SET} training images"] * small + [f"held-out PSNR under {LOW_PSNR_DB:g} dB"] * weak
    scale = "CelebA-scale models" if small else "well-trained models"
    return f"{text}: {what} ({'; '.join(why)}), enough to show the method, not a result about {scale}."


# ----------------------------------------------------------------------------------------------------------
# document: a list of blocks, rendered to markdown and to HTML (so both hold the same content)
#
# Blocks hold plain text, and each renderer escapes all of it: no string from the study's files (a folder name, a
# note, a host, a factory) can become markup. The only markup is the renderers' own (headings, boxes, lists,
# tables, figures) and Code pieces.


class Code(str):
    """A piece of text shown verbatim as code, e.g. a command: <code> in HTML, a code span in Markdown."""


Text = str | tuple  # plain text, or a tuple of plain text and Code pieces


@dataclass
class Heading:
    level: int
    text: Text


@dataclass
class Paragraph:
    text: Text
    cls: str | None = None  # a box: "summary", "warn" or "muted"


@dataclass
class Items:
    items: list[Text]
    cls: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]  # plain text: a code span would not keep a pipe inside its cell
    numeric_from: int = 1  # columns from this one on are right-aligned numbers


@dataclass
class Figure:
    rel: str              # path relative to the study folder
    caption: Text
    pixels: bool = False  # small images: scale without smoothing
    scale: int = 1


class Doc:
    def __init__(self):
        self.blocks = []

    def h(self, level: int, text: Text):
        self.blocks.append(Heading(level, text))

    def p(self, text: Text, cls: str | None = None):
        self.blocks.append(Paragraph(text, cls))

    def ul(self, items: list[Text], cls: str | None = None):
        self.blocks.append(Items(items, cls))

    def table(self, headers: list[str], rows: list[list[str]], numeric_from: int = 1):
        self.blocks.append(Table(headers, rows, numeric_from))

    def img(self, rel: str, caption: Text, pixels: bool = False, scale: int = 1):
        self.blocks.append(Figure(rel, caption, pixels, scale))


def _pieces(text: Text) -> tuple:
    return text if isinstance(text, tuple) else (text,)


# Every character Markdown may read as markup (CommonMark, and GitHub's tables, strikethrough and math), as text.
MD_ESCAPES = str.maketrans({**{c: "\\" + c for c in "\\`*_[]|~$#"}, "&": "&amp;", "<": "&lt;", ">": "&gt;"})


def md_text(text) -> str:
    """Plain text made inert in Markdown: its markup characters escaped, and every run of white space (line breaks
    too) made one space, as a browser shows it, so that the text stays in its line, table row or list item."""
    return re.sub(r"\s+", " ", str(text)).translate(MD_ESCAPES)


def md_code(text) -> str:
    """A Markdown code span showing `text` verbatim: fenced by one backtick more than its longest run of them."""
    text = re.sub(r"\s+", " ", str(text))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # Markdown strips one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def md_inline(text: Text) -> str:
    return "".join(md_code(p) if isinstance(p, Code) else md_text(p) for p in _pieces(text))


def md_block(text: Text) -> str:
    """The text of a paragraph or list item, with a start Markdown would read as a list marker escaped."""
    line = re.sub(r"^(\s?)([-+])", r"\1\\\2", md_inline(text))  # "- x", "+ x": a bullet
    return re.sub(r"^(\s?\d+)([.)])", r"\1\\\2", line)  # "1. x", "1) x": a numbered item


def to_markdown(doc: Doc) -> str:
    lines = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + md_inline(b.text), ""]
        elif isinstance(b, Paragraph):
            lines += [("> " if b.cls else "") + md_block(b.text), ""]
        elif isinstance(b, Items):
            lines += [("> " if b.cls else "") + "- " + md_block(item) for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(md_text(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" if i < b.numeric_from else "---:" for i in range(len(b.headers))) + "|")
            lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Figure):
            caption = md_inline(b.caption).strip()
            lines += [f"![{caption}]({urllib.parse.quote(b.rel)})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def html_inline(text: Text) -> str:
    esc = html.escape
    return "".join(f"<code>{esc(p)}</code>" if isinstance(p, Code) else esc(p) for p in _pieces(text))


def to_html(doc: Doc, study_dir: Path, title: str) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            cls = f" class=\"box {b.cls}\"" if b.cls else ""
            parts.append(f"<p{cls}>{html_inline(b.text)}</p>")
        elif isinstance(b, Items):
            items = "".join(f"<li>{html_inline(i)}</li>" for i in b.items)
            parts.append(f"<div class=\"box {b.cls}\"><ul>{items}</ul></div>" if b.cls else f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(
                f"<td class=\"num\">{esc(str(c))}</td>" if i >= b.numeric_from else f"<td>{esc(str(c))}</td>"
                for i, c in enumerate(row)) + "</tr>" for row in b.rows)
            # a wide table scrolls inside its box instead of widening the page on a narrow screen
            parts.append(f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                         "</div>")
        elif isinstance(b, Figure):
            path = study_dir / b.rel
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                src = f"data:image/png;base64,{data}"
            else:
                src = esc(b.rel)
            cls = " class=\"pixels\"" if b.pixels else ""
            size = ""
            if b.scale > 1 and path.is_file():
                from PIL import Image

                with Image.open(path) as im:
                    size = f" width=\"{im.width * b.scale}\""
            alt = esc("".join(_pieces(b.caption)))
            parts.append(f"<figure{cls}><img src=\"{src}\"{size} alt=\"{alt}\"><figcaption>"
                         f"{html_inline(b.caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# figures


def _copy(study_dir: Path, rel_src: str, name: str) -> str | None:
    src = inside(study_dir, rel_src)
    if src is None or not src.is_file():
        return None
    rel = f"{FILES_DIR}/{name}"
    with atomic_path(study_dir / rel) as tmp:
        shutil.copyfile(src, tmp)
    return rel


def _pairs_text(pairs: list) -> str:
    return ", ".join(f"{a}-{b}" for a, b in (p["seeds"] for p in pairs))


def plot_group(study_dir: Path, loss: str, g: dict, inputs: Inputs) -> str | None:
    """Loss along t for every curve (solid) and segment (dashed, same colour): train and test panels."""
    from aecurves import plots

    series, plotted, aligned = [], [], False
    for i, p in enumerate(pr for pr in g["pairs"] if pr["available"]):
        results = inputs.load(f"{p['eval']}/curve.npz", _curve_arrays)
        if results is None:
            continue
        a, b = p["seeds"]
        color = f"C{i % 10}"
        kinds = [(results, "", "curve", "-"), (results, "segment_", "segment", "--")]
        to_aligned = inputs.load(f"{p['aligned_eval']}/curve.npz", _curve_arrays) if "aligned_curve" in p else None
        if to_aligned is not None:
            kinds += [(to_aligned, "", "aligned curve", "-."), (to_aligned, "segment_", "aligned segment", ":")]
            aligned = True
        for arrays, prefix, what, style in kinds:
            series.append(plots.series_from_results(arrays, f"{what}, seeds {a}-{b}", prefix=prefix,
                                                    linestyle=style, color=color))
        plotted.append(p)
    if not series:
        return None
    rel = f"{FILES_DIR}/{loss}_loss_along_paths.png"
    label = LOSS_NAMES.get(loss, loss)
    styles = "every path" if aligned else "the curves (solid) and the segments (dashed)"
    plots.plot_loss_along_paths(series, study_dir / rel, ylabel=label,
                                title=f"{loss} group, seeds {_pairs_text(plotted)}: {label} along {styles}")
    return rel


def _endpoint_rows(path: Path) -> list | None:
    """The two rows of an endpoint's reconstructions.png (train.py: torchvision's make_grid with padding 2, the
    held-out images over their reconstructions) as uint8 tensors [N, 3, s, s]; None for any other layout."""
    import torch
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width, _ = pixels.shape
    pad = 2
    size = (height - pad) // 2 - pad
    if size < 1:
        return None
    n, extra = divmod(width - pad, size + pad)
    if n < 1 or extra or 2 * (size + pad) + pad != height:
        return None
    rows = []
    for r in range(2):
        top = pad + r * (size + pad)
        cells = [pixels[top: top + size, pad + j * (size + pad): pad + j * (size + pad) + size] for j in range(n)]
        rows.append(torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).contiguous())
    return rows


def endpoint_grid(study_dir: Path, loss: str, e: dict, inputs: Inputs) -> tuple[str, bool] | None:
    """(figure, labelled): the endpoint's reconstructions.png redrawn with row labels and cells enlarged like the
    strips along the paths; a copy as it is when its layout is not train.py's; None when it is missing or damaged."""
    from aecurves import plots

    src = f"{e['folder']}/reconstructions.png"
    name = f"{loss}_seed{e['seed']}_reconstructions.png"
    rows = inputs.load(src, _endpoint_rows)
    if inputs.status(src) != "found":
        return None
    if rows is None:
        return _copy(study_dir, src, name), False
    rel = f"{FILES_DIR}/{name}"
    plots.save_labelled_rows([("original", rows[0]), ("reconstruction", rows[1])], study_dir / rel,
                             title=f"{loss} seed {e['seed']}: held-out images and their reconstructions")
    return rel, True


# ----------------------------------------------------------------------------------------------------------
# the report


def _count(used, available, what: str) -> str | None:
    """'86 (all training images)', '500 of 2000 training images', or None when not recorded."""
    if used is None:
        return None
    if available is None:
        return str(used)
    return f"{used} (all {what})" if used >= available else f"{used} of {available} {what}"


def what_ran(groups: dict) -> dict:
    """What the stages really used, read from their own files (eval.json, metrics.jsonl): for each setting the
    distinct values over all stages, empty when none has run yet."""
    pairs = [p for g in groups.values() for p in g.get("pairs", [])]
    protocols = [p["protocol"] for p in pairs if p.get("available")]
    precisions = [x for g in groups.values() for e in g.get("endpoints", [])
                  for x in e.get("training", {}).get("precision", [])]
    precisions += [x for p in pairs for x in p.get("curve_precision", [])]

    def bn(p):
        if p.get("bn_recomputed") is False:
            return "none: the running statistics from training are kept"
        return _count(p.get("bn_images"), p.get("n_train"), "training images")

    def distinct(values) -> list:
        return sorted({v for v in values if v is not None}, key=str)

    return {"device": distinct(p.get("device") for p in protocols),
            "training_precision": distinct(precisions),
            "data": distinct(f"{p['n_train']} training / {p['n_test']} held-out images" for p in protocols
                             if p.get("n_train") is not None),
            "bn_images": distinct(bn(p) for p in protocols),
            "train_metric_images": distinct(_count(p.get("train_images"), p.get("n_train"), "training images")
                                            for p in protocols),
            "test_metric_images": distinct(_count(p.get("test_images"), p.get("n_test"), "held-out images")
                                           for p in protocols)}


def _ran(values: list, requested=None) -> str:
    """What ran, with the request beside it where it differs: 'cpu (requested auto)'; 'not run yet' when none ran."""
    text = ", ".join(map(str, values)) or "not run yet"
    if requested is None or (len(values) == 1 and str(values[0]).split(" ")[0] == str(requested)):
        return text
    # '86 (all training images)' and request 8192 -> '86 (all training images; requested 8192)'
    return f"{text[:-1]}; requested {requested})" if text.endswith(")") else f"{text} (requested {requested})"


def _config_rows(cfg: dict, ran: dict) -> list[list[str]]:
    """The configuration as it ran: study.json's settings, and for those the study resolves at run time (device,
    precision, subset sizes capped by the data) the values the stages recorded, beside the request."""
    keys = [("preset", "preset"), ("dataset", "dataset"), ("data_dir", "data folder"), ("image_size", "image size"),
            ("limit", "image limit"), ("losses", "losses"), ("seeds", "seeds"), ("model", "model factory"),
            ("model_kwargs", "model kwargs"), ("latent_dim", "bottleneck"), ("width", "width"),
            ("epochs", "endpoint epochs"), ("lr", "endpoint lr (Adam)"), ("lr_schedule", "endpoint lr schedule"),
            ("batch_size", "batch size"), ("curve", "curve"), ("num_bends", "bends (ends fixed)"),
            ("curve_epochs", "curve epochs"), ("curve_lr", "curve lr (Adam)"),
            ("curve_lr_schedule", "curve lr schedule"), ("wd", "curve wd"), ("fge_cycle", "FGE cycle (epochs)"),
            ("num_points", "points per path"),
            ("vgg_weights", "VGG weights")]
    model = cfg.get("model") or BUILTIN_MODEL  # a study.json from before --model: the built-in was the only one
    shown = {**cfg, "model": f"{model} (built-in)" if model == BUILTIN_MODEL else model,
             "model_kwargs": cfg.get("model_kwargs") or "none"}
    if model != BUILTIN_MODEL:  # a custom factory takes its own settings, in its kwargs
        shown["width"] = "does not apply (a setting of the built-in model)"
    rows = [[label, _setting_text(shown[k])] for k, label in keys
            if k in shown and not (shown[k] is None and k in ("data_dir", "limit"))
            and not (k == "fge_cycle" and not cfg.get("fge"))]
    rows += [["images (training / held out)", _ran(ran["data"])],
             ["BN statistics per point, from", _ran(ran["bn_images"], cfg.get("bn_images"))],
             ["train metrics per point, from", _ran(ran["train_metric_images"], cfg.get("train_images"))],
             ["held-out metrics per point, from", _ran(ran["test_metric_images"])],
             ["device", _ran(ran["device"], cfg.get("device"))],
             ["training precision", _ran(ran["training_precision"], cfg.get("precision"))]]
    return rows


def _setting_text(value) -> str:
    """A setting of study.json as text: a list's items joined, an object as JSON."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


PROVENANCE_KEYS = (("aecurves", "aecurves version"), ("git_commit", "git commit"), ("torch", "torch"),
                   ("python", "Python"), ("host", "host"), ("device", "device"), ("started", "started"),
                   ("finished", "finished"))


def _when(value) -> str:
    return str(value).replace("T", " ") if value else "not recorded"


def provenance_rows(prov: dict) -> list[list[str]]:
    """study.json's provenance as table rows; a missing entry reads "not recorded"."""
    rows = []
    for k, label in PROVENANCE_KEYS:
        value = prov.get(k)
        if k in ("started", "finished"):
            rows.append([label, _when(value)])
        else:
            rows.append([label, "not recorded" if value is None else str(value)])
    rows.append(["wall time, whole study", fseconds(prov.get("wall_seconds"))])
    known = {k for k, _ in PROVENANCE_KEYS} | {"wall_seconds", "stage_seconds"}
    rows += [[k, str(v)] for k, v in prov.items() if k not in known]  # whatever a later aecurves adds
    return rows


def provenance_line(prov: dict | None) -> Text:
    if not prov:
        return ("Provenance (versions, host, dates, wall times): not recorded (study.json predates it or was not "
                "written by ", Code("aecurves study"), ").")
    commit = prov.get("git_commit")
    return (f"Made with aecurves {prov.get('aecurves', '?')}"
            f"{f' (commit {str(commit)[:12]})' if commit else ''}, torch {prov.get('torch', '?')}, Python "
            f"{prov.get('python', '?')} on {prov.get('host', '?')} ({prov.get('device', '?')}); started "
            f"{_when(prov.get('started'))}; wall time {fseconds(prov.get('wall_seconds'))}. Details under "
            "Provenance.")


def training_and_protocol(cfg: dict, data: dict) -> str:
    """What schedule trained the networks, and how far the evaluation protocol can be from --full."""
    text = (f"Endpoints: Adam at lr {cfg.get('lr')} with the {cfg.get('lr_schedule', 'constant')} schedule for "
            f"{cfg.get('epochs')} epochs; curves: Adam at lr {cfg.get('curve_lr')} with the "
            f"{cfg.get('curve_lr_schedule', 'constant')} schedule and {cfg.get('t_sampling', 'uniform')} t for "
            f"{cfg.get('curve_epochs')} epochs. ")
    if "paper" in (cfg.get("lr_schedule"), cfg.get("curve_lr_schedule")):
        text += ("The paper's schedule (Garipov et al., 2018) keeps the lr for the first half of training, lowers it "
                 "linearly to 1% of it at 90%, and keeps 1% to the end. ")
    protocols = [p["protocol"] for g in data["groups"].values() for p in g.get("pairs", [])
                 if p.get("available") and all((p.get("protocol") or {}).get(k)
                                               for k in ("bn_images", "train_images", "n_train"))]
    if protocols:
        bn, tr, n = (min(p[k] for p in protocols) for k in ("bn_images", "train_images", "n_train"))
        if all(p["bn_images"] >= p["n_train"] and p["train_images"] >= p["n_train"] for p in protocols):
            text += (f"Evaluation protocol: BatchNorm statistics and train metrics from all {n} training images at "
                     "every point, which is eval-curve --full.")
        else:
            text += (f"Evaluation protocol: BatchNorm statistics from {bn} and train metrics from {tr} of the {n} "
                     f"training images (fixed subsets) at every point. ")
            text += PROTOCOL_DEVIATION if bn >= BN_IMAGES and tr >= TRAIN_IMAGES else (
                f"These subsets are smaller than the defaults ({BN_IMAGES}), whose distance from --full was "
                "measured; benchmarks/eval_protocol.py measures it for other sizes.")
    return text


def _summary_table(data: dict) -> tuple[list[str], list[list[str]]]:
    aligned = any("aligned_segment" in g.get("summary", {}).get("paths", {}) for g in data["groups"].values())
    headers = ["loss group", "pairs", "segment test barrier (mean)", "curve test barrier (mean)",
               "barrier removed (mean)", "barrier removed (worst pair)"] \
        + ["aligned segment removes (mean)", "aligned curve removes (mean)"] * aligned \
        + ["worst test PSNR: curves (dB)", "endpoints (dB)", "segments (dB)"]
    rows = []
    for loss, g in data["groups"].items():
        if g["status"] != "run":
            rows.append([loss, "skipped"] + ["—"] * (len(headers) - 2))
            continue
        s = g["summary"]
        if "segment_te_barrier_mean" not in s:
            rows.append([loss, f"{s['pairs_evaluated']} of {s['pairs']} evaluated"] + ["n/a"] * (len(headers) - 2))
            continue
        paths = s.get("paths", {})
        removed = [fpct(paths[k]["removed"]["mean"]) if k in paths else "n/a"
                   for k in ("aligned_segment", "aligned_curve")] * aligned
        rows.append([loss, str(s["pairs_evaluated"]), fnum(s["segment_te_barrier_mean"]),
                     fnum(s["curve_te_barrier_mean"]), fpct(s["barrier_removed_mean"]), fpct(s["barrier_removed_min"]),
                     *removed, fdb(s["worst_psnr_curves"]), fdb(s["worst_psnr_endpoints"]),
                     fdb(s["worst_psnr_segments"])])
    return headers, rows


def _endpoint_table(loss: str, g: dict) -> tuple[list[str], list[list[str]]]:
    """eval-curve's figures for each endpoint (the ones to quote: measured like every point of the paths)."""
    if loss == "mse":
        # the loss is the MSE: one pair of columns, not two equal ones; the loss's own values, which the barriers
        # are measured from (eval-curve's separately reduced MSE differs from them by rounding only)
        metrics = [("train MSE", "tr_loss"), ("test MSE", "te_loss")]
    else:
        kind = "perceptual" if any(p.get("perceptual") for p in g["pairs"]) else loss
        metrics = [(f"train loss ({kind})", "tr_loss"), (f"test loss ({kind})", "te_loss"), ("train MSE", "tr_mse"),
                   ("test MSE", "te_mse")]
    headers = ["autoencoder"] + [h for h, _ in metrics] + ["train PSNR (dB)", "test PSNR (dB)", "epochs",
                                                           "last-epoch gain", "gain from extra training"]
    rows = []
    for e in g["endpoints"]:
        ev, tr = e.get("eval", {}), e.get("training", {})
        rows.append([f"{loss} seed {e['seed']}"] + [fnum(ev.get(k)) for _, k in metrics]
                    + [fdb(ev.get("tr_psnr")), fdb(ev.get("te_psnr")), str(tr.get("epoch", "n/a")),
                       fpct(tr.get("last_epoch_gain")), fpct((e.get("extra") or {}).get("gain"))])
    return headers, rows


def endpoint_footnote(loss: str, g: dict) -> str:
    """Where the table's figures come from, and why the training log's held-out figure differs from them."""
    what = "MSE" if loss == "mse" else "loss"
    columns = "MSE and PSNR" if loss == "mse" else "loss, MSE and PSNR"
    text = (f"The {columns} columns are eval-curve's, at t=0 / t=1 of the first path through each endpoint, with "
            "the BatchNorm statistics recomputed from training images as at every point of the paths: the figures "
            "to quote, comparable with every point of the paths. ")
    logged = [f"{fnum(e['training']['test_loss'])} (seed {e['seed']})" for e in g["endpoints"]
              if (e.get("training") or {}).get("test_loss") is not None]
    if logged:
        text += (f"The training log (metrics.jsonl) gives another held-out {what}, {', '.join(logged)}, measured "
                 "with the BatchNorm running statistics kept from training. ")
    c = g.get("convergence") or {}
    text += ("Epochs and last-epoch gain come from the training log: how much the held-out loss fell in the final "
             "epoch. Under the paper's schedule the lr ends at 1% of its start, so that gain is near 0 by "
             "construction and says nothing about convergence. ")
    if not c.get("extra_training"):
        return text + ("The study ran without extra training (--no-extra-training), so convergence was not "
                       "measured.")
    return text + (f"The gain from extra training is how much the held-out {what} falls when the endpoint is trained "
                   f"on for {c.get('extra_epochs')} more epochs, as long as a curve (aecurves train --init; measured "
                   "by eval-curve like every point of the paths, baselines/): an endpoint that still gains more than "
                   f"{fpct(CONVERGED_GAIN)} had not converged, and a barrier measured against it is one between "
                   "unconverged networks.")


def finterval(r: dict, fmt) -> str:
    """"mean [lo, hi]" of a mean_interval record; the mean alone for one pair."""
    if r["mean"] is None:
        return "n/a"
    if r["lo"] is None:
        return f"{fmt(r['mean'])} (one pair)"
    return f"{fmt(r['mean'])} [{fmt(r['lo'])}, {fmt(r['hi'])}]"


def _removed(naive, barrier) -> float | None:
    return (naive - barrier) / naive if naive and naive > 0 and barrier is not None else None


def fbootstrap(path: dict) -> str:
    """A path's test-barrier interval over held-out images (eval-curve's bootstrap)."""
    lo, hi = path.get("te_barrier_lo"), path.get("te_barrier_hi")
    return "n/a" if lo is None or hi is None else f"[{fnum(lo)}, {fnum(hi)}]"


def fsigned(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def path_tables(g: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, headers, rows) of the four paths compared per pair, with a last row of means and 95% intervals."""
    done = [p for p in g["pairs"] if p["available"] and "paths" in p]
    names = [(k, label) for k, label in PATHS if k in g["summary"].get("paths", {})]
    if not done or not names:
        return []
    mean_label = "mean [95% interval]"
    tables = []
    for key, caption, fmt, skip in (
            ("barrier", "test barrier", fnum, ()),
            ("removed", "share of the straight segment's test barrier removed", fpct, ("segment",)),
            ("best_vs_endpoint", "best point of each path (lowest test loss) against the better endpoint", fsigned,
             ()),
            ("best_vs_extra", "best point of each path against the better endpoint trained on as long as a curve "
                              "(the fair comparison)", fsigned, ())):
        cols = [(k, label) for k, label in names if k not in skip]
        if all(p["paths"].get(k, {}).get(key) is None for p in done for k, _ in cols):
            continue
        rows = [[f"seeds {p['seeds'][0]}-{p['seeds'][1]}"] + [fmt(p["paths"].get(k, {}).get(key)) for k, _ in cols]
                for p in done]
        rows.append([mean_label] + [finterval(g["summary"]["paths"][k][key], fmt) for k, _ in cols])
        tables.append((caption, ["pair"] + [label for _, label in cols], rows))
    return tables


ENSEMBLE_ROWS = (("path_average", "(a) output average of {k} points of the curve"),
                 ("endpoint_average", "(b) output average of the two endpoints"),
                 ("weight_average", "(c) one network at the mean of the {k} points' weights"),
                 ("best_endpoint", "the better endpoint"))


def ensemble_table(g: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per pair: the averages of eval-curve --ensemble against the better endpoint and the better endpoint trained
    on as long as a curve (the fair one), on the held-out images."""
    rows = []
    for p in g["pairs"]:
        ens = p.get("ensemble")
        if not p["available"] or not ens:
            continue
        a, b = p["seeds"]
        for key, label in ENSEMBLE_ROWS:
            e = ens["entries"].get(key, {})
            rows.append([f"seeds {a}-{b}", label.format(k=ens.get("k"))] + [fnum(e.get("mse")), fdb(e.get("psnr")),
                                                                           fnum(e.get("ssim"))])
        extra = p.get("extra_endpoint")
        if extra:
            rows.append([f"seeds {a}-{b}", "the better endpoint trained on as long as a curve (fair)",
                         fnum(extra["mse"]), fdb(extra["psnr"]), fnum(extra["ssim"])])
    if not rows:
        return None
    return ["pair", "network or average", "test MSE", "test PSNR (dB)", "test SSIM"], rows


def _row_text(key: str, label: str, row: dict, seeds) -> str:
    members = row.get("members") or 0
    n = members // 2 if key == "fge_pooled" else members
    return label.format(k=members, n=f"{n} snapshot{'s' if n != 1 else ''}", a=seeds[0], b=seeds[1])


def _budget_text(row: dict, factor: int) -> str:
    epochs = row.get("budget_epochs")
    if epochs is None:
        return "n/a"
    return f"{epochs:g} (2 × {epochs / 2:g})" if factor == 2 else f"{epochs:g}"


def equal_budget_tables(g: dict):
    """(per pair, over pairs) tables of the equal-budget ensembles: each row's training budget beyond the endpoints
    in epochs, its networks, and held-out MSE, PSNR, SSIM; None when no pair measured them."""
    eb = g.get("equal_budget") or {}
    per_pair = []
    for p in g["pairs"]:
        rows = (p.get("equal_budget") or {}).get("rows") or {}
        if not p.get("available") or not rows:
            continue
        for key, label, factor in EQUAL_BUDGET_ROWS:
            if key in rows:
                r = rows[key]
                per_pair.append([f"seeds {p['seeds'][0]}-{p['seeds'][1]}", _row_text(key, label, r, p["seeds"]),
                                 _budget_text(r, factor), str(r.get("members", "n/a")), fnum(r["mse"]),
                                 fdb(r["psnr"]), fnum(r.get("ssim"))])
    if not per_pair:
        return None
    over = []
    for key, label, factor in EQUAL_BUDGET_ROWS:
        r = eb.get("rows", {}).get(key)
        if r:
            name = EQUAL_BUDGET_SHORT[key] + (" (the winner)" if key == eb.get("winner") else "")
            over.append([name, _budget_text(r, factor), str(r["pairs"]), finterval(r["mse"], fnum),
                         finterval(r["psnr"], fdb), finterval(r["ssim"], fnum)])
    headers = ["pair", "ensemble", "training beyond the endpoints (epochs)", "networks", "test MSE",
               "test PSNR (dB)", "test SSIM"]
    return (headers, per_pair), (["ensemble", "training beyond the endpoints (epochs)", "pairs",
                                  "test MSE, mean [95% interval]", "test PSNR (dB)", "test SSIM"], over)


def build(study_dir: Path, data: dict, inputs: Inputs) -> tuple[Doc, list[str]]:
    doc = Doc()
    cfg = data["config"]
    doc.h(1, "Mode connectivity of autoencoders: study report")
    seeds = _setting_text(cfg.get("seeds", []))
    doc.p(f"Autoencoders trained from seeds {seeds} for each loss, every pair within a loss group connected by a "
          f"{cfg.get('curve', '')} curve with {cfg.get('num_bends', '?')} bends (ends fixed), and every curve and the "
          f"straight segment between the same endpoints evaluated at {cfg.get('num_points', '?')} points t in [0, 1] "
          f"on {cfg.get('dataset', '?')} {cfg.get('image_size', '?')}x{cfg.get('image_size', '?')} images.", None)
    doc.p(provenance_line(data["provenance"]), "muted")
    lines, caveats = [], []
    for loss, g in data["groups"].items():
        lines += summary_sentences(loss, g)
        caveats += [g["caveat"]] if g.get("caveat") else []
    doc.h(2, "Summary")
    doc.table(*_summary_table(data))
    doc.ul(lines, "summary")
    for text in caveats:
        doc.p(text, "warn")
    if data["damaged"]:
        doc.p(("Damaged input files, left out of this report (unreadable, or not holding what their stage writes; "
               "forcing that stage, e.g. ", Code("aecurves study --force eval:mse:1-2"), ", writes one again):"),
              "warn")
        doc.ul([f"{rel}: {reason}" for rel, reason in data["damaged"].items()], "warn")
    doc.p("Barrier: max over t of L(t) − ((1 − t)·L(0) + t·L(1)), the rise of the held-out loss above the chord "
          "between the two ends of a path; barrier removed: 1 − curve barrier / segment barrier. Losses, MSE and "
          "PSNR are measured by eval-curve in fp32 after recomputing the BatchNorm statistics at each t.", "muted")
    doc.p(training_and_protocol(cfg, data), "muted")

    for loss, g in data["groups"].items():
        name = LOSS_NAMES.get(loss, loss)
        doc.h(2, f"{loss} group ({name})")
        if g["status"] != "run":
            doc.p(f"SKIPPED. {g.get('reason', '')}", "warn")
            doc.p(f"Remedy: {g.get('remedy', '')}", "warn")
            continue
        if g.get("warning"):
            doc.p(g["warning"], "warn")

        doc.h(3, "Endpoints")
        doc.table(*_endpoint_table(loss, g))
        doc.p(endpoint_footnote(loss, g), "muted")
        if (g.get("convergence") or {}).get("converged") is False:
            doc.p(convergence_sentence(loss, g["convergence"]), "warn")
        for e in g["endpoints"]:
            grid = endpoint_grid(study_dir, loss, e, inputs)
            if grid is None:
                continue
            rel, labelled = grid
            rows = "" if labelled else " (top row)", "" if labelled else " (bottom row)"
            doc.img(rel, f"{loss} group, seed {e['seed']}: held-out images{rows[0]} and their reconstructions{rows[1]} "
                         "after the last epoch", pixels=not labelled, scale=1 if labelled else 2)

        doc.h(3, "Loss along the paths")
        rel = plot_group(study_dir, loss, g, inputs)
        if rel:
            aligned = any("aligned_curve" in p for p in g["pairs"])
            doc.img(rel, f"{loss} group, seeds {_pairs_text([p for p in g['pairs'] if p['available']])}: {name} "
                         "along t for every curve (solid) and the straight segment between the same endpoints "
                         "(dashed, same colour)" + ("; the curve to the aligned B (dash-dot) and the aligned "
                                                    "segment (dotted)" if aligned else "")
                    + "; left: training images, right: held-out images")
        else:
            doc.p("No finished evaluation yet.", "warn")

        plane = g.get("plane")
        if plane:
            a, b = plane["seeds"]
            rel = _copy(study_dir, f"{plane['folder']}/plane.png", f"{loss}_plane_seed{a}-seed{b}.png") \
                if plane["available"] else None
            if rel:
                doc.img(rel, f"{loss} group, seeds {a}-{b}: {name} over the plane through the curve's first, middle "
                             "and last bend (aecurves plane), BatchNorm statistics recomputed at every grid point; "
                             "the curve solid, the straight segment dashed")
            else:
                why = _absent(f"{plane['folder']}/plane.json", data)
                doc.p(f"The loss plane of seeds {a}-{b} is not there: {why}.", "warn")

        tables = path_tables(g)
        if tables:
            doc.h(3, "Straight segment, aligned segment, curve, aligned curve")
            doc.p("The aligned segment and the aligned curve end at B aligned to A (aecurves align: B's hidden units "
                  "reordered and its latent code mapped; the same function). Best point: the path's lowest held-out "
                  "loss, relative to the better endpoint (negative: below it). A curve's middle bend gets "
                  f"{data['config'].get('curve_epochs', '?')} epochs of extra training, so the endpoints trained on "
                  "for as long (aecurves train --init, same lr schedule) are the fair comparison. Means over pairs "
                  "with a 95% t-interval; with few pairs the interval is wide.", "muted")
            for caption, headers, rows in tables:
                doc.p(caption[0].upper() + caption[1:] + ":", None)
                doc.table(headers, rows)

        ensembles = ensemble_table(g)
        if ensembles:
            doc.h(3, "Averaging along the curve (curve ensembles)")
            doc.p("The reconstruction analogue of the paper's fast ensembling, on the held-out images, BatchNorm "
                  "statistics recomputed for every network. The better endpoint is taken per metric. A curve's "
                  "middle bend gets extra training, so the endpoint trained on for as long is the fair comparison.",
                  "muted")
            doc.table(*ensembles, numeric_from=2)

        budget = equal_budget_tables(g)
        if budget:
            e = data["config"].get("curve_epochs", "?")
            doc.h(3, "Ensembles at equal training budget")
            doc.p(f"Every ensemble of a pair at the same training beyond the endpoints: one curve's {e} epochs (its "
                  f"--curve-epochs) per run. (a) and (b): the curve's evaluation (eval-curve --ensemble); (c): fast "
                  f"geometric ensembling (aecurves fge) from each endpoint for {e} epochs, its snapshots' outputs "
                  "averaged, each run alone and both runs pooled; (d) and (e): the endpoints trained on for "
                  f"{e} epochs each (aecurves train --init). A row made of two runs is 2 × {e} epochs; (e) is one "
                  "run, chosen as the better of two. Output averages of reconstructions on the held-out images, "
                  "BatchNorm statistics recomputed for every network on the same training images; (e) per metric.",
                  "muted")
            per_pair, over = budget
            doc.table(*per_pair, numeric_from=2)
            doc.p("Over pairs:", None)
            doc.table(*over, numeric_from=1)

        for p in g["pairs"]:
            a, b = p["seeds"]
            doc.h(3, f"Seeds {a} and {b}")
            if not p["available"]:
                lead = "Left out" if p["eval_status"] == "damaged" else "Not evaluated yet"
                doc.p(f"{lead} ({_absent(p['eval'] + '/eval.json', data)}).", "warn")
                continue
            cur, seg = p["curve"], p["segment"]
            kind = p.get("path", {})
            label = f"{kind.get('curve') or 'curve'} curve ({kind.get('num_bends') or '?'} bends)"
            what = "MSE" if loss == "mse" else "loss"
            doc.table(["path", f"max test {what}", "test barrier", "barrier removed", "train barrier",
                       "train barrier removed", "path length", "min test PSNR (dB)", "min test SSIM",
                       "test barrier: 95% bootstrap over images"],
                      [[label, fnum(cur["te_loss_max"]), fnum(cur["te_barrier"]), fpct(p["barrier_removed"]),
                        fnum(cur["tr_barrier"]), fpct(p["train_barrier_removed"]), fnum(cur["length"]),
                        fdb(cur["te_psnr_min"]), fnum(cur.get("te_ssim_min")), fbootstrap(cur)],
                       ["segment", fnum(seg["te_loss_max"]), fnum(seg["te_barrier"]), "—", fnum(seg["tr_barrier"]),
                        "—", fnum(seg["length"]), fdb(seg["te_psnr_min"]), fnum(seg.get("te_ssim_min")),
                        fbootstrap(seg)]]
                      + [[f"aligned {what}", fnum(x["te_loss_max"]), fnum(x["te_barrier"]),
                          fpct(p["paths"][f"aligned_{what}"]["removed"]), fnum(x["tr_barrier"]),
                          fpct(_removed(seg["tr_barrier"], x["tr_barrier"])), fnum(x["length"]),
                          fdb(x["te_psnr_min"]), fnum(x.get("te_ssim_min")), fbootstrap(x)]
                         for what, x in (("curve", p.get("aligned_curve")), ("segment", p.get("aligned_segment")))
                         if x is not None])
            tag = f"{loss}_seed{a}-seed{b}"
            along = f"{loss} group, seeds {a}-{b}: held-out images reconstructed along"
            strips = [(p["eval"], "reconstructions.png", "curve", f"{along} the {label} at t = 0, 1/8, …, 1"),
                      (p["eval"], "reconstructions_segment.png", "segment",
                       f"{along} the straight segment at t = 0, 1/8, …, 1")]
            if p.get("aligned_segment") is not None:
                strips.append((p["aligned_eval"], "reconstructions_segment.png", "aligned_segment",
                               f"{along} the straight segment to seed {b} aligned to seed {a} at t = 0, 1/8, …, 1"))
            if p.get("ensemble"):
                strips.append((p["eval"], "ensemble.png", "ensemble",
                               f"{loss} group, seeds {a}-{b}: held-out images, then the two endpoints' "
                               "reconstructions, (a) the output average along the curve, (b) that of the endpoints "
                               "and (c) the weight average: what averaging costs in sharpness"))
            for folder, src, suffix, caption in strips:
                rel = _copy(study_dir, f"{folder}/{src}", f"{tag}_{suffix}_reconstructions.png")
                if rel:
                    doc.img(rel, caption, pixels=True)
        notes = sorted({n for p in g["pairs"] if p["available"] for n in p.get("notes", [])})
        if notes:
            doc.p("Notes from eval-curve:", "muted")
            doc.ul(notes)

    doc.h(2, "Configuration")
    doc.p("study.json's settings; where the study resolves a setting at run time (device, precision, subsets capped "
          "by the data), the value the stages recorded in their own files, with the request beside it where they "
          "differ.", "muted")
    doc.table(["setting", "value"], _config_rows(cfg, data["ran"]), numeric_from=2)
    doc.h(3, "Provenance")
    prov = data["provenance"]
    if not prov:
        doc.p("Not recorded: this study.json has no provenance (versions, host, dates, wall times).", "muted")
    else:
        doc.table(["", "as recorded in study.json"], provenance_rows(prov), numeric_from=2)
        stages = prov.get("stage_seconds")
        if isinstance(stages, dict) and stages:
            doc.table(["stage", "wall time"], [[k, fseconds(v)] for k, v in stages.items()])
        else:
            doc.p("Wall time per stage: not recorded.", "muted")
    doc.h(2, "Files")
    doc.p(("endpoints/{loss}_seed{s}/: aecurves train runs (…_extra: trained on as long as a curve); "
           "aligned/{loss}_seed{b}-to-seed{a}/: aecurves align; curves/{loss}_seed{a}-seed{b}/ (…_aligned: to the "
           "aligned B): aecurves train-curve runs; …/eval/: aecurves eval-curve of each curve and of its segment "
           "(eval.json, curve.npz with segment_* arrays); baselines/: the extra-trained endpoints measured like the "
           "paths; fge/{loss}_seed{s}/: aecurves fge from each endpoint (snapshot_K.pt, fge.json); "
           "ensembles/{loss}_seed{a}-seed{b}/: the pair's FGE and extra-trained ensembles (ensembles.json); "
           "study.json: the resolved configuration; report.json: every number above. Written "
           f"{time.strftime('%Y-%m-%d %H:%M')} from the files of {study_dir.resolve()}; regenerate with ",
           Code(f"aecurves report {shlex.quote(str(study_dir))}"), "."), "muted")
    return doc, lines + caveats


def _absent(rel: str, data: dict) -> str:
    """Why the input file `rel` is not in the report: not written yet, or damaged (and how)."""
    reason = data["damaged"].get(rel)
    return f"{rel} is damaged: {reason}" if reason else f"{rel} is missing"


def write_report(study_dir) -> dict:
    """Writes report.html, report.md, report.json and report_files/ in `study_dir`, reading only its files, and
    names on stderr the input files it found damaged (and made the report without)."""
    study_dir = Path(study_dir)
    fingerprint = inputs_fingerprint(study_dir)
    inputs = Inputs(study_dir)
    data = collect(study_dir, inputs)
    for rel, reason in data["damaged"].items():
        print(f"warning: {study_dir / rel} is damaged ({reason}); the report is made without it", file=sys.stderr)
    doc, lines = build(study_dir, data, inputs)
    title = "aecurves study report"
    # every write through aecurves.files: atomic, and a failure (a full disk) names its file
    _write_text(study_dir / "report.md", to_markdown(doc))
    _write_text(study_dir / "report.html", to_html(doc, study_dir, title))
    record = {"format_version": REPORT_VERSION, "inputs_fingerprint": fingerprint,
              "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary_lines": lines,
              "thresholds": {"no_barrier": NO_BARRIER, "most": MOST, "some": SOME, "psnr_tolerance_db": PSNR_TOLERANCE,
                             "converged_gain": CONVERGED_GAIN},
              **data}
    write_json(study_dir / "report.json", record)  # last: its fingerprint marks the report complete
    print(f"wrote report.html, report.md, report.json and {FILES_DIR}/ in {study_dir}")
    return record


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def run(cfg: ReportConfig) -> dict:
    """`aecurves report DIR`."""
    study_dir = Path(cfg.study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir} is not a folder; pass the folder of a study (the --out of `aecurves study`).")
    return write_report(study_dir)
