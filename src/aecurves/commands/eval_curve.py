"""`aecurves eval-curve`: losses along a trained curve, or along the straight segment between two endpoints.

The counterpart of the paper's eval_curve.py (Garipov et al., 2018). At each of `num_points` values of t
in [0, 1], BatchNorm statistics are recomputed at θ(t) from a fixed random subset of training images (drawn
once, the same for every t), and then, in fp32 and eval mode, the training-set metrics are measured on a
fixed subset stratified by the start endpoint's per-image MSE, and the held-out metrics on the whole
held-out split (`protocol_subsets`; with `full`, or a training set no larger than the subsets, all training
images): the checkpoint's reconstruction loss, MSE, PSNR (mean of per-image PSNR), SSIM (mean of per-image
SSIM; left out, with a note, for images smaller than its 11x11 window) and, when real VGG weights are
available, the VGG perceptual loss. Every path is measured by every metric, whatever loss it was trained with.
For a VAE (a network that returns (reconstruction, kl)) the loss is its objective, distortion + β·KL/D with the
checkpoint's β (--kl-weight), and its two terms are measured beside it: distortion (the reconstruction loss) and
rate (the mean KL in nats); the other metrics are the reconstruction's (eval mode: the posterior mean decoded).

Per metric the summary has start, end, min, max, avg (plain mean over the points) and int, the dl-weighted
mean Σ_i ½(m_{i-1} + m_i)·dl_i / Σ_i dl_i with dl_i = ‖θ(t_i) − θ(t_{i-1})‖ (the paper's *_int). The
path length is Σ dl, and the barrier max_t [L(t) − ((1 − t)·L(0) + t·L(1))] on the train and test loss (for a
VAE also on each term: {split}_distortion_barrier, {split}_rate_barrier).

For a curve, the straight segment between its first and last bend is evaluated the same way (unless
`segment_too` is False): eval.json (records.EvalRecord, format 2) holds each path's summary under paths.curve and
paths.segment (a --segment evaluation: paths.segment only); curve.npz keeps the paper's flat names, the segment's
prefixed `segment_`.

With `ensemble` K >= 2, the path (the curve, or the segment of --segment) is also measured on the held-out
images as ensembles (metrics.evaluate_ensembles): (a) the output average of its networks at K evenly spaced
t, (b) that of its two endpoints, (c) one network at the mean of the K points' weights, beside the two
endpoints alone; every network with BN statistics recomputed as at every point.

With `renormalize`, every path is evaluated with REPAIR's correction at every t (aecurves.renormalize): the
Conv/Linear layers that no BatchNorm reads (but the output layer) get each output channel's mean and std on the
BN images interpolated between the endpoints', folded into their weights. Those are other networks than the
plain path's, so their labels say "renormalised", and eval.json records "renormalize" and "renormalization"
(the layers corrected, the images). Not with `ensemble`: the ensembles are defined on the plain path.

Outputs in `out` (default: CKPT_FOLDER/eval for a curve, runs/segment for --segment):
curve.npz, eval.json, loss_along_path.png, reconstructions.png, for a curve with its segment
reconstructions_segment.png, reconstructions.npz (the held-out images reconstructed at every t, uint8, for the
report's explorer), and with `ensemble` ensemble.png. Nothing is written before every point was
evaluated; then each file goes to a temporary beside it, and only when all were written are they renamed
into place (eval.json last), so a failed or interrupted run never leaves partial or mixed results over
earlier ones.
"""

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tabulate import tabulate

from aecurves import capture, evaluation, plots, renormalize, runtime, wandb_log
from aecurves.checkpoint import load_curve, load_endpoint_pair
from aecurves.config import DEFAULT_SEGMENT_OUT, SUBSET_SEED, EvalCurveConfig, validate
from aecurves.curves import Curve, make_segment, segment_of
from aecurves.data import BatchLoader, check_outside_data
from aecurves.errors import UserError
from aecurves.files import check_writable, folder_lock, save_npz, write_all, write_json
from aecurves.metrics import (
    ENSEMBLES,
    evaluate_ensembles,
    evaluate_path,
    fixed_subset,
    reconstruct,
    reconstructions_along,
)
from aecurves.models import build_model
from aecurves.records import EvalRecord, refuse_other_outputs
from aecurves.stats import BARRIER_TERMS, METRICS, SPLITS, STATS, bootstrap_barrier, summarize

