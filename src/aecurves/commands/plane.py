"""`aecurves plane`: train and test loss and MSE on a grid over the plane through a curve's first, middle and
last bend (--ckpt), or through three networks (--points A B C, which take the roles of those bends).

The counterpart of the paper's plane.py (Garipov et al., 2018; timgaripov/dnn-mode-connectivity), followed in
its basis (u along θ₂ − θ₀, v the part of θ₁ − θ₀ orthogonal to it), its grid (G points per side over
[−margin_left, 1 + margin_right]·dx by [−margin_bottom, 1 + margin_top]·dy, default 21 and 0.2), its
coordinates (grid[i, j] = (α_i·dx, β_j·dy)), the projection of the curve at `curve_points` values of t, and its
evaluation of each grid point: BatchNorm statistics recomputed there from training images, then the metrics on
training and held-out images (see plane_geometry.py for the math). Deviations, and why:
- The evaluation protocol is eval-curve's, not the paper's whole training set: BN statistics from the same
  fixed subset of training images, train metrics on the same stratified subset (`protocol_subsets`; --full:
  all of them), the same batch size. So the values at θ₀ and θ₂ are eval-curve's at t = 0 and 1.
- The metric is the checkpoint's reconstruction loss (as in eval-curve), without the paper's weight-decay
  term in "loss": curves here are trained with wd = 0 by default. For a VAE "loss" is its objective (as in
  eval-curve), and the grid also holds its terms: tr_distortion, te_distortion, tr_rate, te_rate. MSE and
  PSNR stand in for nll and error; the VGG perceptual metric that eval-curve adds when it can is left out (its
  cost would dominate).
- The middle bend of a curve with more than 3 bends is bend num_bends // 2 (the paper's script takes bend 1 of
  3, and would take bend 2 as the "end" of longer curves); the curve then leaves the plane, and how far it
  does is recorded (curve_distance). The straight segment θ₀–θ₂ is projected too.
- The three bends are also evaluated directly (bend_* values), so their metrics are exact even where they
  fall between grid nodes. The basis, coordinates and grid points are computed in float64 (the paper: in
  the weights' float32). Three points that span no plane are refused (plane_geometry.py). Margins are not negative:
  the plane always shows the three points.
- Grid points go through eval-curve's engine (metrics.evaluate_points): several per call with
  --points-per-call, bf16 autocast with --precision, channels_last batches by default.

Outputs in `out` (default CKPT_FOLDER/plane, or runs/plane for --points): plane.npz (with `recon`: RECON_IMAGES
held-out images reconstructed at every grid point, uint8 [G, G, N, C, H, W], and `recon_images`, the originals),
plane.png (train and test
loss, filled contours on one log scale, with the three points, the curve and the segment) and plane.json,
written only when every point was evaluated, each to a temporary renamed into place (plane.json last).
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from aecurves import evaluation, plots, runtime
from aecurves.checkpoint import load_curve, load_endpoints
from aecurves.config import PlaneConfig, validate
from aecurves.curves import Curve, make_segment
from aecurves.data import check_outside_data
from aecurves.errors import UserError
from aecurves.files import check_writable, folder_lock, save_npz, write_all, write_json
from aecurves.metrics import evaluate_points, reconstruct
from aecurves.models import build_model
from aecurves.plane_geometry import evaluate_grid, grid_axes, plane_through, prefixed
from aecurves.records import PlaneRecord, refuse_other_outputs

DEFAULT_POINTS_OUT = "runs/plane"
RECON_IMAGES = 4  # held-out images reconstructed at every grid point (plane.npz's recon): G² of them add up


@dataclass
class Subject(evaluation.Subject):
    """The three networks that span the plane (kind "curve" or "points"), and what they came from; `path` is the
    curve, or the segment A–C."""

    flats: list               # θ₀, θ₁, θ₂ as flat vectors of the base's parameters
    labels: tuple             # their names on the figure
    curve: Curve | None
    middle: int | None        # the curve's bend taken as θ₁
    inputs: list              # the checkpoint files


def run(cfg: PlaneConfig) -> dict:
    cfg = dataclasses.replace(cfg)
    check_config(cfg)
    out = output_folder(cfg)
    subject = load_subject(cfg)
    plane = plane_through(*subject.flats, names=subject.labels)  # refuses three points that span no plane
    data, data_record = load_subject_data(cfg, subject)
    check_outside_data(out, data_record["data_dir"], "--out")
    # One plane per folder for the whole run: a second one is refused, not interleaved or silently replaced.
    with folder_lock(out, "plane"):
        refuse_other_plane(out, cfg)  # again under the lock: another run may have finished since
        return evaluate_plane(cfg, out, subject, plane, data, data_record)


def evaluate_plane(cfg: PlaneConfig, out: Path, subject: "Subject", plane, data, data_record: dict) -> dict:
    margins = {side: getattr(cfg, f"margin_{side}") if getattr(cfg, f"margin_{side}") is not None else cfg.margin
               for side in ("left", "right", "bottom", "top")}
    alphas, betas, grid = grid_axes(plane, cfg.grid, *margins.values())
    ts = np.linspace(0.0, 1.0, cfg.curve_points)
    projections = project_paths(subject, plane, ts)
    setup = evaluation.prepare(cfg, subject, data, data_record, [], extra_metrics=False)
    evaluation.announce(setup, cfg, f"the plane through {', '.join(subject.labels)}: dx = {plane.dx:.4f}, dy = "
                                    f"{plane.dy:.4f}; a {cfg.grid}x{cfg.grid} grid", each="point")
    check_writable(out)  # now, not after every point was computed

    fixed = data.test[:RECON_IMAGES].to(setup.device).float().div(255)
    bends, values, seconds, per_point, recon = evaluate_bends_and_grid(cfg, subject, plane, grid, setup, fixed)
    bend_coordinates = np.stack([plane.coordinates(f) for f in subject.flats])
    arrays = {"alphas": alphas, "betas": betas, "grid": grid, "bend_coordinates": bend_coordinates, "ts": ts,
              **projections, **values, **recon,
              **{f"bend_{k}": np.array([b[k] for b in bends]) for k in values},
              "dx": np.float64(plane.dx), "dy": np.float64(plane.dy)}
    summary = summarize(subject, values, bends)
    print_summary(subject, bend_coordinates, bends, summary, seconds, per_point)

    shared = evaluation.record_keys(setup, cfg, seconds)
    config = shared.pop("config")
    record = PlaneRecord(kind=subject.kind, summary=summary, config=config, rest={
        "inputs": subject.inputs,
        "endpoints": [subject.args.get("init_start"), subject.args.get("init_end")] if subject.curve is not None
        else subject.inputs,
        "points": list(subject.labels),
        "curve": None if subject.curve is None else {"curve": subject.curve.curve_name,
                                                     "num_bends": subject.curve.num_bends,
                                                     "middle_bend": subject.middle},
        "plane": {"dx": plane.dx, "dy": plane.dy, "bend_coordinates": bend_coordinates.tolist(),
                  "curve_max_distance": float(projections["curve_distance"].max())
                  if "curve_distance" in projections else None},
        "grid": {"points": cfg.grid, "margins": margins, "alphas": alphas.tolist(), "betas": betas.tolist()},
        "bends": [{"label": label, "coordinates": xy.tolist(), **b}
                  for label, xy, b in zip(subject.labels, bend_coordinates, bends)],
        **shared,
        "seconds_per_point": per_point,
    })
    files = write_outputs(out, subject, arrays, record)
    print(f"\nwrote {', '.join(Path(f).name for f in files.values())} in {out}")
    return {"out": str(out), "kind": subject.kind, "files": files, "seconds": seconds,
            "seconds_per_point": per_point, **summary}


def evaluate_bends_and_grid(cfg: PlaneConfig, subject: Subject, plane, grid, setup: evaluation.Setup,
                            fixed) -> tuple:
    """(the three bends' metrics, the grid's, seconds in all, seconds per grid point, the reconstructions of `fixed`
    at every grid point: {"recon": uint8 [G, G, N, C, H, W], "recon_images": the originals}, or {} without images).
    The bends are evaluated directly, so their values are exact even where they fall between grid nodes."""
    path, protocol, device = subject.path, setup.protocol, setup.device
    frames = {}

    def on_point(node, network):  # the network at the node is built already: one forward pass more
        frames[node] = evaluation.pixels(reconstruct(network, fixed))
    t0 = time.perf_counter()
    with runtime.autocast(device, cfg.precision):  # bf16: the forward passes only, as in eval-curve
        bends = [prefixed(row) for row in evaluate_points(path.base, path.unflatten, lambda f: f.detach().to(device),
                                                          subject.flats, protocol.train_loader, protocol.test_loader,
                                                          setup.loss_fn, bn_loader=protocol.bn_loader,
                                                          points_per_call=setup.per_call)]
        t1 = time.perf_counter()
        values = evaluate_grid(path.base, path.unflatten, plane, grid, protocol.train_loader, protocol.test_loader,
                               setup.loss_fn, protocol.bn_loader, progress=not cfg.no_progress,
                               points_per_call=setup.per_call, on_point=on_point if len(fixed) else None)
    seconds = time.perf_counter() - t0
    recon = {"recon": np.stack([np.stack([frames[(i, j)] for j in range(cfg.grid)]) for i in range(cfg.grid)]),
             "recon_images": evaluation.pixels(fixed)} if frames else {}
    return bends, values, seconds, (seconds - (t1 - t0)) / cfg.grid**2, recon


def check_config(cfg: PlaneConfig) -> None:
    if bool(cfg.ckpt) == bool(cfg.points):
        which = "both" if cfg.ckpt else "neither"
        raise UserError(f"plane needs exactly one plane, but {which} of --ckpt and --points was given. Pass --ckpt "
                        "CURVE_CHECKPOINT (from `aecurves train-curve`) for the plane through the curve's first, "
                        "middle and last bend, or --points A B C (three checkpoints from `aecurves train`) for the "
                        "plane through three networks.")
    validate(cfg)


def output_folder(cfg: PlaneConfig) -> Path:
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).parent / "plane" if cfg.ckpt else Path(DEFAULT_POINTS_OUT))
    if out.exists() and not out.is_dir():
        raise UserError(f"The output folder {out} is an existing file; pass another --out folder.")
    refuse_other_plane(out, cfg)
    return out


def refuse_other_plane(out: Path, cfg: PlaneConfig) -> None:
    refuse_other_outputs(out, "plane", ("training run",), " (plane's default: the curve folder's plane/)")
    if (out / "plane.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a plane (plane.json). Pass --overwrite to replace it, or choose another "
                        "--out folder; nothing was changed.")


def load_subject(cfg: PlaneConfig) -> Subject:
    if cfg.ckpt:
        curve, state = load_curve(cfg.ckpt, cfg.model)
        if curve.num_bends < 3:
            raise UserError(f"The curve {cfg.ckpt} has {curve.num_bends} bends: it is the straight segment, and a "
                            "line spans no plane. Pass a curve with at least 3 bends (train-curve --num-bends 3), "
                            "or --points A B C.")
        middle = curve.num_bends // 2
        args = state.get("args", {})
        flats = [curve.bends[k].detach() for k in (0, middle, curve.num_bends - 1)]
        labels = ("θ₀", f"θ{subscript(middle)}", f"θ{subscript(curve.num_bends - 1)}")
        return Subject("curve", curve, args, cfg.loss or args.get("loss") or "mse", flats=flats, labels=labels,
                       curve=curve, middle=middle, inputs=[str(Path(cfg.ckpt).resolve())])
    paths = [str(Path(p).resolve()) for p in cfg.points]
    states, arch = load_points(paths, cfg.model)
    losses = [s["args"].get("loss") or "mse" for s in states]
    if cfg.loss is None and len(set(losses)) > 1:
        raise UserError(f"The three networks were trained with different losses ({', '.join(losses)}); pass --loss "
                        "mse or --loss vgg to say which one to evaluate over the plane.")
    segment = make_segment(build_model(arch), states[0]["model"], states[2]["model"])
    flats = [segment.flatten(s["model"]) for s in states]
    return Subject("points", segment, states[0]["args"], cfg.loss or losses[0], flats=flats, labels=("A", "B", "C"),
                   curve=None, middle=None, inputs=paths)


def subscript(k: int) -> str:
    return str(k).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def load_points(paths: list, requested_model: str | None) -> tuple[list, dict]:
    """The three endpoint checkpoints of --points, checked to describe the same network on the same data."""
    return load_endpoints(paths, ["network A", "network B", "network C"], requested_model, "--points A B C",
                          "networks of --points")


@torch.no_grad()
def project_paths(subject: Subject, plane, ts: np.ndarray) -> dict:
    """(x, y) of the segment θ₀–θ₂ and, for a curve, of θ(t) and its distance from the plane, at each t."""
    start, end = (subject.flats[k].detach().cpu().double() for k in (0, 2))
    out = {"segment_coordinates": np.stack([plane.coordinates(start + float(t) * (end - start)) for t in ts])}
    if subject.curve is not None:
        points = [subject.curve.flat_at(float(t)).detach().cpu() for t in ts]
        out["curve_coordinates"] = np.stack([plane.coordinates(p) for p in points])
        out["curve_distance"] = np.array([plane.distance(p) for p in points])
    return out


def load_subject_data(cfg: PlaneConfig, subject: Subject):
    """(the data, how it was chosen): the run's, as eval-curve takes it."""
    return evaluation.run_data(subject.args, subject.args.get("image_size"), cfg,
                               f"The checkpoint {subject.inputs[0]} does not record its dataset, so the plane cannot "
                               "be evaluated on its data.")


