"""Statistics across pairs of endpoints: the mean with a Student-t interval (no torch, so the report stays light)."""

import math

import numpy as np


def mean_interval(values, level: float = 0.95) -> dict:
    """{n, mean, std, min, max, lo, hi} of the finite `values`: std with n − 1 degrees of freedom, [lo, hi] the
    two-sided `level` t-interval of the mean (None with fewer than two values: one pair gives no spread)."""
    from scipy.stats import t as student_t

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    out = {"n": int(v.size), "mean": None, "std": None, "min": None, "max": None, "lo": None, "hi": None,
           "level": level}
    if not v.size:
        return out
    out.update(mean=float(v.mean()), min=float(v.min()), max=float(v.max()))
    if v.size > 1:
        std = float(v.std(ddof=1))
        half = float(student_t.ppf(0.5 + level / 2, v.size - 1)) * std / math.sqrt(v.size)
        out.update(std=std, lo=out["mean"] - half, hi=out["mean"] + half)
    return out
