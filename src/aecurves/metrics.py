"""Reconstruction metrics, path statistics and the evaluation protocol shared by training, the curve monitor and
eval-curve.

One function measures a network (`evaluate`: loss, MSE, PSNR, optionally the VGG perceptual loss and SSIM;
for a VAE, whose output is (reconstruction, kl), "loss" is the objective and its two terms are reported beside it:
"distortion", the reconstruction loss, and "rate", the mean KL in nats),
and one protocol says how BatchNorm statistics and training-set metrics are taken at a point of a path
(`fixed_subset`, `stratified_subset`, with config's SUBSET_SEED and EVAL_BATCH_SIZE), so the midpoint monitor
of train-curve and eval-curve compute the same number at t = 0.5. Along a path, `summarize` gives each
metric's start, end, min, max, avg and int (the dl-weighted mean), the path length, and the loss barrier on
the train and test loss; `evaluate_ensembles` measures ensembles of its points.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from aecurves import console, runtime
from aecurves.config import SUBSET_SEED
from aecurves.curves import (
    Curve,
    CurvePoint,
    NetworkAt,
    batchnorms,
    recompute_bn,
    recompute_bn_stacked,
    stacked_forward,
    step_lengths,
)
from aecurves.data import BatchLoader
from aecurves.errors import UserError
from aecurves.losses import Objective, reconstruction, split_output
from aecurves.ssim import ssim_per_image
from aecurves.stats import SPLITS


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def image_sums(recon: torch.Tensor, x: torch.Tensor, ssim: bool = False) -> dict:
    """Sums over the batch of per-image MSE, PSNR (and SSIM), and the number of images n, in fp32."""
    recon, x = recon.float(), x.float()
    per_image_mse = (recon - x).pow(2).flatten(1).mean(1)
    out = {"mse": per_image_mse.sum(), "psnr": psnr_from_mse(per_image_mse).sum()}
    if ssim:
        out["ssim"] = ssim_per_image(recon, x).sum()
    out["n"] = torch.tensor(float(x.shape[0]), device=x.device)
    return out


def means(sums: torch.Tensor | None, names: list[str], device) -> dict:
    """{name: sum / n} from `sums` (one value per name, then n), all-reduced under torchrun."""
    if sums is None:  # this process's shard is empty (the others may not be)
        sums = torch.zeros(len(names) + 1, device=device)
    sums = runtime.all_reduce_sum(sums)
    n = sums[-1]
    if n.item() == 0:
        raise UserError("No images to evaluate on: the data split is empty.")
    return {name: (sums[i] / n).item() for i, name in enumerate(names)}


@torch.no_grad()
def evaluate(model, loader, loss_fn, perceptual_fn=None, ssim: bool = False, per_image: bool = False) -> dict:
    """loss, mse, psnr (mean of per-image PSNR), optionally perceptual and, with `ssim`, ssim (mean of per-image
    SSIM) over `loader`, in eval mode and fp32.

    SSIM adds to the cost of an evaluation, so training's per-epoch evaluations leave it out (eval-curve
    measures it). Under torchrun each process measures its shard and the sums are all-reduced.
    """
    model.eval()
    return evaluate_stacked(lambda x: stack_one(model(x)), 1, loader, loss_fn, perceptual_fn, ssim, per_image)[0]


def stack_one(out):
    """One network's output as a stack of one: [1, batch, ...], or for a VAE the pair with each part so."""
    if isinstance(out, (tuple, list)):
        return tuple(o.unsqueeze(0) for o in out)
    return out.unsqueeze(0)


def output_at(outputs, k: int):
    """The k-th network's output in stacked outputs: a tensor [count, batch, ...], or for VAEs the pair of stacked
    tensors that vmap returns (the k-th reconstruction and kl)."""
    if isinstance(outputs, (tuple, list)):
        return tuple(o[k] for o in outputs)
    return outputs[k]


def objective_sums(loss_fn, out, x: torch.Tensor, by_image: bool) -> dict:
    """{"loss": the batch's summed objective, "per_image": each image's (with `by_image`, else None), and for a VAE
    "distortion" and "rate" summed}. `loss_fn` is a losses.Objective, or a bare reconstruction loss (β = 1 then).

    The objective is put together from its terms here (losses.Objective.add_kl), so the reconstruction loss (the
    VGG one is costly) is computed once per batch for all three."""
    objective = loss_fn if isinstance(loss_fn, Objective) else Objective(loss_fn)
    recon, kl = split_output(out)
    per_image = objective.distortion.per_image(recon, x) if by_image else None
    total = per_image.sum() if by_image else objective.distortion(recon, x) * x.shape[0]
    if kl is None:
        return {"loss": total, "per_image": per_image}
    kl = kl.float()
    return {"loss": objective.add_kl(total, kl.sum(), recon), "distortion": total, "rate": kl.sum(),
            "per_image": objective.add_kl(per_image, kl, recon) if by_image else None}