RECON_POINTS = 9  # reconstructions at t = 0, 1/8, ..., 1


@dataclass
class Subject(evaluation.Subject):
    """What is evaluated (kind "curve" or "segment"): a curve (and, unless told otherwise, the segment between
    its ends), or a segment."""

    segment: Curve | None     # the curve's own segment, evaluated beside it
    arch: dict
    label: str
    checkpoint: str | None
    endpoints: list
    notes: list
    segment_label: str = "segment"
    plan: renormalize.Plan | None = None  # with --renormalize: the layers corrected at every t


@dataclass
class PathResults:
    series: dict              # per-point arrays, segment's prefixed "segment_"
    summary: dict             # scalars (summarize), prefixed the same way
    recons: dict              # prefix -> reconstructions at RECON_POINTS values of t
    labels: dict              # prefix -> label
    seconds: float
    pixels: dict = dataclasses.field(default_factory=dict)  # prefix -> uint8 [T, N, C, H, W]: at every t of ts


def run(cfg: EvalCurveConfig) -> dict:
    cfg = dataclasses.replace(cfg)
    check_config(cfg)
    out = output_folder(cfg)
    subject = load_subject(cfg)
    if cfg.renormalize:
        plan_renormalization(subject)
    data, data_record = load_subject_data(cfg, subject)
    check_outside_data(out, data_record["data_dir"], "--out")
    # One evaluation per folder for the whole run: a second one is refused, not interleaved or silently replaced.
    with folder_lock(out, "evaluation"):
        refuse_other_evaluation(out, cfg)  # again under the lock: another run may have finished since
        return evaluate_subject(cfg, out, subject, data, data_record)


def evaluate_subject(cfg: EvalCurveConfig, out: Path, subject: "Subject", data, data_record: dict) -> dict:
    setup = evaluation.prepare(cfg, subject, data, data_record, subject.notes, extra_metrics=True)
    if subject.segment is not None:
        subject.segment.to(setup.device)
    protocol = setup.protocol
    fixed = data.test[: cfg.num_images].to(setup.device).float().div(255)
    ts = np.linspace(0.0, 1.0, cfg.num_points)
    evaluation.announce(setup, cfg, f"evaluating the {subject.label} at {len(ts)} points", each="t")
    check_writable(out)  # now, not after every point was computed

    measured, stats_loader = renormalized_subject(cfg, subject, setup) if subject.plan else (subject, None)
    with runtime.autocast(setup.device, cfg.precision):  # bf16: the forward passes only (see EvalCurveConfig)
        results = evaluate_paths(measured, ts, protocol.train_loader, protocol.test_loader, setup.loss_fn,
                                 setup.perceptual_fn, protocol.bn_loader, fixed, setup.ssim,
                                 progress=not cfg.no_progress, points_per_call=setup.per_call, compile=cfg.compile,
                                 compile_notes=setup.compile_fallbacks)
        ensemble = timed_ensembles(cfg, subject, setup, fixed) if cfg.ensemble else None
    for prefix, label in results.labels.items():
        print_summary(label, results.summary, prefix)
    if ensemble is not None:
        print_ensemble(subject, ensemble, len(data.test))
        if setup.vae:
            print(f"note: {VAE_ENSEMBLE_NOTE}")

    record = eval_record(cfg, subject, setup, results, ts)
    if subject.plan is not None:
        record.rest["renormalization"] = renormalization_record(subject, measured, stats_loader)
    if ensemble is not None:
        record.rest["ensemble"] = ensemble_record(ensemble, len(data.test), setup.vae)
    files = write_outputs(out, subject, results, fixed, record, ensemble)
    print(f"\nwrote {', '.join(Path(f).name for f in files.values())} in {out}")
    wandb_log.log_evaluation(cfg, out)  # with --wandb: eval.json's series and loss_along_path.png
    return {"out": str(out), "kind": subject.kind, "notes": subject.notes, "files": files, **results.summary,
            **({"ensemble": record.rest["ensemble"]} if ensemble is not None else {})}


