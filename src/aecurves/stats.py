"""Statistics in plain numpy (no torch, so the report stays light; easy to check by hand): those of one path
(loss_barrier, dl_weighted_mean, summarize) and those across pairs of endpoints (the mean with a Student-t
interval, bootstrap intervals)."""

import math

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# statistics of a path (plain numpy: easy to check by hand)

# "loss" is the objective; "distortion" (the reconstruction loss) and "rate" (the mean KL in nats) are its terms,
# measured for a VAE only (an autoencoder's objective is its reconstruction loss)
METRICS = ("loss", "distortion", "rate", "mse", "psnr", "perceptual", "ssim")
BARRIER_TERMS = ("distortion", "rate")
STATS = ("start", "end", "min", "max", "avg", "int")
SPLITS = {"tr": "train", "te": "test"}


def path_length(dl) -> float:
    return float(np.sum(dl))


def dl_weighted_mean(values, dl) -> float:
    """Σ_i ½(m_{i-1} + m_i)·dl_i / Σ_i dl_i (i ≥ 1): the paper's *_int. The plain mean when the path has length 0."""
    values, dl = np.asarray(values, dtype=np.float64), np.asarray(dl, dtype=np.float64)
    total = dl[1:].sum()
    if not total > 0:
        return float(values.mean())
    return float((0.5 * (values[:-1] + values[1:]) * dl[1:]).sum() / total)


def loss_barrier(ts, losses) -> float:
    """max_t [L(t) − ((1 − t)·L(0) + t·L(1))]: how far the loss rises above the chord between the ends."""
    ts, losses = np.asarray(ts, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    return float(np.max(losses - ((1 - ts) * losses[0] + ts * losses[-1])))


def summarize(series: dict) -> dict:
    """Scalars of one path: {split}_{metric}_{start,end,min,max,avg,int}, length, tr_barrier, te_barrier (the
    objective's) and, for a VAE, {split}_distortion_barrier and {split}_rate_barrier (loss_barrier of each term)."""
    out = {}
    for split in SPLITS:
        for m in METRICS:
            v = series.get(f"{split}_{m}")
            if v is None:
                continue
            v = np.asarray(v, dtype=np.float64)
            stats = {"start": v[0], "end": v[-1], "min": v.min(), "max": v.max(), "avg": v.mean(),
                     "int": dl_weighted_mean(v, series["dl"])}
            out.update({f"{split}_{m}_{s}": float(x) for s, x in stats.items()})
    out["length"] = path_length(series["dl"])
    for split in SPLITS:
        out[f"{split}_barrier"] = loss_barrier(series["ts"], series[f"{split}_loss"])
        for term in BARRIER_TERMS:
            if f"{split}_{term}" in series:
                out[f"{split}_{term}_barrier"] = loss_barrier(series["ts"], series[f"{split}_{term}"])
    return out


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