@torch.no_grad()
def evaluate_stacked(forward, count: int, loader, loss_fn, perceptual_fn=None, ssim: bool = False,
                     per_image: bool = False) -> list[dict]:
    """`evaluate` for `count` networks at once: forward(x) returns their outputs stacked [count, batch, ...] (for
    VAEs, the pair of stacked reconstructions and kls), and each gets its own dict. For a VAE, "loss" is the
    objective and "distortion" and "rate" its terms (objective_sums); the other metrics are the reconstruction's.
    With `per_image`, also each image's MSE (per_image_mse) and, when the reconstruction loss has a per_image
    method, each image's loss (per_image_loss, the objective's; the loss is then their mean): this process's
    images, in loader order."""
    names = ["loss", "mse", "psnr"]
    if perceptual_fn is not None:
        names.append("perceptual")
    if ssim:
        names.append("ssim")
    distortion = getattr(loss_fn, "distortion", loss_fn)
    # the perceptual metric is the reconstruction loss itself when both are one VGG module: computed once
    same = perceptual_fn is not None and getattr(perceptual_fn, "distortion", perceptual_fn) is distortion
    by_image = per_image and hasattr(distortion, "per_image")
    sums, images_mse, images_loss = [None] * count, [[] for _ in range(count)], [[] for _ in range(count)]
    for x in loader:
        outputs = forward(x)
        if isinstance(outputs, (tuple, list)) and "rate" not in names:  # a VAE's: its terms are measured too
            names[1:1] = ["distortion", "rate"]
        for k in range(count):
            out = output_at(outputs, k)
            recon = reconstruction(out)
            if per_image:  # for a bootstrap over the images (single-process eval-curve)
                images_mse[k].append((recon.float() - x).pow(2).flatten(1).mean(1).double().cpu())
            terms = objective_sums(loss_fn, out, x, by_image)
            if by_image:
                images_loss[k].append(terms["per_image"].double().cpu())
            values = {**terms, **image_sums(recon, x, ssim)}
            if perceptual_fn is not None:
                values["perceptual"] = (terms.get("distortion", terms["loss"]) if same
                                        else perceptual_fn(recon, x) * x.shape[0])
            batch = torch.stack([values[name].float() for name in (*names, "n")])
            sums[k] = batch if sums[k] is None else sums[k] + batch
    results = []
    for k in range(count):
        out = means(sums[k], names, getattr(loader, "device", "cpu"))
        if per_image:
            out["per_image_mse"] = torch.cat(images_mse[k]).numpy() if images_mse[k] else np.zeros(0)
        if by_image:
            out["per_image_loss"] = torch.cat(images_loss[k]).numpy() if images_loss[k] else np.zeros(0)
        results.append(out)
    return results


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
    return torch.cat([(reconstruction(model(x)) - x).pow(2).flatten(1).mean(1).float().cpu() for x in loader])


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
                            f"{' ...' if len(bad) > 4 else ''}; {STOPPED}")


# Where the divergence happened the caller does not know whether anything was saved yet (none is before the first
# --save-every-epoch), so the remedy names both cases rather than promise a checkpoint.
STOPPED = ("training stopped, and nothing of this epoch was saved. If the run folder holds a checkpoint.pt from an "
           "earlier epoch, it was left as it was: lower --lr, or use --precision fp32, and continue from it with "
           "--resume. If it holds none (the run stopped before its first save, e.g. in epoch 1), no checkpoint was "
           "written: start the run again with a lower --lr or --precision fp32.")


def check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"The training loss became {value} at {where}; {STOPPED}")


# ----------------------------------------------------------------------------------------------------------
# along a path