def eval_record(cfg: EvalCurveConfig, subject: Subject, setup: evaluation.Setup, results: "PathResults",
                ts) -> EvalRecord:
    """eval.json without its "renormalization" and "ensemble" details (evaluate_subject adds them) and its files
    (write_outputs): the summary of each path under paths (records.EvalRecord)."""
    shared = evaluation.record_keys(setup, cfg, results.seconds)
    config = shared.pop("config")
    return EvalRecord(
        kind=subject.kind,
        checkpoint=subject.checkpoint,
        endpoints=subject.endpoints,
        segment_evaluated=subject.segment is not None,
        paths=EvalRecord.split_summary(subject.kind, results.summary),
        config=config,
        rest={
            "path": {"curve": subject.path.curve_name, "num_bends": subject.path.num_bends}
            if subject.kind == "curve" else {"curve": "segment", "num_bends": 2},
            "perceptual": setup.perceptual_fn is not None,
            "ssim": setup.ssim,
            "num_points": len(ts),
            "reconstruction_ts": np.linspace(0.0, 1.0, RECON_POINTS).tolist() if results.recons else [],
            **shared,
            "series": {k: np.asarray(v).tolist() for k, v in results.series.items() if "per_image" not in k},
            "renormalize": subject.plan is not None,
            "renormalization": None,
        })


def timed_ensembles(cfg: EvalCurveConfig, subject: Subject, setup: evaluation.Setup, fixed) -> dict:
    t0 = time.perf_counter()
    ensemble = evaluate_ensembles(subject.path, cfg.ensemble, setup.protocol.test_loader, setup.protocol.bn_loader,
                                  setup.ssim, fixed, progress=not cfg.no_progress)
    ensemble["seconds"] = time.perf_counter() - t0
    return ensemble


def check_config(cfg: EvalCurveConfig) -> None:
    if bool(cfg.ckpt) == bool(cfg.segment):
        which = "both" if cfg.ckpt else "neither"
        raise UserError(f"eval-curve needs exactly one thing to evaluate, but {which} of --ckpt and --segment was "
                        "given. Pass --ckpt CURVE_CHECKPOINT (from `aecurves train-curve`) to evaluate a trained "
                        "curve (and, by default, the straight segment between its endpoints), or --segment START "
                        "END (two checkpoints from `aecurves train`) to evaluate only the straight line between "
                        "two endpoints.")
    validate(cfg)
    if cfg.ensemble == 1:
        raise UserError("--ensemble 1 is not an ensemble: pass K >= 2 (the output average of K evenly spaced "
                        "points t in [0, 1], which include both endpoints), or 0 to leave ensembles out.")
    if cfg.renormalize and cfg.ensemble:
        raise UserError("--renormalize and --ensemble cannot be combined: --renormalize changes the path's networks "
                        "(REPAIR's correction of the layers without BatchNorm), while the ensembles are defined on "
                        "the plain path. Run eval-curve twice: with --ensemble K for the ensembles, and with "
                        "--renormalize (and another --out) for the renormalised path.")


def output_folder(cfg: EvalCurveConfig) -> Path:
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).parent / "eval" if cfg.ckpt else Path(DEFAULT_SEGMENT_OUT))
    if out.exists() and not out.is_dir():
        raise UserError(f"The output folder {out} is an existing file; pass another --out folder.")
    refuse_other_evaluation(out, cfg)
    return out


def refuse_other_evaluation(out: Path, cfg: EvalCurveConfig) -> None:
    # a training run's reconstructions.png has eval-curve's name: --overwrite replaces only an earlier evaluation
    refuse_other_outputs(out, "eval-curve", ("training run",), " (eval-curve's default: the curve folder's eval/)")
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds an evaluation (eval.json). Pass --overwrite to replace it, or choose "
                        "another --out folder; nothing was changed.")


