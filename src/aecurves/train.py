"""Endpoint training: one autoencoder, one seed, read top to bottom.

`run(cfg)` takes the plain dict of `aecurves train` flags. It works alone or under torchrun
(DistributedDataParallel; --batch-size is per process, as in torchvision's references).
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aecurves import runtime
from aecurves.checkpoint import append_jsonl, atomic_path, check_same_arch, load_checkpoint, save_checkpoint
from aecurves.data import DEFAULT_IMAGE_SIZE, BatchLoader, load_data
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.metrics import evaluate
from aecurves.models import ARCH_KEYS, build_model, num_parameters
from aecurves.schedules import lr_at, set_lr

# Flags that are None when not given: they default to these, or to the checkpoint's values on resume.
DEFAULTS = {"dataset": "lfw", "data_dir": None, "image_size": None, "limit": None, "val_fraction": 0.1,
            "use_test": False, "loss": "mse", "seed": 42, "latent_dim": 128, "width": 32,
            "lr_schedule": "constant"}
COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_mse", "test_psnr", "seconds", "images/s"]


class NonFiniteLoss(UserError):
    pass


def train_one_epoch(model, loss_fn, optimizer, loader, device, precision, epoch, progress=True, lr_for_step=None):
    """Returns (mean training loss, images seen by this process, lr of the last step).

    `lr_for_step(step)`, when given, sets the optimizer's lr before every step (the lr schedule).
    """
    model.train()
    loader.set_epoch(epoch)
    total = torch.zeros((), device=device)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, file=sys.stderr)
    for step, x in enumerate(bar):
        if lr_for_step is not None:
            lr = lr_for_step(step)
            set_lr(optimizer, lr)
        with runtime.autocast(device, precision):
            loss = loss_fn(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * x.shape[0]
        seen += x.shape[0]
        if step % 10 == 0:  # .item() syncs with the GPU, so only now and then
            value = loss.item()
            check_finite(value, f"epoch {epoch}, step {step}")
            bar.set_postfix(loss=f"{value:.4f}")
    stats = runtime.all_reduce_sum(torch.stack([total, torch.tensor(float(seen), device=device)]))
    mean = (stats[0] / stats[1]).item()
    check_finite(mean, f"epoch {epoch}")
    return mean, seen, lr


def check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"The training loss became {value} at {where}; training stopped and the last good "
                            "checkpoint was left as it was. Lower --lr, or use --precision fp32, then resume with "
                            "--resume (it restarts from the last good checkpoint).")


def save_reconstructions(model, images: torch.Tensor, path) -> None:
    """A PNG grid: fixed test images in the top row, their reconstructions below."""
    from torchvision.utils import make_grid, save_image

    model.eval()
    with torch.no_grad():
        recon = model(images)
    grid = make_grid(torch.cat([images, recon]).float().cpu(), nrow=images.shape[0], padding=2, pad_value=1.0)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


def table_row(values: list, columns: list[str], floatfmt: list[str], header: bool) -> str:
    """One epoch's row; fixed float widths keep the columns aligned from row to row without a header."""
    table = tabulate([values], columns, tablefmt="simple", floatfmt=floatfmt)
    return table if header else table.splitlines()[2]


def format_row(row: dict, header: bool) -> str:
    values = [row["epoch"], row["lr"], row["train_loss"], row["test_loss"], row["test_mse"], row["test_psnr"],
              row["epoch_seconds"], row["images_per_s"]]
    return table_row(values, COLUMNS, ["d", "9.2e", "9.5f", "9.5f", "9.5f", "7.2f", "8.1f", "8.0f"], header)


def load_data_once(info: runtime.Dist, progress: bool, **kwargs):
    """Rank 0 builds the image cache; the other ranks wait for it and then read it."""
    data = load_data(**kwargs, progress=progress) if info.is_main else None
    runtime.barrier()
    return data if data is not None else load_data(**kwargs, progress=False)