def evaluate_path(curve: Curve, ts, train_loader, test_loader, loss_fn, perceptual_fn=None, bn_loader=None,
                  progress: bool = False, desc: str = "path", on_point=None, ssim: bool = False,
                  per_image: bool = False, points_per_call: int = 1, compile: bool = False,
                  compile_notes: list | None = None) -> dict:
    """Metrics at each t of `ts`: {"ts", "dl", "tr_loss", "te_loss", "tr_mse", ...} as float64 arrays (with
    `ssim`, tr_ssim and te_ssim too), by `evaluate_points`.

    With `bn_loader`, BN statistics are recomputed at every t from its batches; without, the curve's
    current buffers are used as they are (e.g. after curve.use_endpoint_buffers(0)).
    `on_point(t, network)`, when given, is called at each t with the network there (BN statistics in place).
    """
    ts = np.asarray(ts, dtype=np.float64)
    rows = evaluate_points(curve.base, curve.unflatten, curve.flat_at, [float(t) for t in ts], train_loader,
                           test_loader, loss_fn, perceptual_fn, bn_loader, ssim, per_image, points_per_call,
                           progress, desc, on_point, compile, compile_notes)
    series = {"ts": ts, "dl": step_lengths(curve, ts)}
    for split in SPLITS:
        for m in rows[0][split]:
            series[f"{split}_{m}"] = np.array([r[split][m] for r in rows], dtype=np.float64)
    return series


# ----------------------------------------------------------------------------------------------------------
# the engine: many networks of one weight space, each under the evaluation protocol

MAX_POINTS_PER_CALL = 16


@torch.no_grad()
def evaluate_points(base: torch.nn.Module, unflatten, flat_of, specs, train_loader, test_loader, loss_fn,
                    perceptual_fn=None, bn_loader=None, ssim: bool = False, per_image: bool = False,
                    points_per_call: int = 1, progress: bool = False,
                    desc: str = "points", on_point=None, compile: bool = False,
                    compile_notes: list | None = None) -> list[dict]:
    """[{"tr": metrics on train_loader, "te": metrics on test_loader}] for the network flat_of(spec) of each spec
    (a t of a curve, a node of a plane), BatchNorm statistics recomputed there from `bn_loader` first when
    given (else `base`'s buffers are used as they are). The metrics are `evaluate`'s.

    `points_per_call` networks run together: their weights stacked, `base` vmapped over them (torch.func), one
    call per batch for the BN statistics and for each split. That is the same arithmetic as one network at a
    time, in another order (equal to float rounding: tests/test_metrics.py), and is where a GPU's gain is; on a
    CPU, whose cores one network's convolutions already fill, it measured slower (benchmarks/eval_throughput.py).
    `unflatten(flat)` gives the weights dict of a flat vector; `on_point(spec, network)` is called at each spec.
    With `compile`, the networks' forward goes through torch.compile (one compiled function for every point: the
    weights and buffers are its inputs; BN statistics are still taken uncompiled), falling back when it cannot;
    `compile_notes` then gets why (runtime.CompiledOrEager).
    """
    specs = list(specs)
    calls = {n: runtime.CompiledOrEager(fn, True, "per-point network", notes=compile_notes)
             for n, fn in (("one", lambda w, b, x: functional_call(base, (w, b), (x,))),
                           ("stacked", stacked_forward(base)))} if compile else None
    rows, chunk = [None] * len(specs), []
    for i in console.progress(range(len(specs)), desc, progress, unit="point"):
        chunk.append(i)
        if len(chunk) < points_per_call and i < len(specs) - 1:
            continue
        weights = [unflatten(flat_of(specs[j])) for j in chunk]
        networks, forward = networks_with_bn(base, weights, bn_loader, calls)
        base.eval()
        splits = {split: evaluate_stacked(forward, len(chunk), loader, loss_fn, perceptual_fn, ssim,
                                          per_image and split == "te")
                  for split, loader in (("tr", train_loader), ("te", test_loader))}
        for k, j in enumerate(chunk):
            rows[j] = {split: results[k] for split, results in splits.items()}
            if on_point is not None:
                on_point(specs[j], networks[k])
        chunk = []
    return rows


def networks_with_bn(base: torch.nn.Module, weights: list[dict], bn_loader=None, calls=None) -> tuple[list, object]:
    """(one module per weights dict, forward(x) -> their outputs stacked [len(weights), batch, ...]), BatchNorm
    statistics recomputed for each from `bn_loader` when given. A single network runs as itself, with its
    statistics in `base`'s buffers; several run vmapped, with their statistics stacked beside `base`.
    `calls`, when given, runs them: {"one": f(weights, buffers, x), "stacked": f(stacked weights, stacked
    buffers, x)} (e.g. compiled)."""
    if len(weights) == 1:
        if bn_loader is not None:
            recompute_bn(base, weights[0], bn_loader)
        network = NetworkAt(base, weights[0])
        if calls is None:
            return [network], lambda x: stack_one(network(x))
        own = dict(base.named_buffers())
        return [network], lambda x: stack_one(calls["one"](weights[0], own, x))
    count = len(weights)
    stacked = {n: torch.stack([w[n] for w in weights]) for n in weights[0]}
    if bn_loader is not None:
        buffers = recompute_bn_stacked(base, stacked, count, bn_loader)
    else:
        buffers = {n: torch.stack([b] * count) for n, b in base.named_buffers()}
    forward = stacked_forward(base) if calls is None else calls["stacked"]
    networks = [NetworkAt(base, w, {n: b[k] for n, b in buffers.items()}) for k, w in enumerate(weights)]
    return networks, lambda x: forward(stacked, buffers, x)


