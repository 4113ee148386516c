"""`aecurves train`: one autoencoder, one seed, read top to bottom.

`run(cfg)` takes a `config.TrainConfig`. It works alone or under torchrun (DistributedDataParallel;
--batch-size is per process, as in torchvision's references).
"""

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from aecurves import runtime
from aecurves.checkpoint import check_fits, check_same_arch, load_checkpoint, save_checkpoint, trusted_arch
from aecurves.config import (
    DEFAULT_IMAGE_SIZE,
    TrainConfig,
    as_record,
    check_model_kwargs,
    is_given,
    settle_with_checkpoint,
    takes_width,
    validate,
)
from aecurves.console import table_row
from aecurves.data import BatchLoader, check_outside_data, load_data_once
from aecurves.errors import UserError
from aecurves.files import append_jsonl, atomic_path, folder_lock, write_jsonl
from aecurves.losses import make_loss, reconstruction
from aecurves.metrics import check_finite_state, evaluate, usable_memory_format
from aecurves.models import arch_of, build_model, is_vae, num_parameters
from aecurves.records import EndpointRecord, refuse_other_outputs
from aecurves.schedules import lr_at
from aecurves.training import TERMS, term_columns, train_one_epoch

COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_mse", "test_psnr", "seconds", "images/s"]


HELD_OUT_FORMAT = 1  # of reconstructions.pt (CHANGELOG.md)


def reconstruct(model, images: torch.Tensor) -> torch.Tensor:
    """The reconstructions of `images` in eval mode (a VAE's decode its posterior's mean, without its KL)."""
    model.eval()
    with torch.no_grad():
        return reconstruction(model(images))


def reconstruction_grid(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fixed test images in the top row, their reconstructions below, as one [3, H, W] image in [0, 1]."""
    from torchvision.utils import make_grid

    return make_grid(torch.cat([images, recon]).float().cpu(), nrow=images.shape[0], padding=2, pad_value=1.0)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] on the CPU, rounded as torchvision's save_image rounds the PNG, so both hold one value."""
    return images.detach().float().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).contiguous()


def save_reconstructions(images: torch.Tensor, recon: torch.Tensor, paths, board_epoch=None, board=None) -> None:
    """reconstructions.png (the grid) and beside each PNG its tensors (.pt: the held-out images and their
    reconstructions as uint8, HELD_OUT_FORMAT), for the report to read without decoding the picture."""
    from torchvision.utils import save_image

    grid = reconstruction_grid(images, recon)
    held_out = {"format": HELD_OUT_FORMAT, "images": as_pixels(images), "reconstructions": as_pixels(recon)}
    for path in paths:
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="png")
        with atomic_path(Path(path).with_suffix(".pt")) as tmp:
            torch.save(held_out, tmp)
    if board is not None:
        board.add_image("reconstructions", grid, board_epoch)