def reset_metrics_file(out: Path, history: list[dict]) -> None:
    """metrics.jsonl mirrors the checkpoint's history (drops rows a crashed run logged after it)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))


def resolve_start(cfg: dict, out: Path):
    """The checkpoint to resume from (or None), after refusing to overwrite an existing run."""
    ckpt_path = Path(cfg["checkpoint"]) if cfg.get("checkpoint") else out / "checkpoint.pt"
    if cfg.get("resume") or cfg.get("checkpoint"):
        if not ckpt_path.is_file():
            if cfg.get("checkpoint"):
                load_checkpoint(ckpt_path, "endpoint")  # raises the missing-file error
            return None  # --resume with nothing to resume: start fresh
        return load_checkpoint(ckpt_path, "endpoint"), ckpt_path
    if (out / "checkpoint.pt").exists():
        raise UserError(f"{out} already holds a training run (checkpoint.pt). Pass --resume to continue it, "
                        "or choose another --out folder; nothing was overwritten.")
    return None


def resolve_config(cfg: dict, saved: dict | None, ckpt_path) -> None:
    """Fills flags left unset; on resume they come from the checkpoint, and explicit ones must agree with it."""
    if cfg.get("data_dir"):
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
    if saved is not None:
        differ = [f"{k}={saved.get(k, DEFAULTS[k])!r} vs {k}={cfg[k]!r}" for k in DEFAULTS
                  if cfg.get(k) not in (None, False) and cfg[k] != saved.get(k, DEFAULTS[k])]
        if differ:
            raise UserError(f"The checkpoint {ckpt_path} does not match this run: " + "; ".join(differ)
                            + " (checkpoint vs requested). Drop those flags to resume with the checkpoint's "
                            "settings, or start a new run in another --out folder.")
        for k in DEFAULTS:
            if cfg.get(k) in (None, False):
                cfg[k] = saved.get(k, DEFAULTS[k])
    for k, v in DEFAULTS.items():
        if cfg.get(k) is None:
            cfg[k] = v
    if cfg["image_size"] is None:
        cfg["image_size"] = DEFAULT_IMAGE_SIZE.get(cfg["dataset"], 64)


def run(cfg: dict) -> dict:
    with runtime.distributed(cfg["device"]) as (info, device):
        return _run(cfg, info, device)


def _run(cfg: dict, info: runtime.Dist, device: torch.device) -> dict:
    log = print if info.is_main else (lambda *a, **k: None)
    progress = info.is_main and not cfg.get("no_progress")
    out = Path(cfg["out"])
    start = resolve_start(cfg, out)
    resumed = start[0] if start else None

    resolve_config(cfg, resumed["args"] if resumed else None, start[1] if start else None)
    precision = runtime.resolve_precision(cfg["precision"], device)
    data = load_data_once(info, progress, dataset=cfg["dataset"], data_dir=cfg.get("data_dir"),
                          image_size=cfg["image_size"], limit=cfg.get("limit"), val_fraction=cfg["val_fraction"],
                          use_test=cfg.get("use_test", False), cache_dir=cfg.get("cache_dir"))
    cfg["channels"] = data.channels
    if resumed:
        check_same_arch(resumed["args"], cfg, start[1], "the data of this run")

    runtime.seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    loss_fn = make_loss(cfg["loss"], cfg["vgg_weights"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("wd", 0.0))
    history, start_epoch = [], 0
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        history, start_epoch = list(resumed["metrics"]), resumed["epoch"]

    log(f"data: {data.source}" + (f" ({len(data.skipped)} unreadable files skipped)" if data.skipped else ""))
    log(f"model: ConvAutoencoder {', '.join(f'{k}={cfg[k]}' for k in ARCH_KEYS)}: {num_parameters(model):,} parameters")
    log(f"loss: {loss_fn.description}; lr {cfg['lr']:g} ({cfg['lr_schedule']} schedule); device {device}, precision {precision}, world size {info.world_size}, "
        f"batch {cfg['batch_size']} per process")
    if resumed:
        log(f"resuming from {start[1]} at epoch {start_epoch}")
    if start_epoch >= cfg["epochs"]:
        log(f"nothing to do: the checkpoint is already at epoch {start_epoch} of {cfg['epochs']}")

    train_loader = BatchLoader(data.train, cfg["batch_size"], device, shuffle=True, seed=cfg["seed"],
                               rank=info.rank, world_size=info.world_size)
    test_loader = BatchLoader(data.test, cfg["batch_size"], device, rank=info.rank, world_size=info.world_size)
    fixed = data.test[: cfg.get("num_images", 8)].to(device).float().div(255)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model

    if info.is_main:
        reset_metrics_file(out, history)

    perceptual = getattr(loss_fn, "perceptual", None)
    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        train_loss, seen, lr = train_one_epoch(
            net, loss_fn, optimizer, train_loader, device, precision, epoch, progress,
            lambda step: lr_at(cfg["lr_schedule"], cfg["lr"], epoch, step, len(train_loader), cfg["epochs"]))
        train_seconds = time.perf_counter() - t0
        test = evaluate(model, test_loader, loss_fn)
        row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "test_loss": test["loss"], "test_mse": test["mse"],
               "test_psnr": test["psnr"], "epoch_seconds": time.perf_counter() - t0,
               "images_per_s": seen * info.world_size / train_seconds, "precision": precision}
        if cfg["loss"] == "vgg":
            row["loss_is_perceptual"] = perceptual
        history.append(row)
        log(format_row(row, header=epoch == start_epoch + 1))
        if info.is_main:
            append_jsonl(out / "metrics.jsonl", row)
            if epoch % cfg["save_every_epoch"] == 0 or epoch == cfg["epochs"]:
                state = {"kind": "endpoint", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch, "args": dict(cfg), "metrics": history,
                         "skipped_images": len(data.skipped)}
                save_checkpoint(out / f"checkpoint_epoch{epoch:03d}.pt", state)
                save_checkpoint(out / "checkpoint.pt", state)
                save_reconstructions(model, fixed, out / f"reconstructions_epoch{epoch:03d}.png")
                save_reconstructions(model, fixed, out / "reconstructions.png")

    summary = {"out": str(out), "epochs": cfg["epochs"], "skipped_images": len(data.skipped),
               **({k: history[-1][k] for k in ("train_loss", "test_loss", "test_mse", "test_psnr")} if history else {})}
    log(f"done: {summary.get('epochs')} epochs, test loss {summary.get('test_loss', float('nan')):.5f}, "
        f"test PSNR {summary.get('test_psnr', float('nan')):.2f} dB, {len(data.skipped)} unreadable images skipped; "
        f"checkpoint, metrics.jsonl and reconstructions.png in {out}")
    return summary
