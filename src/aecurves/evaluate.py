"""`aecurves eval-curve`: losses along a trained curve, or along the straight segment between two endpoints.

The counterpart of the paper's eval_curve.py (Garipov et al., 2018). At each of `num_points` values of t
in [0, 1], BatchNorm statistics are recomputed at θ(t) from a fixed random subset of training images (drawn
once, the same for every t), and then, in fp32 and eval mode, the training-set metrics are measured on a
fixed subset stratified by the start endpoint's per-image MSE, and the held-out metrics on the whole
held-out split (`protocol_subsets`; with `full`, or a training set no larger than the subsets, all training
images): the checkpoint's reconstruction loss, MSE, PSNR (mean of per-image PSNR) and, when real VGG weights
are available, the VGG perceptual loss.

Per metric the summary has start, end, min, max, avg (plain mean over the points) and int, the dl-weighted
mean Σ_i ½(m_{i-1} + m_i)·dl_i / Σ_i dl_i with dl_i = ‖θ(t_i) − θ(t_{i-1})‖ (the paper's *_int). The
path length is Σ dl, and the barrier max_t [L(t) − ((1 − t)·L(0) + t·L(1))] on the train and test loss.

For a curve, the straight segment between its first and last bend is evaluated the same way (unless
`segment_too` is False) and stored under the same names prefixed `segment_`.

Outputs in `out` (default: CKPT_FOLDER/eval for a curve, runs/segment for --segment):
curve.npz, eval.json, loss_along_path.png, reconstructions.png and, for a curve with its segment,
reconstructions_segment.png. Nothing is written before every point was evaluated; then each file goes to a
temporary beside it, and only when all were written are they renamed into place (eval.json last), so a
failed or interrupted run never leaves partial or mixed results over earlier ones.
"""

import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

from aecurves import plots, runtime
from aecurves.checkpoint import atomic_path, write_json
from aecurves.config import BN_IMAGES, EVAL_BATCH_SIZE, SUBSET_SEED, TRAIN_IMAGES
from aecurves.curves import Curve, CurvePoint, batchnorms
from aecurves.data import BatchLoader, load_data
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.models import ARCH_KEYS, build_model
from aecurves.metrics import evaluate, fixed_subset, per_image_mse, stratified_subset
from aecurves.train_curve import endpoint_pair, load_curve

# Every key run() reads, with the value used when the key is missing or None.
DEFAULTS = {
    "ckpt": None,           # curve checkpoint (from train-curve)
    "segment": None,        # [START, END] endpoint checkpoints: evaluate the straight segment instead
    "num_points": 61,       # points t in linspace(0, 1, num_points)
    "use_test": False,      # True: hold out the official test partition (otherwise: the checkpoint's choice)
    "out": None,            # output folder (default: CKPT_FOLDER/eval, or runs/segment)
    "full": False,          # BN statistics and train metrics from ALL training images (as the paper)
    "bn_images": BN_IMAGES,        # training images for the BN statistics (fixed random subset)
    "train_images": TRAIN_IMAGES,  # training images for the train metrics (fixed stratified subset)
    "num_images": 4,        # held-out images in the reconstruction grids (0: no grids)
    "batch_size": EVAL_BATCH_SIZE,
    "device": "auto",
    "vgg_weights": "imagenet",
    "dataset": None,        # data overrides; None: the checkpoint's
    "data_dir": None,
    "cache_dir": None,
    "no_progress": False,
    "segment_too": True,    # for a curve, also evaluate the segment between its endpoints
}
DEFAULT_SEGMENT_OUT = "runs/segment"
RECON_POINTS = 9  # reconstructions at t = 0, 1/8, ..., 1
METRICS = ("loss", "mse", "psnr", "perceptual")
STATS = ("start", "end", "min", "max", "avg", "int")
SPLITS = {"tr": "train", "te": "test"}


# ----------------------------------------------------------------------------------------------------------
# summary statistics (plain numpy: easy to check by hand)


def path_length(dl) -> float:
    return float(np.sum(dl))