def load_subject(cfg: EvalCurveConfig) -> Subject:
    """Loads what is evaluated: the curve (and its segment), or the segment alone."""
    if cfg.ckpt:
        curve, state = load_curve(cfg.ckpt, cfg.model)
        args = state.get("args", {})
        return Subject("curve", curve, args, cfg.loss or args.get("loss") or "mse",
                       segment=segment_of(curve) if cfg.segment_too else None, arch=dict(state["model_config"]),
                       label=f"{curve.curve_name} curve ({curve.num_bends} bends)",
                       checkpoint=str(Path(cfg.ckpt).resolve()),
                       endpoints=[args.get("init_start"), args.get("init_end")], notes=[])
    start, end = (str(Path(p).resolve()) for p in cfg.segment)
    a, b, arch = load_endpoint_pair(start, end, cfg.model, "--segment START END",
                                    data_chosen=bool(cfg.dataset or cfg.data_dir))
    losses = (a["args"].get("loss") or "mse", b["args"].get("loss") or "mse")
    if cfg.loss is None and losses[0] != losses[1]:
        raise UserError(f"The endpoints were trained with different losses ({losses[0]} and {losses[1]}); pass "
                        f"--loss {losses[0]} or --loss {losses[1]} to say which one to evaluate along the segment.")
    betas = [evaluation.checkpoint_kl_weight(s["args"]) for s in (a, b)]
    notes = [] if betas[0] == betas[1] else [
        f"the endpoints were trained with different --kl-weight ({betas[0]:g} and {betas[1]:g}); a VAE's objective "
        f"is measured with START's, {betas[0]:g}"]
    return Subject("segment", make_segment(build_model(arch), a["model"], b["model"]), a["args"],
                   cfg.loss or losses[0], segment=None, arch=arch, label="segment", checkpoint=None,
                   endpoints=[start, end], notes=notes)


RENORMALIZED = ", renormalised"
# --renormalize leaves the output layer as it is (docs/alignment.md: measured against correcting it)
RENORMALIZE_OUTPUT = False
RENORMALIZE_METHOD = "layerwise"  # renormalize.Renormalizer's; "repair" (REPAIR's own pass) for comparison only


def plan_renormalization(subject: Subject) -> None:
    """--renormalize: finds the layers to correct (refused when there are none) and renames the paths, so no
    label, summary or figure can be taken for the plain path's."""
    plan = renormalize.find_layers(subject.path.base, include_output=RENORMALIZE_OUTPUT,
                                   example=capture.example_input(subject.arch, subject.path.base))
    if not plan.layers:
        raise UserError(renormalize.no_layers_message(plan))
    subject.plan = plan
    subject.label += RENORMALIZED
    subject.segment_label += RENORMALIZED
    end_names = "the curve's endpoints" if subject.kind == "curve" else "START and END"
    note = (f"renormalised (--renormalize): at every t, after the BN statistics are recomputed, the "
            f"{len(plan.layers)} layer(s) not read by BatchNorm ({', '.join(plan.names)}) are corrected so that "
            f"each output channel's mean and std on the BN images are (1 - t)·A's + t·B's, A and B {end_names} "
            "(REPAIR, Jordan et al. 2023); these are not the plain path's networks")
    if plan.skipped:
        note += "; left uncorrected: " + "; ".join(f"{n} ({why})" for n, why in plan.skipped.items())
    subject.notes.append(note)


def renormalized(path: Curve | None, plan, loader, bn_loader):
    if path is None:
        return None
    return renormalize.RenormalizedPath(path, renormalize.Renormalizer(path, plan, loader, bn_loader,
                                                                      RENORMALIZE_METHOD))


def renormalized_subject(cfg: EvalCurveConfig, subject: Subject, setup: evaluation.Setup) -> tuple:
    """(the same paths with each network corrected (renormalize.RenormalizedPath), the loader of the images the
    correction is measured on): the BN images, or the same fixed subset where no BatchNorm reads them."""
    protocol = setup.protocol
    loader = protocol.bn_loader or BatchLoader(setup.data.train if cfg.full else fixed_subset(setup.data.train,
                                                                                              cfg.bn_images,
                                                                                              SUBSET_SEED),
                                               cfg.batch_size, setup.device,
                                               channels_last=protocol.memory_format == "channels_last")
    measured = dataclasses.replace(subject, path=renormalized(subject.path, subject.plan, loader, protocol.bn_loader),
                                   segment=renormalized(subject.segment, subject.plan, loader, protocol.bn_loader))
    return measured, loader


