"""What eval-curve and plane share: the subject's common fields, the run's data, the losses, the evaluation
protocol and points per call (one `Setup`), its printed description, and the record keys both write.

Both commands evaluate networks of one path (a curve, or the segment between two networks) under the same
protocol (metrics.protocol_loaders), so a value at t = 0 in eval.json is the same as at θ₀ in plane.json; built
here once, the two cannot drift apart.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aecurves import runtime
from aecurves.config import SUBSET_SEED, VAL_FRACTION, as_record
from aecurves.curves import Curve
from aecurves.data import ImageData, load_data
from aecurves.errors import UserError
from aecurves.losses import Objective, make_loss
from aecurves.metrics import Protocol, choose_points_per_call, protocol_loaders
from aecurves.models import is_vae
from aecurves.ssim import SSIM_WINDOW


@dataclass
class Subject:
    """What both commands evaluate; each adds its own fields (eval_curve.Subject, plane.Subject)."""

    kind: str                 # eval-curve: "curve" or "segment"; plane: "curve" or "points"
    path: Curve               # the base module, and the protocol's start endpoint (t = 0)
    args: dict                # the run config whose data and loss are used
    loss: str                 # the loss evaluated


@dataclass
class Setup:
    """Everything an evaluation needs before its first point, and what the records say about it."""

    device: object            # torch.device
    data: ImageData
    data_record: dict         # how the data was chosen
    loss: str
    loss_fn: object
    perceptual_fn: object     # None: no perceptual metric
    ssim: bool
    protocol: Protocol
    per_call: int             # points per call
    notes: list               # what was left out or changed, and why
    compile_fallbacks: list = field(default_factory=list)  # --compile: why a compiled function ran uncompiled
    vae: bool = False         # the network returns (reconstruction, kl): "loss" is the objective
    kl_weight: float = 1.0    # β of the objective (a VAE's; an autoencoder's objective has no KL term)


def run_data(args: dict, image_size: int, cfg, missing: str, dataset: str | None = None,
             data_dir: str | None = None) -> tuple[ImageData, dict]:
    """(the data, how it was chosen): the run's (`args`) unless `dataset`/`data_dir` override it; `missing`: the
    error when no dataset is known."""
    record = {"dataset": dataset or args.get("dataset"), "data_dir": data_dir or args.get("data_dir"),
              "image_size": image_size, "limit": args.get("limit"),
              "val_fraction": args.get("val_fraction") or VAL_FRACTION,
              "use_test": bool(cfg.use_test or args.get("use_test")), "cache_dir": cfg.cache_dir}
    if not record["dataset"]:
        raise UserError(missing)
    if record["data_dir"]:
        record["data_dir"] = str(Path(record["data_dir"]).expanduser().resolve())
    return load_data(**record, progress=not cfg.no_progress), record


def prepare(cfg, subject: Subject, data: ImageData, data_record: dict, notes: list, extra_metrics: bool) -> Setup:
    """The losses, the protocol's fixed subsets (drawn once) and points per call, on cfg's device; `subject.path`
    is moved there. `extra_metrics`: the VGG perceptual metric and SSIM too (plane leaves them out: their cost would
    dominate). `notes` gets why anything was left out."""
    device = runtime.resolve_device(cfg.device)
    vae = is_vae(subject.path.base, {"channels": data.channels, "image_size": data.image_size})
    kl_weight = checkpoint_kl_weight(subject.args)
    loss_fn, perceptual_fn = losses_for(subject.loss, cfg.vgg_weights, notes, asked=cfg.loss is not None,
                                        perceptual=extra_metrics, kl_weight=kl_weight)
    if vae:
        loss_fn.description = objective_description(loss_fn.distortion.description, kl_weight)
    loss_fn = loss_fn.to(device)
    perceptual_fn = perceptual_fn.to(device) if perceptual_fn is not None else None
    ssim = extra_metrics and ssim_fits(data.image_size, notes)
    path = subject.path.to(device)  # the stratified subset is scored on the device
    protocol = protocol_loaders(path, data.train, data.test, cfg.bn_images, cfg.train_images, cfg.full,
                                cfg.batch_size, device, cfg.memory_format)
    notes.extend(protocol.notes)
    per_call = choose_points_per_call(cfg.points_per_call, device, path.base, path.weights(0.0),
                                      next(iter(protocol.test_loader)))
    return Setup(device, data, data_record, subject.loss, loss_fn, perceptual_fn, ssim, protocol, per_call, notes,
                 vae=vae, kl_weight=kl_weight)


def checkpoint_kl_weight(args: dict) -> float:
    """β of the run config `args` (a checkpoint's): 1.0 for one written before --kl-weight existed."""
    value = args.get("kl_weight")
    return 1.0 if value is None else float(value)


def objective_description(distortion: str, kl_weight: float) -> str:
    """What a VAE's "loss" is, e.g. "mean squared error + 1·KL/D (VAE objective)"."""
    return f"{distortion} + {kl_weight:g}·KL/D (VAE objective)"


def losses_for(loss_name: str, vgg_weights: str, notes: list, asked: bool = False, perceptual: bool = True,
               kl_weight: float = 1.0):
    """(loss_fn, perceptual_fn or None): the objective with KL weight `kl_weight` (a VAE's; an autoencoder's is
    its reconstruction loss) and the VGG perceptual loss as a metric; records in `notes` why perceptual metrics are
    omitted. `asked`: the loss came from --loss, not from the checkpoint (the error says which). `perceptual`:
    whether to measure it at all."""
    perceptual_fn = perceptual_metric(vgg_weights, notes) if perceptual else None
    if loss_name != "vgg":
        return make_loss(loss_name, kl_weight=kl_weight), perceptual_fn
    if perceptual_fn is not None:  # one VGG module for both (metrics.evaluate_stacked computes it once)
        return Objective(perceptual_fn.distortion, kl_weight), perceptual_fn
    try:
        loss_fn = make_loss("vgg", vgg_weights, kl_weight)
    except UserError as exc:
        why = "--loss vgg was asked for" if asked else "The checkpoint's networks were trained with the vgg loss"
        raise UserError(f"{why}, and evaluating that loss needs the VGG weights. {exc}") from None
    if perceptual:  # eval-curve's note; plane, which measures no perceptual metric, has never recorded it
        notes.append("the training loss 'vgg' was evaluated with RANDOM VGG weights: not a perceptual loss")
    return loss_fn, None


def perceptual_metric(vgg_weights: str, notes: list):
    """The VGG perceptual loss as a metric, or None (with a note) when its weights are random or unavailable."""
    if vgg_weights == "random":
        notes.append("perceptual metrics omitted: --vgg-weights random gives untrained VGG features, which do not "
                     "measure perceptual similarity")
        return None
    try:
        return make_loss("vgg", vgg_weights)
    except UserError as exc:
        notes.append(f"perceptual metrics omitted: {getattr(exc, 'short', exc)}")
        return None


def ssim_fits(image_size: int, notes: list) -> bool:
    """Whether SSIM is measured; records in `notes` why not (images smaller than its window)."""
    if image_size >= SSIM_WINDOW:
        return True
    notes.append(f"SSIM omitted: {image_size}px images are smaller than its {SSIM_WINDOW}x{SSIM_WINDOW} window")
    return False


def announce(setup: Setup, cfg, what: str, each: str) -> None:
    """Prints the data, what is evaluated (`what`) and under which protocol, BN recomputed at each `each`, and
    the notes."""
    protocol = setup.protocol
    print(f"data: {setup.data.source}")
    print(f"{what} on {setup.device} ({cfg.precision}, {protocol.memory_format}, {setup.per_call} per call"
          f"{', compiled' if getattr(cfg, 'compile', False) else ''}): "
          + (f"BN statistics recomputed at each {each}; " if protocol.bn_loader else "no BN statistics; ")
          + f"{protocol.subset}; test metrics on {len(setup.data.test)} held-out images; loss: "
            f"{setup.loss_fn.description}")
    for note in setup.notes:
        print(f"note: {note}")


def record_keys(setup: Setup, cfg, seconds: float) -> dict:
    """The keys eval.json and plane.json share: the loss, the data and the protocol's subsets, how the points were
    computed, the notes, the time and the config."""
    data, protocol = setup.data, setup.protocol
    return {
        "loss": setup.loss,
        "loss_description": setup.loss_fn.description,
        "vae": setup.vae,
        # the β of "loss" (the objective): none for an autoencoder, whose objective has no KL term
        "kl_weight": setup.kl_weight if setup.vae else None,
        "data": {**setup.data_record, "source": data.source, "train_images": len(data.train),
                 "test_images": len(data.test)},
        "bn": {"recomputed": protocol.bn_loader is not None, "images": protocol.bn_images, "subset": protocol.subset,
               "subset_seed": None if cfg.full else SUBSET_SEED},
        "train_metric_images": protocol.train_images,
        "test_metric_images": len(data.test),
        "notes": setup.notes + [n for n in setup.compile_fallbacks if n not in setup.notes],
        "device": str(setup.device),
        "precision": cfg.precision,
        "points_per_call": setup.per_call,
        "memory_format": protocol.memory_format,
        # what ran, not what was asked: a fallback (no C++ compiler) ran uncompiled (plane has no --compile)
        "compiled": getattr(cfg, "compile", False) and not setup.compile_fallbacks,
        "seconds": seconds,
        "config": as_record(cfg),
    }


def pixels(images: torch.Tensor) -> np.ndarray:
    """Images (floats in [0, 1], or uint8) as uint8 pixels [N, C, H, W]: the same rounding as the reconstruction
    strips (plots.reconstruction_grid, torchvision's save_image), so the two hold the same pixels."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.numpy().copy()
    return images.float().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