def dl_weighted_mean(values, dl) -> float:
    """Σ_i ½(m_{i-1} + m_i)·dl_i / Σ_i dl_i (i ≥ 1): the paper's *_int. The plain mean when the path has length 0."""
    values, dl = np.asarray(values, dtype=np.float64), np.asarray(dl, dtype=np.float64)
    total = dl[1:].sum()
    if not total > 0:
        return float(values.mean())
    return float((0.5 * (values[:-1] + values[1:]) * dl[1:]).sum() / total)


def barrier(ts, losses) -> float:
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
        out[f"{split}_barrier"] = barrier(series["ts"], series[f"{split}_loss"])
    return out


# ----------------------------------------------------------------------------------------------------------
# evaluation


def make_segment(base: torch.nn.Module, start_state: dict, end_state: dict) -> Curve:
    """The straight segment θ(t) = (1 − t)·θ_A + t·θ_B as a Curve (PolyChain with 2 fixed bends)."""
    segment = Curve(base, "polychain", 2, fix_start=True, fix_end=True)
    segment.set_endpoints(start_state, end_state)
    return segment


def segment_of(curve: Curve) -> Curve:
    """The segment between a curve's first and last bend, with the endpoints' own BN buffers."""
    states = []
    for k, buffers in ((0, curve.endpoint_buffers[0]), (-1, curve.endpoint_buffers[1])):
        weights = curve.unflatten(curve.bends[k].detach().cpu().clone())
        states.append({**weights, **(buffers or {})})
    base = copy.deepcopy(curve.base).cpu()
    return make_segment(base, *states).to(curve.bends[0].device)


@torch.no_grad()
def step_lengths(curve: Curve, ts) -> np.ndarray:
    """dl[i] = ‖θ(t_i) − θ(t_{i-1})‖ (dl[0] = 0), in float64 from curve.flat_at."""
    dl = np.zeros(len(ts))
    prev = curve.flat_at(float(ts[0])).double()
    for i in range(1, len(ts)):
        cur = curve.flat_at(float(ts[i])).double()
        dl[i] = (cur - prev).norm().item()
        prev = cur
    return dl


def evaluate_path(curve: Curve, ts, train_loader, test_loader, loss_fn, perceptual_fn=None, bn_loader=None,
                  progress: bool = False, desc: str = "path", on_point=None) -> dict:
    """Metrics at each t of `ts`: {"ts", "dl", "tr_loss", "te_loss", "tr_mse", ...} as float64 arrays.

    With `bn_loader`, BN statistics are recomputed at every t from its batches; without, the curve's
    current buffers are used as they are (e.g. after curve.use_endpoint_buffers(0)).
    `on_point(t, point)`, when given, is called at each t with the CurvePoint (BN statistics in place).
    """
    ts = np.asarray(ts, dtype=np.float64)
    rows = []
    for t in tqdm(ts, desc=desc, unit="point", leave=False, disable=not progress, file=sys.stderr):
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


# ----------------------------------------------------------------------------------------------------------
# command


def protocol_subsets(path: Curve, train: torch.Tensor, cfg: dict, device) -> tuple:
    """(BN images, train-metric images, how they were chosen) of the evaluation protocol.

    BN statistics: a fixed random subset of `bn_images`. Train metrics: `train_images` drawn one from each
    of as many equal strata of the training images sorted by the start endpoint's per-image MSE, so the
    subset holds easy and hard images in the whole set's shares (its mean loss then follows the whole
    set's closely at every point of the path). A subset at least as large as the set is the set: --full.
    """
    n = len(train)
    if cfg["full"] or (cfg["bn_images"] >= n and cfg["train_images"] >= n):
        how = "all training images" + ("" if cfg["full"] else " (the subset sizes cover them: the --full protocol)")
        return train, train, how
    bn_images = fixed_subset(train, cfg["bn_images"], SUBSET_SEED)
    how = f"BN: {len(bn_images)} random training images (torch.Generator seeded {SUBSET_SEED}); train metrics: "
    if cfg["train_images"] >= n:
        return bn_images, train, how + "all training images"
    path.use_endpoint_buffers(0)
    scores = per_image_mse(CurvePoint(path, 0.0), BatchLoader(train, cfg["batch_size"], device))
    train_images = stratified_subset(train, cfg["train_images"], scores, SUBSET_SEED)
    return bn_images, train_images, how + (f"{len(train_images)} training images, one from each of as many strata "
                                           "of the start endpoint's per-image MSE")


