"""Numbers as the report prints them: "n/a" where a figure was not measured."""

import numpy as np

from .model import Interval, PathStats
from .specs import is_number


def fnum(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def fdb(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fpct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fsigned(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def fseconds(x) -> str:
    if not is_number(x) or not np.isfinite(x):
        return "not recorded"
    if x < 60:
        return f"{x:.1f} s"
    s = int(round(x))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def finterval(r: Interval, fmt) -> str:
    """"mean [lo, hi]" of an interval over pairs; the mean alone, said to be of one pair, for one pair."""
    if r.mean is None:
        return "n/a"
    if r.lo is None:
        return f"{fmt(r.mean)} (one pair)"
    return f"{fmt(r.mean)} [{fmt(r.lo)}, {fmt(r.hi)}]"


def fbootstrap(path: PathStats) -> str:
    """A path's test-barrier interval over held-out images (eval-curve's bootstrap)."""
    lo, hi = path.te_barrier_lo, path.te_barrier_hi
    return "n/a" if lo is None or hi is None else f"[{fnum(lo)}, {fnum(hi)}]"


def fwhen(value) -> str:
    return str(value).replace("T", " ") if value else "not recorded"