def choose_points_per_call(requested: int, device: torch.device, base: torch.nn.Module, weights: dict,
                           batch: torch.Tensor) -> int:
    """`requested` when set (> 0). Otherwise, on a GPU, the largest power of two up to MAX_POINTS_PER_CALL whose
    networks' batches take at most a quarter of the free memory, one network's cost measured on `batch`
    (the margin covers the losses, SSIM and the allocator); on a CPU, 1: stacking measured slower there."""
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 1
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        NetworkAt(base, weights).eval()(batch)
    per_point = torch.cuda.max_memory_allocated(device) - before + sum(w.numel() * w.element_size()
                                                                       for w in weights.values())
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(free / 4 / max(per_point, 1)))
    return min(MAX_POINTS_PER_CALL, 2 ** int(math.log2(fits)))


@torch.no_grad()
def reconstruct(point, images: torch.Tensor) -> torch.Tensor:
    point.eval()
    return reconstruction(point(images)).cpu()


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


@dataclass
class Protocol:
    """The loaders of the evaluation protocol at every point: BN statistics (None for a model without BatchNorm),
    train metrics, held-out metrics; and what they hold, for the records."""
    bn_loader: BatchLoader | None
    train_loader: BatchLoader
    test_loader: BatchLoader
    bn_images: int      # 0 without BatchNorm
    train_images: int
    subset: str         # how the training subsets were chosen
    memory_format: str  # of the batches: channels_last or contiguous
    notes: list         # e.g. why channels_last was not used


def protocol_loaders(path: Curve, train: torch.Tensor, test: torch.Tensor, n_bn: int, n_metric: int, full: bool,
                     batch_size: int, device, memory_format: str = "contiguous") -> Protocol:
    """protocol_subsets as loaders (the train-metric loader is the BN loader when the two subsets are one), their
    batches in `memory_format` when the path's network runs on it (else contiguous, with a note)."""
    bn_images, train_images, subset = protocol_subsets(path, train, n_bn, n_metric, full, batch_size, device)
    memory_format, note = usable_memory_format(memory_format, path.base, path.weights(0.0),
                                               test[:2].to(device).float().div(255))
    notes = [note] if note else []
    cl = memory_format == "channels_last"
    has_bn = bool(batchnorms(path.base))
    bn_loader = BatchLoader(bn_images, batch_size, device, channels_last=cl)
    train_loader = bn_loader if train_images is bn_images else BatchLoader(train_images, batch_size, device,
                                                                         channels_last=cl)
    test_loader = BatchLoader(test, batch_size, device, channels_last=cl)
    return Protocol(bn_loader if has_bn else None, train_loader, test_loader, len(bn_images) if has_bn else 0,
                    len(train_images), subset, memory_format, notes)


def usable_memory_format(requested: str, base: torch.nn.Module, weights: dict, x: torch.Tensor) -> tuple[str, str]:
    """(`requested`, "") when `base` at `weights` runs on `x` in that memory format; else ("contiguous", why)."""
    if requested != "channels_last":
        return requested, ""
    failure = channels_last_failure(base, weights, x)
    if failure is None:
        return requested, ""
    return "contiguous", ("the batches are contiguous, not channels_last: this model's forward fails on "
                          f"channels_last input ({failure})")


@torch.no_grad()
def channels_last_failure(base: torch.nn.Module, weights: dict, x: torch.Tensor) -> str | None:
    """None when `base` runs on `x` in the channels_last memory format, with `weights` as they are and with the
    convolution kernels in channels_last too (train and train-curve hold them so), in both modes (BN statistics
    are taken in training mode); else the first line of the error (e.g. a .view of a permuted tensor)."""
    was_training = base.training
    buffers = {n: b.clone() for n, b in base.named_buffers()}  # training mode updates these: not base's own
    kernels_too = {n: w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w
                   for n, w in weights.items()}
    try:
        for mode in (False, True):
            base.train(mode)
            for w in (weights, kernels_too):
                NetworkAt(base, w, buffers)(x.contiguous(memory_format=torch.channels_last))
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        base.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# ensembles of a path's points

