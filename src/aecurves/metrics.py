"""Reconstruction metrics and the evaluation protocol shared by training, the curve monitor and eval-curve.

One function measures a network (`evaluate`), and one protocol says how BatchNorm statistics and training-set
metrics are taken at a point of a path (`fixed_subset`, `stratified_subset`, with config's SUBSET_SEED and
EVAL_BATCH_SIZE), so the midpoint monitor of train-curve and eval-curve compute the same number at t = 0.5.
"""

import torch

from aecurves import runtime
from aecurves.config import SUBSET_SEED
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