def tensorboard_writer(out: Path):
    """A SummaryWriter in OUT/tensorboard; tensorboard is optional, so a missing package is a clear error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard (or "
                        "pip install -e '.[tensorboard]'); metrics.jsonl holds the same figures without it.") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def format_row(row: dict, header: bool) -> str:
    values = [row["epoch"], row["lr"], row["train_loss"], row["test_loss"], row["test_mse"], row["test_psnr"],
              row["epoch_seconds"], row["images_per_s"]]
    formats = ["d", "9.2e", "9.5f", "9.5f", "9.5f", "7.2f", "8.1f", "8.0f"]
    return table_row(*term_columns(row, "train_", 3, values, COLUMNS, formats), header)


def resolve_start(cfg: TrainConfig, out: Path):
    """(checkpoint, its path) to resume from, or None, after refusing to overwrite an existing run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run (nothing was written).")
    refuse_other_outputs(out, "train", ("evaluation", "plane"))  # its reconstructions.png is eval-curve's name
    own = out / "checkpoint.pt"
    ckpt_path = Path(cfg.checkpoint) if cfg.checkpoint else own
    if cfg.checkpoint and own.exists() and ckpt_path.resolve().parent != out.resolve():
        raise UserError(f"{out} already holds a training run (checkpoint.pt); starting it over from --checkpoint "
                        f"{ckpt_path} would overwrite it. Choose another --out folder; nothing was overwritten.")
    if cfg.init and cfg.checkpoint:
        raise UserError("--init starts a new run from an endpoint's weights and --checkpoint resumes one; pass one "
                        "of them.")
    if cfg.resume or cfg.checkpoint:
        if not ckpt_path.is_file():
            if cfg.checkpoint:
                load_checkpoint(ckpt_path, "endpoint")  # raises the missing-file error
            return None  # --resume with nothing to resume: start fresh
        return load_checkpoint(ckpt_path, "endpoint"), ckpt_path
    if own.exists():
        raise UserError(f"{out} already holds a training run (checkpoint.pt). Pass --resume to continue it, "
                        "or choose another --out folder; nothing was overwritten.")
    return None


def resolve_init(cfg: TrainConfig, resumed) -> dict | None:
    """The endpoint --init starts from (None without --init, or when resuming such a run from its own checkpoint)."""
    if not cfg.init:
        return None
    cfg.init = str(Path(cfg.init).expanduser().resolve())
    if resumed:
        return None
    if Path(cfg.init).resolve() == (Path(cfg.out) / "checkpoint.pt").resolve():
        raise UserError(f"--init {cfg.init} is this run's own checkpoint; pass the endpoint to start from and a new "
                        "--out folder.")
    return load_checkpoint(cfg.init, "endpoint")


def resolve_train_config(cfg: TrainConfig, saved: dict | None, ckpt_path, init: dict | None = None) -> None:
    """On resume, settings not given explicitly come from the checkpoint (explicit ones must agree with it);
    with --init, the data and model settings come from the endpoint it starts from; a model factory outside
    aecurves must be named again with --model."""
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    if saved is not None:
        trusted_arch(saved, cfg.model if is_given(cfg, "model") else None, ckpt_path)
        settle_with_checkpoint(cfg, saved, ckpt_path)
    if init is not None:
        trusted_arch(init["args"], cfg.model if is_given(cfg, "model") else None, cfg.init)
        settle_with_checkpoint(cfg, init["args"], f"{cfg.init} (--init)", roles=("data", "model"), carry=False)
    if cfg.image_size is None:
        cfg.image_size = DEFAULT_IMAGE_SIZE.get(cfg.dataset, 64)
    if not takes_width(cfg.model):
        if is_given(cfg, "width"):
            raise UserError("--width is a setting of the built-in convolutional models; pass the settings of "
                            f"--model {cfg.model} with --model-kwargs JSON.")
        cfg.width = None


def check_config(cfg: TrainConfig) -> None:
    """What can be checked without reading a file."""
    validate(cfg)
    check_model_kwargs(cfg.model, cfg.model_kwargs, as_record(cfg))


def run(cfg: TrainConfig) -> dict:
    cfg = dataclasses.replace(cfg)  # resolved below; the caller's config stays as given
    check_config(cfg)
    with runtime.distributed(cfg.device) as (info, device):
        return _run(cfg, info, device)


