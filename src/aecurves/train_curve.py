"""Curve training: a low-loss curve between two trained autoencoders (the paper's train.py).

Each batch draws a fresh t in [0, 1] and minimises
    loss(t) = reconstruction loss at θ(t) + wd/2 · ‖θ(t)‖²
over the free bends, with Adam at the lr of `--lr-schedule` (default: the paper's, set before every step).
t is stratified by default: each epoch's S batches take one t from each of the S equal slices of [0, 1], in
random order, so every epoch covers the whole curve (the paper draws t i.i.d. uniform: `uniform`).
The reconstruction term alone is reported as `train_loss`, so it compares with
the endpoints' figures; the regulariser is reported as `train_l2_term`.

After every epoch the midpoint θ(0.5) is measured exactly as eval-curve measures it (BatchNorm statistics
from the same fixed subset of training images, held-out metrics in fp32), so the last epoch's figure is
eval-curve's value at t = 0.5.
"""

import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aecurves import runtime
from aecurves.checkpoint import append_jsonl, arch_mismatch, load_checkpoint, save_checkpoint
from aecurves.config import BN_IMAGES, EVAL_BATCH_SIZE, T_SAMPLING
from aecurves.curves import Curve, CurvePoint, batchnorms, make_coefficients
from aecurves.data import BatchLoader, load_data
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.models import ARCH_KEYS, build_model
from aecurves.metrics import evaluate, fixed_subset
from aecurves.schedules import lr_at, set_lr
from aecurves.train import check_finite, load_data_once, reset_metrics_file, table_row

DATA_KEYS = ("dataset", "data_dir", "image_size", "limit", "val_fraction")
COLUMNS = ["epoch", "lr", "train_loss", "l2_term", "mid_test_loss", "mid_test_mse", "seconds", "images/s"]
# Settings a checkpoint written before they existed was trained with, and this release's defaults.
LEGACY = {"lr_schedule": "constant", "t_sampling": "uniform"}
DEFAULTS = {"lr_schedule": "paper", "t_sampling": "stratified", "bn_images": BN_IMAGES}


def endpoint_pair(start_path, end_path, flags: str = "--init_start/--init_end") -> tuple[dict, dict]:
    """Loads both endpoint checkpoints and checks they describe the same architecture."""
    a = load_checkpoint(start_path, "endpoint", f"start endpoint ({flags})")
    b = load_checkpoint(end_path, "endpoint", f"end endpoint ({flags})")
    diff = arch_mismatch(a["args"], b["args"])
    if diff:
        raise UserError(f"The endpoints do not match each other: {'; '.join(diff)} ({start_path} vs {end_path}). "
                        "A curve connects two networks of the same architecture; train them with the same "
                        "--latent-dim, --width, --image-size and dataset channels.")
    return a, b


def build_curve(model_config: dict, curve_state: dict) -> Curve:
    """A Curve rebuilt from a curve checkpoint's `model_config` and `curve` entries."""
    curve = Curve(build_model(model_config), curve_state["curve"], curve_state["num_bends"],
                  curve_state["fix_start"], curve_state["fix_end"])
    curve.load_curve_state(curve_state)
    return curve


def load_curve(path) -> tuple[Curve, dict]:
    state = load_checkpoint(path, "curve", "curve checkpoint")
    return build_curve(state["model_config"], state["curve"]), state


def resolve_config(cfg: dict, a: dict) -> None:
    """Data, loss and architecture default to the start endpoint's; flags given explicitly win."""
    for k in DATA_KEYS + ("loss",):
        if cfg.get(k) is None:
            cfg[k] = a["args"].get(k)
    if cfg.get("data_dir"):
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
    if cfg.get("seed") is None:
        cfg["seed"] = 1
    cfg["curve"] = make_coefficients(cfg["curve"], cfg["num_bends"]).name