def renormalization_record(subject: Subject, measured: Subject, loader) -> dict:
    """eval.json's "renormalization": which layers were corrected, on which images, and how."""
    passes = {label: p.renormalizer.passes for label, p in ((subject.label, measured.path),
                                                            (subject.segment_label, measured.segment)) if p is not None}
    how = ("each corrected layer's own statistics measured in eval mode on the same images, layer by layer"
           if RENORMALIZE_METHOD == "layerwise" else "the corrected layers' statistics from REPAIR's own "
           "training-mode pass (reset layers normalising each batch)")
    return {**subject.plan.record(), "method": f"REPAIR (Jordan et al., ICLR 2023), see aecurves.renormalize: per "
            f"output channel, mean and sqrt(var + eps) on the BN images interpolated as (1 - t)·A + t·B; {how}, "
            "and folded into its weight and bias", "images": len(loader.images),
            "paths": [subject.label] + ([subject.segment_label] if subject.segment is not None else []),
            "passes": passes}


def load_subject_data(cfg: EvalCurveConfig, subject: Subject):
    """(the data, how it was chosen): the checkpoint's, unless overridden."""
    data, record = evaluation.run_data(subject.args, subject.arch["image_size"], cfg, "The checkpoint does not "
                                       "record its dataset; pass --dataset (and --data-dir).", cfg.dataset,
                                       cfg.data_dir)
    if data.channels != subject.arch["channels"] or data.image_size != subject.arch["image_size"]:
        raise UserError(f"The data ({data.channels} channels, {data.image_size}px) does not fit the network "
                        f"({subject.arch['channels']} channels, {subject.arch['image_size']}px); drop the "
                        "--dataset/--data-dir overrides or pass data like the network was trained on.")
    return data, record


def evaluate_paths(subject: Subject, ts, train_loader, test_loader, loss_fn, perceptual_fn, bn_loader, fixed,
                   ssim: bool, progress: bool, points_per_call: int = 1, compile: bool = False,
                   compile_notes: list | None = None) -> PathResults:
    """Every point of the curve (and its segment), and reconstructions of `fixed` at RECON_POINTS values of t:
    taken during the evaluation at the t the two grids share, then at the others (BN recomputed the same way).
    When the loss is a mean over images (MSE and the VGG loss both are: they have per_image), the summary also
    holds a 95% bootstrap interval over the held-out images of each test barrier (te_barrier_lo, _hi)."""
    t0 = time.perf_counter()
    paths = {"": (subject.path, subject.label)}
    if subject.segment is not None:
        paths["segment_"] = (subject.segment, subject.segment_label)
    recon_ts = np.linspace(0.0, 1.0, RECON_POINTS)
    series, summary, recons, pixels = {}, {}, {}, {}
    for prefix, (path, label) in paths.items():
        taken, frames = {}, {}

        def on_point(t, point, taken=taken, frames=frames):
            if not len(fixed):
                return
            # the network at t is built here already: its reconstructions at every t cost one forward pass each
            images = reconstruct(point, fixed)
            frames[float(t)] = evaluation.pixels(images)
            hit = np.flatnonzero(np.isclose(recon_ts, t, rtol=0, atol=1e-9))
            if len(hit):
                taken[int(hit[0])] = images

        one = evaluate_path(path, ts, train_loader, test_loader, loss_fn, perceptual_fn, bn_loader, progress,
                            desc=label, on_point=on_point, ssim=ssim, per_image=True,
                            points_per_call=points_per_call, compile=compile, compile_notes=compile_notes)
        series.update({prefix + k: v for k, v in one.items()})
        summary.update({prefix + k: v for k, v in summarize(one).items()})
        if "te_per_image_loss" in one:
            lo, hi = bootstrap_barrier(one["ts"], one["te_per_image_loss"])
            summary.update({prefix + "te_barrier_lo": lo, prefix + "te_barrier_hi": hi})
        if len(fixed):
            missing = [i for i in range(RECON_POINTS) if i not in taken]
            taken.update(zip(missing, reconstructions_along(path, recon_ts[missing], fixed, bn_loader)))
            recons[prefix] = [taken[i] for i in range(RECON_POINTS)]
            pixels[prefix] = np.stack([frames[float(t)] for t in ts])
    return PathResults(series, summary, recons, {p: label for p, (_, label) in paths.items()},
                       time.perf_counter() - t0, pixels)