def _check_config(cfg: dict) -> None:
    if bool(cfg["ckpt"]) == bool(cfg["segment"]):
        which = "both" if cfg["ckpt"] else "neither"
        raise UserError(f"eval-curve needs exactly one thing to evaluate, but {which} of --ckpt and --segment was "
                        "given. Pass --ckpt CURVE_CHECKPOINT (from `aecurves train-curve`) to evaluate a trained "
                        "curve (and, by default, the straight segment between its endpoints), or --segment START "
                        "END (two checkpoints from `aecurves train`) to evaluate only the straight line between "
                        "two endpoints.")
    if cfg["segment"] is not None and (isinstance(cfg["segment"], (str, os.PathLike)) or len(cfg["segment"]) != 2):
        raise UserError(f"--segment takes exactly two endpoint checkpoints, START and END; got {cfg['segment']!r}.")
    n = cfg["num_points"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise UserError(f"--num-points must be an integer of at least 2 (t = 0 and t = 1 at least), got {n!r}. "
                        "The paper uses 61.")
    for key, least in (("bn_images", 1), ("train_images", 1), ("batch_size", 1), ("num_images", 0)):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise UserError(f"--{key.replace('_', '-')} must be an integer of at least {least}, got {v!r}.")


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _load_subject(cfg: dict) -> dict:
    """Loads what is evaluated: the curve (and its segment), or the segment alone."""
    if cfg["ckpt"]:
        curve, state = load_curve(cfg["ckpt"])
        args = state.get("args", {})
        subject = {"kind": "curve", "path": curve, "args": args, "model_config": dict(state["model_config"]),
                   "label": f"{curve.curve_name} curve ({curve.num_bends} bends)",
                   "checkpoint": str(Path(cfg["ckpt"]).resolve()),
                   "endpoints": [args.get("init_start"), args.get("init_end")], "loss": args.get("loss") or "mse",
                   "segment": segment_of(curve) if cfg["segment_too"] else None, "notes": []}
        return subject
    start, end = (str(Path(p).resolve()) for p in cfg["segment"])
    a, b = endpoint_pair(start, end, "--segment START END")
    model_config = {k: a["args"][k] for k in ARCH_KEYS}
    notes = []
    loss = a["args"].get("loss") or "mse"
    if (b["args"].get("loss") or "mse") != loss:
        notes.append(f"the endpoints were trained with different losses ({loss} vs {b['args'].get('loss')}); "
                     f"'loss' is the start endpoint's ({loss})")
    return {"kind": "segment", "path": make_segment(build_model(model_config), a["model"], b["model"]),
            "args": a["args"], "model_config": model_config, "label": "segment", "checkpoint": None,
            "endpoints": [start, end], "loss": loss, "segment": None, "notes": notes}


def _losses(loss_name: str, vgg_weights: str, notes: list):
    """(loss_fn, perceptual_fn or None); records in `notes` why perceptual metrics are omitted."""
    perceptual_fn = None
    if vgg_weights == "random":
        notes.append("perceptual metrics omitted: --vgg-weights random gives untrained VGG features, which do not "
                     "measure perceptual similarity")
    else:
        try:
            perceptual_fn = make_loss("vgg", vgg_weights)
        except UserError as exc:
            notes.append(f"perceptual metrics omitted: {exc}")
    if loss_name == "vgg":
        if perceptual_fn is not None:
            return perceptual_fn, perceptual_fn
        try:
            loss_fn = make_loss("vgg", vgg_weights)
        except UserError as exc:
            raise UserError(f"This network was trained with the vgg loss, and evaluating that loss needs the VGG "
                            f"weights. {exc}") from None
        notes.append("the training loss 'vgg' was evaluated with RANDOM VGG weights: not a perceptual loss")
        return loss_fn, None
    return make_loss(loss_name), perceptual_fn


def _print_summary(title: str, summary: dict, prefix: str = "") -> None:
    rows = []
    for split, split_name in SPLITS.items():
        for m in METRICS:
            if f"{prefix}{split}_{m}_min" in summary:
                rows.append([f"{split_name} {m}"] + [summary[f"{prefix}{split}_{m}_{s}"] for s in STATS])
    print(f"\n{title}")
    print(tabulate(rows, ["metric", *STATS], tablefmt="simple", floatfmt=".5f"))
    print(f"path length {summary[prefix + 'length']:.5f}; barrier: train {summary[prefix + 'tr_barrier']:.5f}, "
          f"test {summary[prefix + 'te_barrier']:.5f}")


def _save_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append .npz to the name
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def run(cfg: dict) -> dict:
    cfg = dict(cfg)
    for k, v in DEFAULTS.items():
        if cfg.get(k) is None:
            cfg[k] = v
    _check_config(cfg)
    progress = not cfg["no_progress"]
    out = Path(cfg["out"]) if cfg["out"] else (Path(cfg["ckpt"]).parent / "eval" if cfg["ckpt"]
                                              else Path(DEFAULT_SEGMENT_OUT))
    if out.exists() and not out.is_dir():
        raise UserError(f"The output folder {out} is an existing file; pass another --out folder.")
    device = runtime.resolve_device(cfg["device"])

    subject = _load_subject(cfg)
    curve, segment, args, notes = subject["path"], subject["segment"], subject["args"], subject["notes"]
    model_config = subject["model_config"]

    # --- data: the checkpoint's, unless overridden
    data_cfg = {"dataset": cfg["dataset"] or args.get("dataset"),
                "data_dir": cfg["data_dir"] or args.get("data_dir"),
                "image_size": model_config["image_size"], "limit": args.get("limit"),
                "val_fraction": args.get("val_fraction") or 0.1,
                "use_test": bool(cfg["use_test"] or args.get("use_test")),
                "cache_dir": cfg["cache_dir"]}
    if not data_cfg["dataset"]:
        raise UserError("The checkpoint does not record its dataset; pass --dataset (and --data-dir).")
    if data_cfg["data_dir"]:
        data_cfg["data_dir"] = str(Path(data_cfg["data_dir"]).expanduser().resolve())
    data = load_data(**data_cfg, progress=progress)
    if data.channels != model_config["channels"] or data.image_size != model_config["image_size"]:
        raise UserError(f"The data ({data.channels} channels, {data.image_size}px) does not fit the network "
                        f"({model_config['channels']} channels, {model_config['image_size']}px); drop the "
                        "--dataset/--data-dir overrides or pass data like the network was trained on.")

    loss_fn, perceptual_fn = _losses(subject["loss"], cfg["vgg_weights"], notes)
    loss_fn = loss_fn.to(device)
    perceptual_fn = perceptual_fn.to(device) if perceptual_fn is not None else None

    # --- fixed image subsets, drawn once
    n_train = len(data.train)
    curve.to(device)  # the stratified subset is scored on the device
    if segment is not None:
        segment.to(device)
    bn_images, train_images, subset = protocol_subsets(curve, data.train, cfg, device)
    bn_loader = BatchLoader(bn_images, cfg["batch_size"], device)
    train_loader = bn_loader if train_images is bn_images else BatchLoader(train_images, cfg["batch_size"], device)
    test_loader = BatchLoader(data.test, cfg["batch_size"], device)
    has_bn = bool(batchnorms(curve.base))
    if not has_bn:
        bn_loader = None

    ts = np.linspace(0.0, 1.0, cfg["num_points"])
    print(f"data: {data.source}")
    print(f"evaluating the {subject['label']} at {len(ts)} points on {device}: "
          + ("BN statistics recomputed at each t; " if has_bn else "no BN statistics; ")
          + f"{subset}; test metrics on {len(data.test)} held-out images; loss: {loss_fn.description}")
    for note in notes:
        print(f"note: {note}")

    t0 = time.perf_counter()
    paths = {"": (curve, subject["label"])}
    if segment is not None:
        paths["segment_"] = (segment, "segment")
    # reconstructions of fixed held-out images at 9 evenly spaced t: taken during the evaluation at the t
    # the two grids share, then at the others (BN statistics recomputed the same way)
    recon_ts = np.linspace(0.0, 1.0, RECON_POINTS)
    fixed = data.test[: cfg["num_images"]].to(device).float().div(255)
    results, summary, recons = {}, {}, {}
    for prefix, (path, label) in paths.items():
        taken = {}

        def on_point(t, point):
            hit = np.flatnonzero(np.isclose(recon_ts, t, rtol=0, atol=1e-9))
            if len(fixed) and len(hit):
                taken[int(hit[0])] = reconstruct(point, fixed)

        series = evaluate_path(path, ts, train_loader, test_loader, loss_fn, perceptual_fn, bn_loader, progress,
                               desc=label, on_point=on_point)
        results.update({prefix + k: v for k, v in series.items()})
        summary.update({prefix + k: v for k, v in summarize(series).items()})
        if len(fixed):
            missing = [i for i in range(RECON_POINTS) if i not in taken]
            taken.update(zip(missing, reconstructions_along(path, recon_ts[missing], fixed, bn_loader)))
            recons[prefix] = [taken[i] for i in range(RECON_POINTS)]
    seconds = time.perf_counter() - t0

    for prefix, (_, label) in paths.items():
        _print_summary(label, summary, prefix)

    # --- outputs: only now. Every file is first written to a temporary beside it; only when all of them were
    # written are they renamed into place (eval.json last), so a failure leaves earlier results untouched.
    out.mkdir(parents=True, exist_ok=True)
    names = {"json": "eval.json", "npz": "curve.npz", "loss_plot": "loss_along_path.png"}
    for prefix in recons:
        names["reconstructions" + ("_segment" if prefix else "")] = \
            "reconstructions_segment.png" if prefix else "reconstructions.png"
    files = {k: str(out / v) for k, v in names.items()}
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(out / v)) for k, v in names.items()}  # renamed in reverse order
        _save_npz(tmp["npz"], {**results, **summary})
        loss_label = "VGG perceptual loss" if subject["loss"] == "vgg" else "MSE loss"
        plot_series = [plots.series_from_results(results, subject["label"], color="C0")]
        if segment is not None:
            plot_series.append(plots.series_from_results(results, "segment", prefix="segment_", linestyle="--",
                                                         color="C0"))
        plots.plot_loss_along_paths(plot_series, tmp["loss_plot"], ylabel=loss_label,
                                    title=f"{loss_label} along the {subject['label']}")
        labels = [f"t={t:g}" for t in recon_ts]
        for prefix, images in recons.items():
            key = "reconstructions" + ("_segment" if prefix else "")
            plots.save_reconstruction_grid(fixed, list(zip(labels, images)), tmp[key],
                                           title=f"{paths[prefix][1]}: held-out images and their reconstructions")
        record = {
            "kind": subject["kind"],
            "checkpoint": subject["checkpoint"],
            "endpoints": subject["endpoints"],
            "path": {"curve": curve.curve_name, "num_bends": curve.num_bends} if subject["kind"] == "curve"
            else {"curve": "segment", "num_bends": 2},
            "segment_evaluated": segment is not None,
            "loss": subject["loss"],
            "loss_description": loss_fn.description,
            "perceptual": perceptual_fn is not None,
            "data": {**_json_safe(data_cfg), "source": data.source, "train_images": n_train,
                     "test_images": len(data.test)},
            "bn": {"recomputed": has_bn, "images": len(bn_images) if has_bn else 0, "subset": subset,
                   "subset_seed": None if cfg["full"] else SUBSET_SEED},
            "train_metric_images": len(train_images),
            "test_metric_images": len(data.test),
            "num_points": len(ts),
            "reconstruction_ts": recon_ts.tolist() if recons else [],
            "notes": notes,
            "device": str(device),
            "seconds": seconds,
            "config": _json_safe(cfg),
            "files": files,
            "summary": summary,
            "series": {k: np.asarray(v).tolist() for k, v in results.items()},
        }
        write_json(tmp["json"], record)
    print(f"\nwrote {', '.join(Path(f).name for f in files.values())} in {out}")
    return {"out": str(out), "kind": subject["kind"], "notes": notes, "files": files, **summary}