def summarize(subject: Subject, values: dict, bends: list) -> dict:
    """Scalars: each loss's min and max over the grid, and at the three points (for a VAE, its objective's two
    terms too: distortion and rate)."""
    out = {}
    terms = [key for key in ("tr_distortion", "te_distortion", "tr_rate", "te_rate") if key in values]
    for key in ("tr_loss", "te_loss", "tr_mse", "te_mse", *terms):
        out[f"{key}_min"], out[f"{key}_max"] = float(values[key].min()), float(values[key].max())
        for which, b in zip(("start", "middle", "end"), bends):
            out[f"{key}_{which}"] = b[key]
    return out


def print_summary(subject: Subject, coordinates, bends, summary: dict, seconds: float, per_point: float) -> None:
    rows = [[label, *xy, b["tr_loss"], b["te_loss"], b["te_mse"]] for label, xy, b in zip(subject.labels, coordinates,
                                                                                            bends)]
    print()
    print(tabulate(rows, ["point", "x", "y", "train loss", "test loss", "test mse"], tablefmt="simple",
                   floatfmt=".5f"))
    print(f"over the grid: train loss {summary['tr_loss_min']:.5f} to {summary['tr_loss_max']:.5f}, test loss "
          f"{summary['te_loss_min']:.5f} to {summary['te_loss_max']:.5f}; {seconds:.1f} s ({per_point:.2f} s per "
          "grid point)")