def print_summary(title: str, summary: dict, prefix: str = "") -> None:
    rows = []
    for split, split_name in SPLITS.items():
        for m in METRICS:
            if f"{prefix}{split}_{m}_min" in summary:
                rows.append([f"{split_name} {m}"] + [summary[f"{prefix}{split}_{m}_{s}"] for s in STATS])
    print(f"\n{title}")
    print(tabulate(rows, ["metric", *STATS], tablefmt="simple", floatfmt=".5f"))
    print(f"path length {summary[prefix + 'length']:.5f}; barrier: train {summary[prefix + 'tr_barrier']:.5f}, "
          f"test {summary[prefix + 'te_barrier']:.5f}")
    for term in BARRIER_TERMS:
        if f"{prefix}tr_{term}_barrier" in summary:
            print(f"{term} barrier: train {summary[f'{prefix}tr_{term}_barrier']:.5f}, test "
                  f"{summary[f'{prefix}te_{term}_barrier']:.5f}")


ENSEMBLE_LABELS = {"path_average": "(a) mean output, {k} points", "endpoint_average": "(b) mean output, 2 ends",
                   "weight_average": "(c) mean weights, {k} points", "start": "start (t=0)", "end": "end (t=1)",
                   "best_endpoint": "better endpoint, per metric"}
PICTURE_ROWS = ("start", "end", "path_average", "endpoint_average", "weight_average")


def print_ensemble(subject: Subject, ensemble: dict, num_images: int) -> None:
    k = len(ensemble["ts"])
    metrics = list(ensemble["metrics"]["start"])
    rows = [[ENSEMBLE_LABELS[name].format(k=k)] + [values[m] for m in metrics]
            for name, values in ensemble["metrics"].items()]
    print(f"\nensembles of the {subject.label} on {num_images} held-out images (BN statistics recomputed for "
          "every network)")
    print(tabulate(rows, ["ensemble", *metrics], tablefmt="simple", floatfmt=".5f"))


VAE_ENSEMBLE_NOTE = ("VAE: every entry's metrics are of its reconstruction (an output average's: the mean of its "
                     "networks' reconstructions, each decoding its posterior mean); an average of outputs has no rate, "
                     "so no objective is reported for any entry")


def ensemble_record(ensemble: dict, num_images: int, vae: bool = False) -> dict:
    """eval.json's "ensemble": K, the ts, the held-out images, and per entry what it is and its metrics; for a VAE,
    a note that they are the reconstructions' (VAE_ENSEMBLE_NOTE)."""
    return {"k": len(ensemble["ts"]), "ts": np.asarray(ensemble["ts"]).tolist(), "test_images": num_images,
            "metrics": list(ensemble["metrics"]["start"]), "best_endpoint_is": ensemble["which"],
            "entries": {name: {"what": ENSEMBLES[name], **values} for name, values in ensemble["metrics"].items()},
            "seconds": ensemble["seconds"], **({"note": VAE_ENSEMBLE_NOTE} if vae else {})}


def ensemble_arrays(ensemble: dict) -> dict:
    """curve.npz's ensemble_k, ensemble_ts and ensemble_{entry}_{metric} (e.g. ensemble_path_average_mse)."""
    arrays = {"ensemble_k": len(ensemble["ts"]), "ensemble_ts": np.asarray(ensemble["ts"])}
    for name, values in ensemble["metrics"].items():
        arrays.update({f"ensemble_{name}_{m}": v for m, v in values.items()})
    return arrays