def resolve_training_settings(cfg: dict, saved: dict | None, ckpt_path) -> None:
    """lr schedule, t sampling and monitor subset: the flag, else the checkpoint's, else this release's default.

    A checkpoint from before a setting existed was trained with its LEGACY value (a constant lr, uniform t),
    so resuming it keeps that. A flag that contradicts the checkpoint is refused: the run would mix two
    trainings under one record.
    """
    differ = []
    for k, default in DEFAULTS.items():
        before = saved.get(k, LEGACY.get(k, default)) if saved is not None else None
        if cfg.get(k) is None:
            cfg[k] = before if before is not None else default
        elif before is not None and cfg[k] != before:
            differ.append(f"{k}={before!r} vs {k}={cfg[k]!r}")
    if differ:
        raise UserError(f"The curve checkpoint {ckpt_path} does not match this run: {'; '.join(differ)} (checkpoint "
                        "vs requested). Drop those flags to resume with the checkpoint's settings, or start a new "
                        "run in another --out folder.")
    if cfg["t_sampling"] not in T_SAMPLING:
        raise UserError(f"Unknown --t-sampling {cfg['t_sampling']!r}; choose one of: {', '.join(T_SAMPLING)}.")
    if not isinstance(cfg["bn_images"], int) or cfg["bn_images"] < 1:
        raise UserError(f"--bn-images must be an integer of at least 1, got {cfg['bn_images']!r}.")


def sample_ts(n: int, generator: torch.Generator, method: str) -> list[float]:
    """The t of each of an epoch's n steps: i.i.d. U(0, 1), or one from each slice [i/n, (i+1)/n) in random order."""
    if method == "stratified":
        return ((torch.randperm(n, generator=generator) + torch.rand(n, generator=generator)) / n).tolist()
    return torch.rand(n, generator=generator).tolist()


def train_curve_one_epoch(net, curve, loss_fn, optimizer, loader, device, precision, epoch, ts, lr_for_step, wd,
                          progress=True):
    """One pass over `loader`, step i at t = ts[i]. Returns (reconstruction loss, l2 term, images, last lr)."""
    curve.train()
    loader.set_epoch(epoch)
    sums = torch.zeros(3, device=device)  # reconstruction*n, l2 term*n, n
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, file=sys.stderr)
    for step, x in enumerate(bar):
        t = ts[step]
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        with runtime.autocast(device, precision):
            recon = net(x, t)
            rec_loss = loss_fn(recon, x)
        l2_term = wd / 2 * curve.l2(t) if wd else torch.zeros((), device=device)
        loss = rec_loss + l2_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        sums += torch.stack([rec_loss.detach() * n, l2_term.detach() * n, torch.tensor(float(n), device=device)])
        if step % 10 == 0:
            value = loss.item()
            check_finite(value, f"epoch {epoch}, step {step} (t={t:.3f})")
            bar.set_postfix(loss=f"{value:.4f}", t=f"{t:.2f}", lr=f"{lr:.1e}")
    sums = runtime.all_reduce_sum(sums)
    train_loss, l2_mean = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    check_finite(train_loss + l2_mean, f"epoch {epoch}")
    return train_loss, l2_mean, sums[2].item(), lr


def midpoint_monitor(curve, bn_loader, test_loader, loss_fn) -> dict:
    """θ(0.5) measured as eval-curve measures it: BN statistics from its fixed subset, held-out metrics."""
    curve.update_bn(bn_loader, 0.5)
    return evaluate(CurvePoint(curve, 0.5), test_loader, loss_fn)


def run(cfg: dict) -> dict:
    with runtime.distributed(cfg["device"]) as (info, device):
        return _run(cfg, info, device)