def write_outputs(out: Path, subject: Subject, arrays: dict, record: PlaneRecord) -> dict:
    """All files or none (files.write_all), plane.json last, so a failure leaves earlier results untouched.
    Returns {kind: path}."""
    files = {k: str(out / name) for k, name in (("json", "plane.json"), ("npz", "plane.npz"), ("plot", "plane.png"))}
    write_all({out / "plane.npz": lambda p: save_npz(p, arrays),
               out / "plane.png": lambda p: plot(p, subject, arrays, record),
               out / "plane.json": lambda p: write_json(p, dataclasses.replace(record, files=files).to_json())})
    return files


def plot(path, subject: Subject, arrays: dict, record: PlaneRecord) -> None:
    first, middle, last = subject.labels
    markers = ("o", "s", "o")
    points = [{"label": label, "xy": xy, "marker": m} for label, xy, m in zip(subject.labels,
                                                                              arrays["bend_coordinates"], markers)]
    if subject.curve is not None:
        lines = [{"xy": arrays["curve_coordinates"]}, {"xy": arrays["segment_coordinates"], "linestyle": "--"}]
        name = Path(subject.inputs[0]).parent.name or Path(subject.inputs[0]).stem
        title = (f"over the plane through the first, middle and last bend of {name}\n"
                 f"solid: the {subject.curve.curve_name} curve's projection; dashed: the segment")
    else:
        xy = arrays["bend_coordinates"]
        lines = [{"xy": xy[[a, b]], "linestyle": "--"} for a, b in ((0, 2), (0, 1), (1, 2))]
        names = [Path(p).parent.name or Path(p).stem for p in subject.inputs]
        title = (f"over the plane through A, B, C = {', '.join(names)}\n"
                 "dashed: the straight segments between them")
    loss_label = "VGG perceptual loss" if record.get("loss") == "vgg" else "MSE loss"
    if record.get("vae"):
        loss_label = f"VAE objective ({loss_label} + β·KL/D)"
    plots.plot_plane(arrays["grid"], {"train": arrays["tr_loss"], "test": arrays["te_loss"]}, path, points, lines,
                     title=f"{loss_label} {title}", value_label=loss_label, xlabel=f"x: along {last} − {first}",
                     ylabel=f"y: towards {middle}")
