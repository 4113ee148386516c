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


def bootstrap_barrier(ts, per_image, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      chunk: int = 200) -> tuple[float, float]:
    """A percentile bootstrap interval of the loss barrier over the held-out images: `per_image` [T, N] holds each
    image's loss at each t (the path's loss is their mean), and images are drawn N at a time with replacement.

    Each draw is a vector of counts, so the resampled means are one matrix product: memory stays at
    chunk x N whatever the number of images."""
    ts = np.asarray(ts, dtype=np.float64)
    values = np.asarray(per_image, dtype=np.float64)
    n = values.shape[1]
    rng = np.random.default_rng(seed)
    barriers = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - start))  # [b, N]
        means = values @ counts.T / n  # [T, b]
        chord = (1 - ts)[:, None] * means[0] + ts[:, None] * means[-1]
        barriers.append((means - chord).max(axis=0))
    b = np.concatenate(barriers)
    return float(np.quantile(b, (1 - level) / 2)), float(np.quantile(b, (1 + level) / 2))
