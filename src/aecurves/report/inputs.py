"""Reading the study folder: each input file read once and checked against the shape its writer gives it.

A file that is not there reads as None: its stage has not run ("missing"). One that cannot be read or decoded, or
holds something else, reads as None too and goes into Inputs.damaged with what is wrong: the report and the console
name it, and the report is made without it. Paths come from study.json, so each is checked to stay inside the study
folder before it is opened.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from aecurves.config import LOSSES
from aecurves.errors import UserError
from aecurves.files import check_no_link
from aecurves.records import HELD_OUT_FORMAT, RecordError, StudyRecord

from .model import Picture
from .specs import (
    CURVE_ARRAYS,
    RUN_GROUP,
    SKIPPED_GROUP,
    STUDY,
    TERM_ARRAYS,
    Damaged,
    checked,
    checked_rows,
    mismatch,
)

OUTSIDE = ("it lies outside the study folder, or is reached through a link inside it (a '..' or a link), so it is "
           "not read")


def inside(root: Path, rel: str) -> Path | None:
    """root/rel when it stays inside the study folder and no part of it below the folder is a link, else None: a
    folder someone sent must not make the report read, and embed, files from elsewhere ('../..' in study.json, or a
    link; write_report refuses a folder with links, and this holds for one made since)."""
    path = root / rel
    try:
        if not path.resolve().is_relative_to(root.resolve()):
            return None
        check_no_link(root, path)
    except (OSError, RuntimeError, UserError):  # a link loop; a link on the way
        return None
    return path


class Inputs:
    """The study's input files, each decoded once; `damaged` maps a file (relative to the study folder) to what is
    wrong with it."""

    def __init__(self, root: Path):
        self.root = root
        self.damaged: dict[str, str] = {}
        self._read: dict[str, object] = {}

    def status(self, rel: str) -> str:
        """"damaged", "missing" or "found"."""
        if rel in self.damaged:
            return "damaged"
        path = inside(self.root, rel)
        return "damaged" if path is None else "found" if path.is_file() else "missing"

    def json(self, rel: str, spec):
        return self.load(rel, lambda path: checked(path.read_text(), spec))

    def record(self, rel: str, cls, spec):
        """A file read through its records type `cls` (EvalRecord, PlaneRecord, StageRecord, StudyRecord: the
        current layout or the old one), as its to_json() gives it (an eval.json's summaries under paths), checked
        against `spec`."""
        return self.load(rel, lambda path: record_json(path, cls, spec))

    def jsonl(self, rel: str, row_spec) -> list | None:
        return self.load(rel, lambda path: checked_rows(path.read_text(), row_spec))

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
            # a bad zip, PIL's SyntaxError for a truncated PNG, a UnicodeDecodeError, an unpickling error...
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


# ----------------------------------------------------------------------------------------------------------
# decoders of the files that are not JSON


def record_json(path: Path, cls, spec) -> dict:
    """The file through `cls`.from_json (a records type), in its current layout (to_json), checked against
    `spec`."""
    try:
        value = json.loads(path.read_text())
    except ValueError as exc:
        raise Damaged(f"not JSON ({exc})") from None
    try:
        record = cls.from_json(value, path.name).to_json()
    except RecordError as exc:
        raise Damaged(str(exc)) from None
    if problem := mismatch(record, spec):
        raise Damaged(problem)
    return record


def curve_arrays(path: Path) -> dict:
    """A curve.npz's CURVE_ARRAYS of the curve and of its segment, and a VAE's TERM_ARRAYS where it has them,
    checked to be numbers, one per t."""
    keys = [prefix + k for prefix in ("", "segment_") for k in CURVE_ARRAYS]
    with np.load(path, allow_pickle=False) as npz:
        if missing := [k for k in keys if k not in npz.files]:
            raise Damaged(f"it has no {', '.join(missing)}")
        terms = [prefix + k for prefix in ("", "segment_") for k in TERM_ARRAYS if prefix + k in npz.files]
        arrays = {k: npz[k] for k in keys + terms}
    for prefix in ("", "segment_"):
        ts = arrays[prefix + "ts"]
        for k in CURVE_ARRAYS + TERM_ARRAYS:
            if prefix + k not in arrays:
                continue
            a = arrays[prefix + k]
            if a.dtype.kind not in "iuf" or a.ndim != 1 or a.shape != ts.shape:
                raise Damaged(f"{prefix + k} is not numbers, one per t")
    return arrays


def _pixels(value, name: str, ndim: int) -> np.ndarray:
    if value.dtype != np.uint8 or value.ndim != ndim or value.shape[-3] not in (1, 3) or not value.size:
        raise Damaged(f"{name} is not uint8 pixels with {ndim} dimensions, [..., C, H, W]")
    return value


def reconstruction_arrays(path: Path) -> dict:
    """eval-curve's reconstructions.npz: ts [T], images [N, C, H, W] and each path's (curve, segment) pixels
    [T, N, C, H, W], checked to fit together."""
    with np.load(path, allow_pickle=False) as npz:
        if missing := [k for k in ("ts", "images") if k not in npz.files]:
            raise Damaged(f"it has no {', '.join(missing)}")
        arrays = {k: npz[k] for k in ("ts", "images", "curve", "segment") if k in npz.files}
    ts, images = arrays["ts"], _pixels(arrays["images"], "images", 4)
    if ts.dtype.kind != "f" or ts.ndim != 1:
        raise Damaged("ts is not numbers, one per t")
    for key in ("curve", "segment"):
        if key in arrays and _pixels(arrays[key], key, 5).shape != (len(ts), *images.shape):
            raise Damaged(f"{key} {arrays[key].shape} is not one reconstruction of each image {images.shape} per t "
                          f"({len(ts)})")
    return arrays


def plane_arrays(path: Path) -> dict:
    """What the plane's explorer shows of plane.npz: the grid [G, G, 2], the held-out loss [G, G], the three points'
    coordinates and, where it has them, the reconstructions at every node (recon [G, G, N, C, H, W], recon_images
    [N, C, H, W])."""
    with np.load(path, allow_pickle=False) as npz:
        if missing := [k for k in ("grid", "te_loss") if k not in npz.files]:
            raise Damaged(f"it has no {', '.join(missing)}")
        arrays = {k: npz[k] for k in ("grid", "te_loss", "bend_coordinates", "recon", "recon_images")
                  if k in npz.files}
    grid, loss = arrays["grid"], arrays["te_loss"]
    if grid.ndim != 3 or grid.shape[0] != grid.shape[1] or grid.shape[2] != 2 or loss.shape != grid.shape[:2]:
        raise Damaged(f"grid {grid.shape} and te_loss {loss.shape} are not a G x G grid and its values")
    if "recon" in arrays:
        images = _pixels(arrays.get("recon_images", np.zeros(0)), "recon_images", 4)
        if _pixels(arrays["recon"], "recon", 6).shape != (*loss.shape, *images.shape):
            raise Damaged(f"recon {arrays['recon'].shape} is not one reconstruction of each image per grid node")
    return arrays


def held_out_tensors(path: Path) -> Picture:
    """An endpoint's reconstructions.pt (train.py): {"format": 1, "images", "reconstructions"}, two uint8 tensors
    [N, C, H, W] of one shape, the pixel values of reconstructions.png. weights_only: a file someone sent must not
    run code when it is read."""
    import torch

    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != HELD_OUT_FORMAT:
        raise Damaged(f"it is not a record of format {HELD_OUT_FORMAT} (a dict with format, images, reconstructions)")
    rows = tuple(record.get(k) for k in ("images", "reconstructions"))
    for name, t in zip(("images", "reconstructions"), rows):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] not in (1, 3) \
                or not t.shape[0]:
            raise Damaged(f"{name} is not uint8 pixels [N, C, H, W]")
        # train.py writes plain (contiguous) tensors whose every pixel is in the file; a view that repeats a few
        # stored bytes (stride 0) would be materialised by the figures: terabytes from a 1 KB file
        stored = t.untyped_storage().nbytes()
        if not t.is_contiguous() or stored < (t.storage_offset() + t.numel()) * t.element_size():
            raise Damaged(f"{name} is a view of {t.numel():,} pixels {tuple(t.shape)} over {stored:,} stored bytes, "
                          "not the plain tensor train.py writes")
    if rows[0].shape != rows[1].shape:
        raise Damaged(f"images {tuple(rows[0].shape)} and reconstructions {tuple(rows[1].shape)} differ in shape")
    return Picture(rows=rows, width=None)


def endpoint_png(path: Path) -> Picture:
    """The two rows of an endpoint's reconstructions.png (train.py: torchvision's make_grid with padding 2, the
    held-out images over their reconstructions) as uint8 tensors [N, 3, s, s]; for folders written before train.py
    wrote reconstructions.pt beside it. Any other layout: no rows, and the picture is shown as it is."""
    import torch
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width, _ = pixels.shape
    pad = 2
    size = (height - pad) // 2 - pad
    n, extra = divmod(width - pad, size + pad) if size >= 1 else (0, 0)
    if n < 1 or extra or 2 * (size + pad) + pad != height:
        return Picture(rows=None, width=width)
    rows = []
    for r in range(2):
        top = pad + r * (size + pad)
        cells = [pixels[top: top + size, pad + j * (size + pad): pad + j * (size + pad) + size] for j in range(n)]
        rows.append(torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).contiguous())
    return Picture(rows=tuple(rows), width=width)


# ----------------------------------------------------------------------------------------------------------
# study.json, the list of input files and their fingerprint


def read_study(study_dir: Path) -> dict:
    """study.json, checked: the report is laid out from its groups, so without them there is no report."""
    inputs = Inputs(study_dir)
    study = inputs.record("study.json", StudyRecord, STUDY)
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
    study = read_study(Path(study_dir))
    files = []
    for group in study["groups"].values():
        if group["status"] == "run":
            files += _group_files(group)
    return files


def _group_files(group: dict) -> list[str]:
    files = []
    for folder in group["endpoints"].values():
        files += [f"{folder}/metrics.jsonl", f"{folder}/reconstructions.png", f"{folder}/reconstructions.pt"]
    for pair in group["pairs"]:
        files.append(f"{pair['curve']}/metrics.jsonl")  # the curve's training precision
        for key in ("eval", "aligned_eval"):
            if key in pair:
                files += [f"{pair[key]}/{n}" for n in ("eval.json", "curve.npz", "reconstructions.png",
                                                       "reconstructions_segment.png", "reconstructions.npz")]
        if "aligned_endpoint" in pair:
            files.append(f"{pair['aligned_endpoint']}/study_stage.json")  # how long the alignment took
        if "baseline_eval" in pair:
            files.append(f"{pair['baseline_eval']}/eval.json")
        if "ensembles" in pair:
            files.append(f"{pair['ensembles']}/ensembles.json")
    files += [f"{folder}/fge.json" for folder in group.get("fge", {}).values()]
    if "plane" in group:
        files += [f"{group['plane']['folder']}/{n}" for n in ("plane.json", "plane.png", "plane.npz")]
    return files


def inputs_fingerprint(study_dir, version: int) -> str:
    """SHA-256 over the report's `version`, study.json's config and groups, and every input file's bytes.

    study.json's provenance (host, times) is left out on purpose: a re-run that skips every stage rewrites it, and
    must not rewrite the report."""
    study_dir = Path(study_dir)
    study = read_study(study_dir)
    h = hashlib.sha256()
    config = study.get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "out"}  # a moved study is the same
    h.update(json.dumps({"version": version, "config": config, "groups": study["groups"]}, sort_keys=True).encode())
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