def _run(cfg: dict, info: runtime.Dist, device: torch.device) -> dict:
    log = print if info.is_main else (lambda *a, **k: None)
    progress = info.is_main and not cfg.get("no_progress")
    out = Path(cfg["out"])
    ckpt_path = out / "checkpoint.pt"
    resumed = None
    if cfg.get("resume") and ckpt_path.is_file():
        resumed = load_checkpoint(ckpt_path, "curve", "curve checkpoint")
        # What defines the curve and its data comes from the checkpoint; epochs, lr, device... from the flags.
        for k in ("init_start", "init_end", "curve", "num_bends", "fix_start", "fix_end", "init_linear_off",
                  "seed", *DATA_KEYS, "loss", "wd", "batch_size"):
            cfg[k] = resumed["args"].get(k, cfg.get(k))
    elif ckpt_path.exists():
        raise UserError(f"{out} already holds a curve run (checkpoint.pt). Pass --resume to continue it, "
                        "or choose another --dir/--out folder; nothing was overwritten.")
    resolve_training_settings(cfg, resumed["args"] if resumed else None, ckpt_path)
    if not cfg.get("init_start") or not cfg.get("init_end"):
        raise UserError("train-curve needs both endpoints: --init_start CKPT1 --init_end CKPT2 "
                        "(checkpoints written by `aecurves train`).")
    make_coefficients(cfg["curve"], cfg["num_bends"])  # validates before any loading
    if cfg["num_bends"] == 2 and cfg["fix_start"] and cfg["fix_end"]:
        raise UserError("Nothing to train: with --num_bends 2 the curve is the straight segment, and both ends are "
                        "fixed. Use --num_bends 3 (or more), or drop --fix_start/--fix_end. To evaluate the segment "
                        "itself, use `aecurves eval-curve --segment START END`.")
    a, b = endpoint_pair(cfg["init_start"], cfg["init_end"])
    cfg["init_start"], cfg["init_end"] = (str(Path(p).resolve()) for p in (cfg["init_start"], cfg["init_end"]))
    resolve_config(cfg, a)
    model_config = {k: a["args"][k] for k in ARCH_KEYS}

    precision = runtime.resolve_precision(cfg["precision"], device)
    data = load_data_once(info, progress, dataset=cfg["dataset"], data_dir=cfg.get("data_dir"),
                          image_size=cfg["image_size"], limit=cfg.get("limit"), val_fraction=cfg["val_fraction"],
                          use_test=cfg.get("use_test", False), cache_dir=cfg.get("cache_dir"))
    if data.channels != model_config["channels"] or data.image_size != model_config["image_size"]:
        raise UserError(f"The data ({data.channels} channels, {data.image_size}px) does not fit the endpoints "
                        f"({model_config['channels']} channels, {model_config['image_size']}px); drop the --dataset/"
                        "--data_path overrides or pass data like the endpoints were trained on.")

    runtime.seed_everything(cfg["seed"])
    curve = Curve(build_model(model_config), cfg["curve"], cfg["num_bends"], cfg["fix_start"], cfg["fix_end"])
    curve.set_endpoints(a["model"], b["model"])
    if not cfg.get("init_linear_off"):
        curve.init_linear()
    curve.to(device)
    loss_fn = make_loss(cfg["loss"], cfg["vgg_weights"]).to(device)
    optimizer = torch.optim.Adam([p for p in curve.bends if p.requires_grad], lr=cfg["lr"])
    history, start_epoch = [], 0
    if resumed:
        curve.load_curve_state(resumed["curve"])
        curve.to(device)
        optimizer.load_state_dict(resumed["optimizer"])
        history, start_epoch = list(resumed["metrics"]), resumed["epoch"]

    log(f"data: {data.source}")
    log(f"curve: {cfg['curve']} with {cfg['num_bends']} bends between {cfg['init_start']} and {cfg['init_end']}; "
        f"start {'fixed' if cfg['fix_start'] else 'free'}, end {'fixed' if cfg['fix_end'] else 'free'}, "
        f"{curve.num_trainable():,} trainable parameters")
    log(f"loss: {loss_fn.description} + wd/2·‖θ(t)‖² with wd={cfg['wd']}; Adam lr {cfg['lr']:g} "
        f"({cfg['lr_schedule']} schedule), t {cfg['t_sampling']}; device {device}, precision {precision}")
    log(f"monitor: θ(0.5) on the held-out images after BN statistics from {min(cfg['bn_images'], len(data.train))} "
        "training images (eval-curve's protocol)")
    if resumed:
        log(f"resuming from {ckpt_path} at epoch {start_epoch}")

    train_loader = BatchLoader(data.train, cfg["batch_size"], device, shuffle=True, seed=cfg["seed"],
                               rank=info.rank, world_size=info.world_size)
    # The monitor uses eval-curve's protocol: the same fixed BN subset and batch size (BN statistics are
    # averaged per batch), so its last figure is eval-curve's at t = 0.5.
    bn_loader = BatchLoader(fixed_subset(data.train, cfg["bn_images"]), EVAL_BATCH_SIZE, device)
    test_loader = BatchLoader(data.test, EVAL_BATCH_SIZE, device, rank=info.rank, world_size=info.world_size)
    net = DistributedDataParallel(curve, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else curve

    if info.is_main:
        reset_metrics_file(out, history)

    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        # t comes from a generator seeded by (seed, epoch, rank): reproducible, and resumable per epoch
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch * 101 + info.rank)
        ts = sample_ts(len(train_loader), gen, cfg["t_sampling"])
        train_loss, l2_mean, seen, lr = train_curve_one_epoch(
            net, curve, loss_fn, optimizer, train_loader, device, precision, epoch, ts,
            lambda step: lr_at(cfg["lr_schedule"], cfg["lr"], epoch, step, len(train_loader), cfg["epochs"]),
            cfg["wd"], progress)
        train_seconds = time.perf_counter() - t0
        mid = midpoint_monitor(curve, bn_loader, test_loader, loss_fn)
        row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_l2_term": l2_mean,
               "mid_test_loss": mid["loss"], "mid_test_mse": mid["mse"], "mid_test_psnr": mid["psnr"],
               "epoch_seconds": time.perf_counter() - t0, "images_per_s": seen / train_seconds,
               "precision": precision}
        history.append(row)
        values = [epoch, lr, train_loss, l2_mean, mid["loss"], mid["mse"], row["epoch_seconds"], row["images_per_s"]]
        log(table_row(values, COLUMNS, ["d", "9.2e", "9.5f", "9.5f", "9.5f", "9.5f", "8.1f", "8.0f"],
                      epoch == start_epoch + 1))
        if info.is_main:
            append_jsonl(out / "metrics.jsonl", row)
            if epoch % cfg["save_every_epoch"] == 0 or epoch == cfg["epochs"]:
                state = {"kind": "curve", "curve": curve.curve_state(), "model_config": model_config,
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "args": dict(cfg), "metrics": history}
                save_checkpoint(out / "checkpoint.pt", state)

    log(f"done: curve checkpoint {ckpt_path}; evaluate it with `aecurves eval-curve --ckpt {ckpt_path}`")
    return {"out": str(out), "checkpoint": str(ckpt_path), **(history[-1] if history else {})}


