"""Reconstruction metrics, path statistics and the evaluation protocol shared by training, the curve monitor and
eval-curve.

One function measures a network (`evaluate`), and one protocol says how BatchNorm statistics and training-set
metrics are taken at a point of a path (`fixed_subset`, `stratified_subset`, with config's SUBSET_SEED and
EVAL_BATCH_SIZE), so the midpoint monitor of train-curve and eval-curve compute the same number at t = 0.5.
Along a path, `summarize` gives each metric's start, end, min, max, avg and int (the dl-weighted mean), the
path length, and the loss barrier on the train and test loss.
"""

import math

import numpy as np
import torch

from aecurves import console, runtime
from aecurves.curves import Curve, CurvePoint, step_lengths
from aecurves.config import SUBSET_SEED
from aecurves.data import BatchLoader
from aecurves.errors import UserError


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model, loader, loss_fn, perceptual_fn=None) -> dict:
    """loss, mse, psnr (mean of per-image PSNR) and optionally perceptual over `loader`, in eval mode and fp32.

    Under torchrun each process measures its shard and the sums are all-reduced.
    """
    model.eval()
    width = 5 if perceptual_fn is not None else 4
    sums = None
    for x in loader:
        recon = model(x)
        per_image_mse = (recon - x).pow(2).flatten(1).mean(1)
        loss = loss_fn(recon, x) * x.shape[0]
        values = [loss, per_image_mse.sum(), psnr_from_mse(per_image_mse).sum(),
                  torch.tensor(float(x.shape[0]), device=x.device)]
        if perceptual_fn is not None:
            values.append(loss if perceptual_fn is loss_fn else perceptual_fn(recon, x) * x.shape[0])
        batch = torch.stack([v.float() for v in values])
        sums = batch if sums is None else sums + batch
    if sums is None:  # this process's shard is empty (the others may not be)
        sums = torch.zeros(width, device=getattr(loader, "device", "cpu"))
    sums = runtime.all_reduce_sum(sums)
    if sums[3].item() == 0:
        raise UserError("No images to evaluate on: the data split is empty.")
    n = sums[3]
    out = {"loss": (sums[0] / n).item(), "mse": (sums[1] / n).item(), "psnr": (sums[2] / n).item()}
    if perceptual_fn is not None:
        out["perceptual"] = (sums[4] / n).item()
    return out


def fixed_subset(images: torch.Tensor, n: int | None, seed: int = SUBSET_SEED) -> torch.Tensor:
    """`n` images drawn once with a fixed generator, in their original order (all of them when n is None or
    too large). Subsets of different sizes are nested: the smaller is a prefix of the same permutation."""
    if n is None or n >= len(images):
        return images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx.sort().values]


@torch.no_grad()
def per_image_mse(model, loader) -> torch.Tensor:
    """Each image's reconstruction MSE, in loader order (eval mode, fp32)."""
    model.eval()
    return torch.cat([(model(x) - x).pow(2).flatten(1).mean(1).float().cpu() for x in loader])


def stratified_subset(images: torch.Tensor, n: int | None, scores: torch.Tensor,
                      seed: int = SUBSET_SEED) -> torch.Tensor:
    """`n` images, one drawn at random from each of n equal strata of the images sorted by `scores`, in their
    original order (all of them when n is None or too large).

    With the per-image loss of a network as the score, the subset holds easy and hard images in the shares
    the whole set does, so its mean loss follows the whole set's far more closely than a plain random subset's
    at every network whose per-image losses correlate with that one's.
    """
    if n is None or n >= len(images):
        return images
    if len(scores) != len(images):
        raise ValueError("one score per image is needed")
    order = torch.argsort(scores, stable=True)
    bounds = torch.linspace(0, len(images), n + 1, dtype=torch.float64).round().long()
    width = bounds[1:] - bounds[:-1]
    offset = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * width).long()
    return images[order[bounds[:-1] + offset].sort().values]


class NonFiniteLoss(UserError):
    pass


def check_finite_state(tensors, where: str) -> None:
    """Parameters and buffers (e.g. BatchNorm's running_var) must stay finite: a diverged run stops here, before
    its state is saved, even when the loss itself still looked finite."""
    bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLoss(f"The network diverged at {where}: non-finite values in {', '.join(bad[:4])}"
                            f"{' ...' if len(bad) > 4 else ''}; training stopped and the last good checkpoint was "
                            "left as it was. Lower --lr, or use --precision fp32, then resume with --resume (it "
                            "restarts from the last good checkpoint).")