def _run(cfg: TrainConfig, info: runtime.Dist, device: torch.device) -> dict:
    log = print if info.is_main else (lambda *a, **k: None)
    progress = info.is_main and not cfg.no_progress
    out = Path(cfg.out)
    start = resolve_start(cfg, out)
    resumed, ckpt_path = start if start else (None, None)

    init = resolve_init(cfg, resumed)
    resolve_train_config(cfg, resumed["args"] if resumed else None, ckpt_path, init)
    check_outside_data(out, cfg.data_dir, "--out")
    precision = runtime.resolve_precision(cfg.precision, device)
    data = load_data_once(info, progress, dataset=cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                          limit=cfg.limit, val_fraction=cfg.val_fraction, use_test=cfg.use_test,
                          cache_dir=cfg.cache_dir)
    args = {**as_record(cfg), "channels": data.channels}  # what the checkpoint records
    arch = arch_of(args)
    for state, where in ((resumed, ckpt_path), (init, cfg.init)):
        if state:
            check_same_arch(state["args"], args, where, "the data of this run")

    runtime.seed_everything(cfg.seed)
    model = build_model(arch)
    vae = is_vae(model, arch)  # on the CPU, before the move: it feeds the network a batch made there
    model.to(device)
    loss_fn = make_loss(cfg.loss, cfg.vgg_weights, cfg.kl_weight).to(device)
    memory_format, format_note = usable_memory_format(cfg.memory_format, model, dict(model.named_parameters()),
                                                      data.train[:2].to(device).float().div(255))
    if memory_format == "channels_last":  # before the optimizer, so its state takes the weights' layout
        model.to(memory_format=torch.channels_last)
    optimizer = runtime.adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    history, start_epoch = [], 0
    fine_tune = bool(resumed) and not resumed["optimizer"]  # e.g. a point exported from a curve
    if resumed or init:
        check_fits(model.state_dict(), (resumed or init)["model"], ckpt_path if resumed else cfg.init)
        model.load_state_dict((resumed or init)["model"])
    if resumed and not fine_tune:
        runtime.load_optimizer_state(optimizer, resumed["optimizer"])
        history, start_epoch = list(resumed["metrics"]), resumed["epoch"]

    log(f"data: {data.source}" + (f" ({len(data.skipped)} files or folders skipped, named in the warning above)"
                                if data.skipped else ""))
    settings = ", ".join(f"{k}={v}" for k, v in arch.items() if k not in ("model", "model_kwargs") and v is not None)
    kwargs = f" {arch['model_kwargs']}" if arch["model_kwargs"] else ""
    log(f"model: {arch['model']}{kwargs} {settings}: {num_parameters(model):,} parameters")
    objective = f" + β·KL/D with β = --kl-weight {cfg.kl_weight:g} (a VAE)" if vae else ""
    log(f"loss: {loss_fn.description}{objective}; lr {cfg.lr:g} ({cfg.lr_schedule} schedule); device {device}, "
        f"precision {precision}, {memory_format}, Adam {runtime.adam_implementation(optimizer)}"
        f"{', compiled' if cfg.compile else ''}; world size {info.world_size}, batch {cfg.batch_size} per process")
    if format_note:
        log(f"note: {format_note}")
    if init:
        log(f"starting from the weights of {cfg.init} with a fresh Adam optimizer, epochs counted from 0")
    if fine_tune:
        log(f"fine-tuning from {ckpt_path}: its weights, a fresh Adam optimizer (the file holds no optimizer "
            "state), epochs counted from 0")
    elif resumed:
        log(f"resuming from {ckpt_path} at epoch {start_epoch}")
    if start_epoch >= cfg.epochs:
        log(f"nothing to do: the checkpoint is already at epoch {start_epoch} of {cfg.epochs}")

    cl = memory_format == "channels_last"
    train_loader = BatchLoader(data.train, cfg.batch_size, device, shuffle=True, seed=cfg.seed,
                               rank=info.rank, world_size=info.world_size, channels_last=cl)
    test_loader = BatchLoader(data.test, cfg.batch_size, device, rank=info.rank, world_size=info.world_size,
                              channels_last=cl)
    fixed = data.test[: cfg.num_images].to(device).float().div(255)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    forward = runtime.CompiledOrEager(net, cfg.compile, "model", log)

    board = tensorboard_writer(out) if cfg.tensorboard and info.is_main else None
    # one writer per run folder (rank 0 writes; the lock is released when the block ends or the process dies)
    with folder_lock(out, "training run") if info.is_main else contextlib.nullcontext():
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "metrics.jsonl", history)  # mirrors the checkpoint (drops rows a crashed run logged)
            picture = out / "reconstructions.png"
            if resumed and not fine_tune and len(fixed) and (
                    not picture.exists() or not picture.with_suffix(".pt").exists()
                    or picture.stat().st_mtime_ns < ckpt_path.stat().st_mtime_ns):
                save_reconstructions(fixed, reconstruct(model, fixed), [picture])  # e.g. killed before it was written

        perceptual = getattr(loss_fn, "perceptual", None)
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss, seen, lr, train_terms = train_one_epoch(
                net, loss_fn, optimizer, train_loader, device, precision, epoch, progress,
                lambda step, epoch=epoch: lr_at(cfg.lr_schedule, cfg.lr, epoch, step, len(train_loader), cfg.epochs),
                forward)
            train_seconds = time.perf_counter() - t0
            check_finite_state(model.state_dict().items(), f"epoch {epoch}")
            test = evaluate(model, test_loader, loss_fn)
            row = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                   **{f"train_{k}": v for k, v in train_terms.items()}, "test_loss": test["loss"],
                   **{f"test_{k}": test[k] for k in TERMS if k in test}, "test_mse": test["mse"],
                   "test_psnr": test["psnr"], "epoch_seconds": time.perf_counter() - t0,
                   "images_per_s": seen * info.world_size / train_seconds, "precision": precision,
                   "memory_format": memory_format, "compiled": forward.active}
            if cfg.loss == "vgg":
                row["loss_is_perceptual"] = perceptual
            history.append(row)
            log(format_row(row, header=epoch == start_epoch + 1))
            if info.is_main:
                append_jsonl(out / "metrics.jsonl", row)
                if board is not None:
                    for key in ("train_loss", "test_loss", "test_mse", "test_psnr", "lr", "images_per_s",
                                *(f"{split}_{k}" for split in ("train", "test") for k in TERMS)):
                        if key in row:  # a VAE's terms
                            board.add_scalar(key, row[key], epoch)
                if epoch % cfg.save_every_epoch == 0 or epoch == cfg.epochs:
                    record = EndpointRecord(kind="endpoint", epoch=epoch, args=args, metrics=history)
                    state = {**record.to_json(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "skipped_images": len(data.skipped)}
                    save_checkpoint(out / f"checkpoint_epoch{epoch:03d}.pt", state)
                    save_checkpoint(out / "checkpoint.pt", state)
                    if len(fixed):  # --num-images 0: no pictures
                        save_reconstructions(fixed, reconstruct(model, fixed), [
                            out / f"reconstructions_epoch{epoch:03d}.png", out / "reconstructions.png"], epoch, board)
        if board is not None:
            board.close()

    summary = {"out": str(out), "epochs": cfg.epochs, "skipped_images": len(data.skipped),
               **({k: history[-1][k] for k in ("train_loss", "test_loss", "test_mse", "test_psnr")} if history else {})}
    log(f"done: {summary.get('epochs')} epochs, test loss {summary.get('test_loss', float('nan')):.5f}, "
        f"test PSNR {summary.get('test_psnr', float('nan')):.2f} dB, {len(data.skipped)} files or folders skipped; "
        f"checkpoint, metrics.jsonl and reconstructions.png in {out}")
    return summary


def resolved_config(cfg: TrainConfig) -> dict:
    """What `aecurves train --print-config` prints: the settings as given, with --width unset for a custom --model
    (and refused when given with one) as the run resolves it, so that the printed file reads back. The rest stays
    as given: a default resolved here (the image size, say) would be written as if chosen, and then not follow an
    edited --dataset or the checkpoint of a --resume."""
    resolved = dataclasses.replace(cfg)
    resolve_train_config(resolved, None, None)
    return {**as_record(cfg), "width": resolved.width}