def write_outputs(out: Path, subject: Subject, results: PathResults, fixed, record: EvalRecord,
                  ensemble: dict | None = None) -> dict:
    """All files or none (files.write_all), eval.json last, so a failure leaves earlier results untouched.
    Returns {kind: path}."""
    between = between_names(subject)
    arrays = {**results.series, **results.summary, **(ensemble_arrays(ensemble) if ensemble is not None else {})}
    writers = {"npz": ("curve.npz", partial(save_npz, arrays=arrays)),
               "loss_plot": ("loss_along_path.png", partial(plot_losses, subject=subject, results=results,
                                                            between=between))}
    for prefix, images in results.recons.items():
        kind = "reconstructions" + ("_segment" if prefix else "")
        title = f"{results.labels[prefix]}{between}: held-out images and their reconstructions"
        writers[kind] = (f"{kind}.png", partial(plots.save_reconstruction_grid, fixed, recon_columns(images),
                                                title=title))
    if results.pixels:
        writers["reconstructions_npz"] = ("reconstructions.npz", partial(save_npz, arrays=reconstruction_arrays(
            subject, results, fixed)))
    if ensemble is not None and ensemble["reconstructions"]:
        writers["ensemble"] = ("ensemble.png", partial(plot_ensemble, subject=subject, ensemble=ensemble,
                                                       fixed=fixed, between=between))
    files = {"json": str(out / "eval.json"), **{k: str(out / name) for k, (name, _) in writers.items()}}
    writers["json"] = ("eval.json", lambda p: write_json(p, dataclasses.replace(record, files=files).to_json()))
    write_all({out / name: write for name, write in writers.values()})
    return files


def reconstruction_arrays(subject: Subject, results: PathResults, fixed) -> dict:
    """reconstructions.npz: the held-out images (`images`, uint8 [N, C, H, W]) and their reconstructions at every t
    of `ts` on each path (`curve`, `segment`: uint8 [T, N, C, H, W]), the pixels the strips show at the t they
    share (evaluation.pixels)."""
    names = {"": subject.kind, "segment_": "segment"}
    ts = results.series["ts"] if "ts" in results.series else results.series["segment_ts"]
    return {"ts": np.asarray(ts, dtype=np.float64), "images": evaluation.pixels(fixed),
            **{names[prefix]: frames for prefix, frames in results.pixels.items()}}


def plot_losses(path: Path, subject: Subject, results: PathResults, between: str) -> None:
    loss_label = "VGG perceptual loss" if subject.loss == "vgg" else "MSE loss"
    if "tr_rate" in results.series or "segment_tr_rate" in results.series:
        loss_label = f"VAE objective ({loss_label} + β·KL/D)"
    plot_series = [plots.series_from_results(results.series, subject.label, color="C0")]
    if subject.segment is not None:
        plot_series.append(plots.series_from_results(results.series, subject.segment_label, prefix="segment_",
                                                     linestyle="--", color="C0"))
    plots.plot_loss_along_paths(plot_series, path, ylabel=loss_label,
                                title=f"{loss_label} along the {subject.label}{between}")


def recon_columns(images: list) -> list:
    return list(zip([f"t={t:g}" for t in np.linspace(0.0, 1.0, RECON_POINTS)], images))


def plot_ensemble(path: Path, subject: Subject, ensemble: dict, fixed, between: str) -> None:
    k = len(ensemble["ts"])
    rows = [(ENSEMBLE_LABELS[name].format(k=k), ensemble["reconstructions"][name]) for name in PICTURE_ROWS]
    plots.save_labelled_rows([("original", fixed), *rows], path,
                             title=f"ensembles of the {subject.label}{between}: held-out images")


def between_names(subject: Subject) -> str:
    """' between A and B' with the endpoints' run folders (e.g. mse_seed1), so every figure names its pair."""
    names = [Path(p).parent.name or Path(p).stem for p in subject.endpoints if p]
    return f" between {names[0]} and {names[1]}" if len(names) == 2 else ""

