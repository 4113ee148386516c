"""What the report reads of each input file, as its writer writes it, and the checker that holds a value against it.

A spec is NUMBER, a type of KINDS, Maybe(spec), Each(spec), {key: spec} (an object with those entries, others
free), [spec] (a list of such items) or a tuple of specs (a list of exactly those). A file is checked once, when it
is read (inputs.Inputs), so that what the report computes from it never meets a string where a number belongs.
"""

import json
from dataclasses import dataclass

NUMBER = "a number"  # an int or a float (NaN and infinities too), not a bool


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


class Damaged(Exception):
    """An input file that cannot be read or does not hold what its writer writes; the message says what is wrong."""


def mismatch(value, spec, where: str = "", whole: str = "the file") -> str | None:
    """Why `value` does not fit `spec` ('summary.te_barrier is "0.02", not a number'), or None when it does.
    `where` names `value` in the message, `whole` when it is the whole file (or row)."""
    name = where or whole
    if isinstance(spec, Maybe):
        return None if value is None else mismatch(value, spec.spec, where, whole)
    if isinstance(spec, (dict, Each)):
        return _object_mismatch(value, spec, where, whole)
    if isinstance(spec, (list, tuple)):
        return _list_mismatch(value, spec, where, whole)
    if spec is NUMBER:
        return None if is_number(value) else _not(value, NUMBER, name)
    fits = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
    return None if fits else _not(value, KINDS[spec], name)


def _object_mismatch(value, spec, where: str, whole: str) -> str | None:
    name = where or whole
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


def _list_mismatch(value, spec, where: str, whole: str) -> str | None:
    exact = isinstance(spec, tuple)
    if not isinstance(value, list) or (exact and len(value) != len(spec)):
        return _not(value, f"a list of {len(spec)}" if exact else "a list", where or whole)
    for i, (item, sub) in enumerate(zip(value, spec if exact else spec * len(value))):
        if problem := mismatch(item, sub, f"{where}[{i}]", whole):
            return problem
    return None


def is_number(value) -> bool:
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


def checked(text: str, spec, whole: str = "the file"):
    """The value of the JSON `text` when it fits `spec`; else Damaged, saying why."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise Damaged(f"not JSON ({exc})") from None
    if problem := mismatch(value, spec, whole=whole):
        raise Damaged(problem)
    return value


def checked_rows(text: str, spec) -> list:
    """The rows of a JSON-lines `text`, each fitting `spec`; else Damaged, naming the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(checked(line, spec, "the row"))
            except Damaged as exc:
                raise Damaged(f"line {n}: {exc}") from None
    return rows


# ----------------------------------------------------------------------------------------------------------
# the input files

NUM = Maybe(NUMBER)
PAIR = {"seeds": (int, int), "curve": str, "eval": str, "aligned_eval": Maybe(str), "aligned_endpoint": Maybe(str),
        "baseline_eval": Maybe(str), "ensembles": Maybe(str)}
RUN_GROUP = {"status": str, "endpoints": Each(str), "pairs": [PAIR], "warning": Maybe(str),
             "plane": Maybe({"seeds": (int, int), "folder": str}), "fge": Maybe(Each(str))}
SKIPPED_GROUP = {"status": str, "reason": Maybe(str), "remedy": Maybe(str)}
STUDY = {"groups": Each({"status": str})}  # config and provenance: checked as entries, the report is made without them
# every evaluation of a path holds these summary numbers (the others the report reads may be null: "n/a")
PATH_NEEDS = ("te_loss_start", "te_loss_end", "te_psnr_start", "te_psnr_end", "te_psnr_min", "te_barrier")
METRICS = {m: NUM for m in ("mse", "psnr", "ssim")}
EVAL = {"notes": Maybe([str]), "num_points": Maybe(int), "loss_description": Maybe(str), "perceptual": Maybe(bool),
        "path": Maybe({"curve": Maybe(str), "num_bends": Maybe(int)}),
        "bn": Maybe({"images": Maybe(int), "recomputed": Maybe(bool)}),
        "data": Maybe({"train_images": Maybe(int), "test_images": Maybe(int)}),
        "train_metric_images": Maybe(int), "test_metric_images": Maybe(int), "device": Maybe(str),
        "ensemble": Maybe({"k": Maybe(int), "entries": Each(METRICS)}),
        "vae": Maybe(bool), "kl_weight": Maybe(NUMBER)}  # a VAE's: its objective is distortion + kl_weight·KL/D
# eval.json as records.EvalRecord.to_json gives it (either layout on disk): each path's summary under paths
SEGMENT_EVAL = {**EVAL, "paths": {"segment": Each(NUM, PATH_NEEDS)}}  # eval-curve --segment (the baselines)
CURVE_EVAL = {**EVAL, "paths": {"curve": Each(NUM, PATH_NEEDS), "segment": Each(NUM, PATH_NEEDS)}}  # and its segment
ENDPOINT_LOG_ROW = {"epoch": Maybe(int), "train_loss": NUM, "test_loss": NUM, "test_mse": NUM, "test_psnr": NUM,
                    "lr": NUM, "precision": Maybe(str)}
CURVE_LOG_ROW = {"precision": Maybe(str)}
STAGE = {"result": Maybe({"seconds": NUM})}
PLANE = {"summary": dict, "grid": Maybe(dict), "seconds": NUM}
ENSEMBLES = {"averages": Each({"members": [int], "mse": NUMBER, "psnr": NUMBER, "ssim": NUM})}  # ensembles.json
FGE = {"budget_epochs": int, "snapshots": [dict], "schedule": Maybe({"cycle": Maybe(int)})}  # fge.json
CURVE_ARRAYS = ("ts", "tr_loss", "te_loss")  # what the figures draw of a curve.npz, for the curve and its segment
TERM_ARRAYS = ("te_distortion", "te_rate")  # and of a VAE's, when there: its objective's two terms