ENSEMBLES = {  # name -> what it is, for eval.json
    "path_average": "(a) the output average of the networks at K evenly spaced points t of the path",
    "endpoint_average": "(b) the output average of the two endpoints (t = 0 and t = 1)",
    "weight_average": "(c) one network at the mean of the K points' weights, its BN statistics recomputed",
    "start": "the start endpoint alone (t = 0)",
    "end": "the end endpoint alone (t = 1)",
    "best_endpoint": "per metric, the better of start and end (lower MSE, higher PSNR and SSIM)",
}
LOWER_IS_BETTER = {"mse"}


@torch.no_grad()
def evaluate_ensembles(curve: Curve, k: int, loader, bn_loader=None, ssim: bool = False, images=None,
                       progress: bool = False) -> dict:
    """MSE, PSNR (and SSIM) over `loader` of each of ENSEMBLES, built from the K = `k` points t in
    linspace(0, 1, K), each with BN statistics recomputed from `bn_loader` as evaluate_path does at every t.

    Returns {"ts", "metrics": {name: {metric: value}}, "which": {metric: "start" or "end"} (the best endpoint's),
    "reconstructions": {name: outputs on `images`} (empty without images)}. Each network runs once per batch.
    """
    if k < 2:
        raise ValueError("an ensemble needs K >= 2 points")
    ts = np.linspace(0.0, 1.0, k)
    weights = [lambda t=float(t): curve.weights(t) for t in ts]  # recomputed per batch: no copy of each point held
    mean = sum(curve.flat_at(float(t)) for t in ts) / k
    weights.append(lambda: curve.unflatten(mean))
    networks = [network_with_bn(curve.base, w, bn_loader)
                for w in console.progress(weights, "ensemble: BN statistics", progress, unit="network")]
    curve.eval()
    averages = {"path_average": range(k), "endpoint_average": [0, k - 1], "weight_average": [k], "start": [0],
                "end": [k - 1]}
    results = evaluate_averages(networks, averages, loader, ssim)
    which = {m: best_of(m, results["start"][m], results["end"][m]) for m in results["start"]}
    results["best_endpoint"] = {m: results[which[m]][m] for m in results["start"]}
    recons = {}
    if images is not None and len(images):
        recons = {name: out.cpu() for name, out in average_outputs(networks, averages, images).items()}
    return {"ts": ts, "metrics": {name: results[name] for name in ENSEMBLES}, "which": which,
            "reconstructions": recons}


def network_with_bn(base: torch.nn.Module, weights, bn_loader=None):
    """`base` at `weights()` as a function of a batch, with BN statistics recomputed for those weights from
    `bn_loader` (when given) and kept apart from `base`, so several such networks can run in turn."""
    if bn_loader is not None:
        recompute_bn(base, weights(), bn_loader)
    buffers = {n: b.detach().clone() for n, b in base.named_buffers()}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, {**weights(), **buffers}, (x,))

    return forward


@torch.no_grad()
def evaluate_averages(networks, averages: dict, loader, ssim: bool = False) -> dict:
    """{name: {"mse", "psnr"(, "ssim")}} of the output average of the networks each entry of `averages` (name ->
    indices into `networks`) lists, per image and averaged over images as `evaluate` does."""
    names = ["mse", "psnr"] + (["ssim"] if ssim else [])
    sums = {}
    for x in loader:
        for name, recon in average_outputs(networks, averages, x).items():
            batch = torch.stack([v.float() for v in image_sums(recon, x, ssim).values()])
            sums[name] = batch if name not in sums else sums[name] + batch
    device = getattr(loader, "device", "cpu")
    return {name: means(sums.get(name), names, device) for name in averages}


def average_outputs(networks, averages: dict, x: torch.Tensor) -> dict:
    """{name: the mean output on `x` of the networks averages[name] lists}: each network runs once, and one
    running sum per average is held, so memory does not grow with the number of networks."""
    totals = {}
    for i, network in enumerate(networks):
        wanted = [name for name, members in averages.items() if i in members]
        if not wanted:
            continue
        out = reconstruction(network(x)).float()  # a VAE's: the rate of an average is not defined
        for name in wanted:
            totals[name] = out if name not in totals else totals[name] + out
    return {name: totals[name] / len(members) for name, members in averages.items()}


def best_of(metric: str, start: float, end: float) -> str:
    """"start" or "end": the endpoint with the better value of `metric` (start on a tie)."""
    if metric in LOWER_IS_BETTER:
        return "start" if start <= end else "end"
    return "start" if start >= end else "end"