def check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"The training loss became {value} at {where}; training stopped and the last good "
                            "checkpoint was left as it was. Lower --lr, or use --precision fp32, then resume with "
                            "--resume (it restarts from the last good checkpoint).")


# ----------------------------------------------------------------------------------------------------------
# statistics of a path (plain numpy: easy to check by hand)

METRICS = ("loss", "mse", "psnr", "perceptual")
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
    """Scalars of one path: {split}_{metric}_{start,end,min,max,avg,int}, length, tr_barrier, te_barrier."""
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
    return out


# ----------------------------------------------------------------------------------------------------------
# along a path


def evaluate_path(curve: Curve, ts, train_loader, test_loader, loss_fn, perceptual_fn=None, bn_loader=None,
                  progress: bool = False, desc: str = "path", on_point=None) -> dict:
    """Metrics at each t of `ts`: {"ts", "dl", "tr_loss", "te_loss", "tr_mse", ...} as float64 arrays.

    With `bn_loader`, BN statistics are recomputed at every t from its batches; without, the curve's
    current buffers are used as they are (e.g. after curve.use_endpoint_buffers(0)).
    `on_point(t, point)`, when given, is called at each t with the CurvePoint (BN statistics in place).
    """
    ts = np.asarray(ts, dtype=np.float64)
    rows = []
    for t in console.progress(ts, desc, progress, unit="point"):
        t = float(t)
        if bn_loader is not None:
            curve.update_bn(bn_loader, t)
        point = CurvePoint(curve, t)
        rows.append({"tr": evaluate(point, train_loader, loss_fn, perceptual_fn),
                     "te": evaluate(point, test_loader, loss_fn, perceptual_fn)})
        if on_point is not None:
            on_point(t, point)
    series = {"ts": ts, "dl": step_lengths(curve, ts)}
    for split in SPLITS:
        for m in rows[0][split]:
            series[f"{split}_{m}"] = np.array([r[split][m] for r in rows], dtype=np.float64)
    return series


@torch.no_grad()
def reconstruct(point, images: torch.Tensor) -> torch.Tensor:
    point.eval()
    return point(images).cpu()


@torch.no_grad()
def reconstructions_along(curve: Curve, ts, images: torch.Tensor, bn_loader=None) -> list[torch.Tensor]:
    """Reconstructions of `images` at each t (BN recomputed at each t from `bn_loader` when given)."""
    out = []
    for t in ts:
        if bn_loader is not None:
            curve.update_bn(bn_loader, float(t))
        out.append(reconstruct(CurvePoint(curve, float(t)), images))
    return out


def protocol_subsets(path: Curve, train: torch.Tensor, n_bn: int, n_metric: int, full: bool, batch_size: int,
                     device) -> tuple:
    """(BN images, train-metric images, how they were chosen) of the evaluation protocol.

    BN statistics: a fixed random subset of `n_bn` images. Train metrics: `n_metric` images drawn one from each
    of as many equal strata of the training images sorted by the start endpoint's per-image MSE, so the
    subset holds easy and hard images in the whole set's shares (its mean loss then follows the whole
    set's closely at every point of the path). A subset at least as large as the set is the set: --full.
    """
    n = len(train)
    if full or (n_bn >= n and n_metric >= n):
        how = "all training images" + ("" if full else " (the subset sizes cover them: the --full protocol)")
        return train, train, how
    bn_images = fixed_subset(train, n_bn, SUBSET_SEED)
    how = f"BN: {len(bn_images)} random training images (torch.Generator seeded {SUBSET_SEED}); train metrics: "
    if n_metric >= n:
        return bn_images, train, how + "all training images"
    path.use_endpoint_buffers(0)
    scores = per_image_mse(CurvePoint(path, 0.0), BatchLoader(train, batch_size, device))
    metric_images = stratified_subset(train, n_metric, scores, SUBSET_SEED)
    return bn_images, metric_images, how + (f"{len(metric_images)} training images, one from each of as many "
                                            "strata of the start endpoint's per-image MSE")