def export_point(cfg: dict) -> dict:
    """Writes θ(t) of a curve, with BN statistics recomputed at t, as an ordinary endpoint checkpoint."""
    t = cfg["t"]
    if not 0.0 <= t <= 1.0:
        raise UserError(f"--t must lie in [0, 1] (0 is the start endpoint, 1 the end), got {t}.")
    out = Path(cfg["out"])
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / 'point.pt'}.")
    curve, state = load_curve(cfg["ckpt"])
    args = state["args"]
    device = runtime.resolve_device(cfg["device"])
    curve.to(device)
    used = 0
    if cfg.get("bn_images", 0) and batchnorms(curve.base):
        data = load_data(args["dataset"], args.get("data_dir"), args["image_size"], args.get("limit"),
                         args["val_fraction"], args.get("use_test", False), cfg.get("cache_dir"),
                         progress=not cfg.get("no_progress"))
        loader = BatchLoader(fixed_subset(data.train, cfg["bn_images"]), cfg["batch_size"], device)
        used = curve.update_bn(loader, t)
    point = {"kind": "endpoint", "model": curve.state_dict_at(t), "optimizer": {}, "epoch": 0, "metrics": [],
             "args": {**{k: args.get(k) for k in DATA_KEYS + ("use_test", "loss", "seed")}, **state["model_config"]},
             "exported_from": {"curve": str(Path(cfg["ckpt"]).resolve()), "t": t, "bn_images": used}}
    save_checkpoint(out, point)
    print(f"wrote θ({t:g}) of {cfg['ckpt']} to {out} (BatchNorm statistics recomputed from {used} training images)")
    return {"out": str(out), "t": t, "bn_images": used}
