"""Curve training: a low-loss curve between two trained autoencoders (the paper's train.py).

Each batch draws a fresh t ~ U(0, 1) and minimises
    loss(t) = reconstruction loss at θ(t) + wd/2 · ‖θ(t)‖²
over the free bends. The reconstruction term alone is reported as `train_loss`, so it compares with
the endpoints' figures; the regulariser is reported as `train_l2_term`.
"""

import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aecurves import runtime
from aecurves.checkpoint import append_jsonl, arch_mismatch, load_checkpoint, save_checkpoint
from aecurves.curves import Curve, CurvePoint, batchnorms, make_coefficients
from aecurves.data import BatchLoader, load_data
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.models import ARCH_KEYS, build_model
from aecurves.train import check_finite, evaluate, load_data_once, reset_metrics_file, table_row

DATA_KEYS = ("dataset", "data_dir", "image_size", "limit", "val_fraction")
BN_BATCHES_PER_EPOCH = 8  # midpoint monitor: BN statistics from this many training batches
COLUMNS = ["epoch", "train_loss", "l2_term", "mid_test_loss", "mid_test_mse", "seconds", "images/s"]


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
    log(f"loss: {loss_fn.description} + wd/2·‖θ(t)‖² with wd={cfg['wd']}; device {device}, precision {precision}")
    if resumed:
        log(f"resuming from {ckpt_path} at epoch {start_epoch}")

    train_loader = BatchLoader(data.train, cfg["batch_size"], device, shuffle=True, seed=cfg["seed"],
                               rank=info.rank, world_size=info.world_size)
    test_loader = BatchLoader(data.test, cfg["batch_size"], device, rank=info.rank, world_size=info.world_size)
    net = DistributedDataParallel(curve, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else curve

    if info.is_main:
        reset_metrics_file(out, history)

    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        # t is drawn from a generator seeded by (seed, epoch, rank): reproducible, and resumable per epoch
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch * 101 + info.rank)
        curve.train()
        train_loader.set_epoch(epoch)
        sums = torch.zeros(3, device=device)  # reconstruction*n, l2 term*n, n
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not progress, file=sys.stderr)
        for step, x in enumerate(bar):
            t = torch.rand((), generator=gen).item()
            with runtime.autocast(device, precision):
                recon = net(x, t)
                rec_loss = loss_fn(recon, x)
            l2_term = cfg["wd"] / 2 * curve.l2(t) if cfg["wd"] else torch.zeros((), device=device)
            loss = rec_loss + l2_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = x.shape[0]
            sums += torch.stack([rec_loss.detach() * n, l2_term.detach() * n, torch.tensor(float(n), device=device)])
            if step % 10 == 0:
                value = loss.item()
                check_finite(value, f"epoch {epoch}, step {step} (t={t:.3f})")
                bar.set_postfix(loss=f"{value:.4f}", t=f"{t:.2f}")
        train_seconds = time.perf_counter() - t0
        sums = runtime.all_reduce_sum(sums)
        train_loss, l2_mean = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        check_finite(train_loss + l2_mean, f"epoch {epoch}")

        # Monitor: the midpoint, after recomputing BN statistics there from a few training batches.
        curve.update_bn(train_loader, 0.5, BN_BATCHES_PER_EPOCH)
        mid = evaluate(CurvePoint(curve, 0.5), loss_fn, test_loader, device)
        row = {"epoch": epoch, "train_loss": train_loss, "train_l2_term": l2_mean, "mid_test_loss": mid["loss"],
               "mid_test_mse": mid["mse"], "mid_test_psnr": mid["psnr"], "epoch_seconds": time.perf_counter() - t0,
               "images_per_s": sums[2].item() / train_seconds, "precision": precision}
        history.append(row)
        values = [epoch, train_loss, l2_mean, mid["loss"], mid["mse"], row["epoch_seconds"], row["images_per_s"]]
        log(table_row(values, COLUMNS, ["d", "9.5f", "9.5f", "9.5f", "9.5f", "8.1f", "8.0f"], epoch == start_epoch + 1))
        if info.is_main:
            append_jsonl(out / "metrics.jsonl", row)
            if epoch % cfg["save_every_epoch"] == 0 or epoch == cfg["epochs"]:
                state = {"kind": "curve", "curve": curve.curve_state(), "model_config": model_config,
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "args": dict(cfg), "metrics": history}
                save_checkpoint(out / "checkpoint.pt", state)

    log(f"done: curve checkpoint {ckpt_path}; evaluate it with `aecurves eval-curve --ckpt {ckpt_path}`")
    return {"out": str(out), "checkpoint": str(ckpt_path), **(history[-1] if history else {})}


def fixed_subset(images: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor:
    """`n` images drawn once with a fixed generator (all of them when n is None or too large)."""
    if n is None or n >= len(images):
        return images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx.sort().values]


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
