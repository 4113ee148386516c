"""`aecurves train`: one autoencoder, one seed, read top to bottom.

`run(cfg)` takes a `config.TrainConfig`. It works alone or under torchrun (DistributedDataParallel;
--batch-size is per process, as in torchvision's references).
"""

import dataclasses
import functools
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from aecurves import runtime, wandb_log
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
from aecurves.data import BatchLoader, check_outside_data, load_data_once
from aecurves.errors import UserError
from aecurves.files import atomic_path
from aecurves.losses import make_loss, reconstruction
from aecurves.metrics import check_finite_state, evaluate, usable_memory_format
from aecurves.models import arch_of, build_model, is_vae, num_parameters
from aecurves.records import HELD_OUT_FORMAT, EndpointRecord, refuse_other_outputs
from aecurves.schedules import lr_at
from aecurves.training import (
    TABLE_HEAD,
    TABLE_TAIL,
    TERMS,
    checkpoint_state,
    metrics_row,
    run_epochs,
    run_folder,
    train_one_epoch,
)

TABLE = (*TABLE_HEAD, ("test_loss", "test_loss", "9.5f"), ("test_mse", "test_mse", "9.5f"),
         ("test_psnr", "test_psnr", "7.2f"), *TABLE_TAIL)  # the epoch table printed (training.epoch_line)
BOARD_KEYS = ("train_loss", "test_loss", "test_mse", "test_psnr", "lr", "images_per_s",
              *(f"{split}_{k}" for split in ("train", "test") for k in TERMS))  # what --tensorboard plots


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
    resumed, ckpt_path, init = resolve_sources(cfg, out)
    precision = runtime.resolve_precision(cfg.precision, device)
    data = load_data_once(info, progress, dataset=cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                          limit=cfg.limit, val_fraction=cfg.val_fraction, use_test=cfg.use_test,
                          cache_dir=cfg.cache_dir)
    args = {**as_record(cfg), "channels": data.channels}  # what the checkpoint records
    arch = arch_of(args)
    for state, where in ((resumed, ckpt_path), (init, cfg.init)):
        if state:
            check_same_arch(state["args"], args, where, "the data of this run")

    net = build_network(cfg, arch, data, device)
    fine_tune = bool(resumed) and not resumed["optimizer"]  # e.g. a point exported from a curve
    history, start_epoch = restore(net, resumed, init, ckpt_path if resumed else cfg.init, fine_tune)
    describe_setup(log, cfg, info, device, precision, data, arch, net)
    describe_start(log, cfg, ckpt_path, resumed, fine_tune, start_epoch)
    loaders = make_loaders(cfg, info, data, device, net.memory_format)
    net = wrap_for_training(net, cfg, info, device, log)

    board = tensorboard_writer(out) if cfg.tensorboard and info.is_main else None
    with run_folder(out, "training run", info.is_main, history), \
            wandb_log.logging_run(cfg, "train", out, info.is_main) as tracker:
        if info.is_main and resumed and not fine_tune:
            refresh_picture(out / "reconstructions.png", ckpt_path, net.model, loaders.fixed)
        one_epoch = functools.partial(train_and_measure, cfg=cfg, info=info, net=net, loaders=loaders, device=device,
                                      precision=precision, progress=progress, board=board)
        save = functools.partial(save_endpoint, out=out, args=args, history=history, net=net,
                                 skipped=len(data.skipped), fixed=loaders.fixed, board=board)
        run_epochs(range(start_epoch + 1, cfg.epochs + 1), history, one_epoch, TABLE, log,
                   out if info.is_main else None, cfg.save_every_epoch, save, tracker)
        if board is not None:
            board.close()
    return summarize(log, out, cfg.epochs, history, len(data.skipped))


def resolve_sources(cfg: TrainConfig, out: Path) -> tuple:
    """(the checkpoint resumed or None, its path or None, the endpoint --init starts from or None), with the
    settings resolved from them (resolve_train_config)."""
    start = resolve_start(cfg, out)
    resumed, ckpt_path = start if start else (None, None)
    init = resolve_init(cfg, resumed)
    resolve_train_config(cfg, resumed["args"] if resumed else None, ckpt_path, init)
    check_outside_data(out, cfg.data_dir, "--out")
    return resumed, ckpt_path, init


class Network(NamedTuple):
    """What the run trains: the model, its loss and Adam, the memory format of its weights and batches (with a
    note when it is not the one asked for), whether it is a VAE; then (wrap_for_training) `wrapped`, the model in
    DistributedDataParallel under torchrun (else the model), and `forward`, that through torch.compile or not."""
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    memory_format: str
    format_note: str
    vae: bool
    wrapped: torch.nn.Module | None = None
    forward: runtime.CompiledOrEager | None = None


def build_network(cfg: TrainConfig, arch: dict, data, device: torch.device) -> Network:
    """The model initialised from --seed, on `device`, its loss and a fresh Adam."""
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
    return Network(model, loss_fn, optimizer, memory_format, format_note, vae)


def restore(net: Network, resumed: dict | None, init: dict | None, source, fine_tune: bool) -> tuple[list, int]:
    """(metrics rows so far, the epoch to start after): the weights of the checkpoint resumed or of the endpoint
    --init starts from (`source`: its path), and a resumed run's optimizer state and metrics, unless it is a
    fine-tuning (a checkpoint without optimizer state: a fresh Adam, epochs counted from 0)."""
    if resumed or init:
        check_fits(net.model.state_dict(), (resumed or init)["model"], source)
        net.model.load_state_dict((resumed or init)["model"])
    if resumed and not fine_tune:
        runtime.load_optimizer_state(net.optimizer, resumed["optimizer"])
        return list(resumed["metrics"]), resumed["epoch"]
    return [], 0


def describe_setup(log, cfg: TrainConfig, info: runtime.Dist, device, precision: str, data, arch: dict,
                   net: Network) -> None:
    """The data, model, loss and how the run computes, as printed before the first epoch."""
    log(f"data: {data.source}" + (f" ({len(data.skipped)} files or folders skipped, named in the warning above)"
                                if data.skipped else ""))
    settings = ", ".join(f"{k}={v}" for k, v in arch.items() if k not in ("model", "model_kwargs") and v is not None)
    kwargs = f" {arch['model_kwargs']}" if arch["model_kwargs"] else ""
    log(f"model: {arch['model']}{kwargs} {settings}: {num_parameters(net.model):,} parameters")
    objective = f" + β·KL/D with β = --kl-weight {cfg.kl_weight:g} (a VAE)" if net.vae else ""
    log(f"loss: {net.loss_fn.description}{objective}; lr {cfg.lr:g} ({cfg.lr_schedule} schedule); device {device}, "
        f"precision {precision}, {net.memory_format}, Adam {runtime.adam_implementation(net.optimizer)}"
        f"{', compiled' if cfg.compile else ''}; world size {info.world_size}, batch {cfg.batch_size} per process")
    if net.format_note:
        log(f"note: {net.format_note}")


def describe_start(log, cfg: TrainConfig, ckpt_path, resumed, fine_tune: bool, start_epoch: int) -> None:
    """Where the run starts from: --init's endpoint, a fine-tuned or resumed checkpoint, or nothing left to do."""
    if cfg.init and not resumed:
        log(f"starting from the weights of {cfg.init} with a fresh Adam optimizer, epochs counted from 0")
    if fine_tune:
        log(f"fine-tuning from {ckpt_path}: its weights, a fresh Adam optimizer (the file holds no optimizer "
            "state), epochs counted from 0")
    elif resumed:
        log(f"resuming from {ckpt_path} at epoch {start_epoch}")
    if start_epoch >= cfg.epochs:
        log(f"nothing to do: the checkpoint is already at epoch {start_epoch} of {cfg.epochs}")


class Loaders(NamedTuple):
    train: BatchLoader  # this process's shard, reshuffled every epoch
    test: BatchLoader  # this process's shard of the held-out images
    fixed: torch.Tensor  # the first --num-images held-out images, in [0, 1]: the reconstruction pictures'


def make_loaders(cfg: TrainConfig, info: runtime.Dist, data, device, memory_format: str) -> Loaders:
    cl = memory_format == "channels_last"
    return Loaders(BatchLoader(data.train, cfg.batch_size, device, shuffle=True, seed=cfg.seed, rank=info.rank,
                               world_size=info.world_size, channels_last=cl),
                   BatchLoader(data.test, cfg.batch_size, device, rank=info.rank, world_size=info.world_size,
                               channels_last=cl),
                   data.test[: cfg.num_images].to(device).float().div(255))


def wrap_for_training(net: Network, cfg: TrainConfig, info: runtime.Dist, device, log) -> Network:
    """`net` with `wrapped` (DistributedDataParallel under torchrun) and `forward` (through torch.compile with
    --compile) set."""
    wrapped = DistributedDataParallel(net.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else net.model
    return net._replace(wrapped=wrapped, forward=runtime.CompiledOrEager(wrapped, cfg.compile, "model", log))


def refresh_picture(picture: Path, ckpt_path: Path, model, fixed: torch.Tensor) -> None:
    """On resume, reconstructions.png (and .pt) of the checkpoint again when missing or older than it (e.g. the run
    was killed between the checkpoint's write and the picture's)."""
    if len(fixed) and (not picture.exists() or not picture.with_suffix(".pt").exists()
                       or picture.stat().st_mtime_ns < ckpt_path.stat().st_mtime_ns):
        save_reconstructions(fixed, reconstruct(model, fixed), [picture])


def train_and_measure(epoch: int, cfg: TrainConfig, info: runtime.Dist, net: Network, loaders: Loaders, device,
                      precision: str, progress: bool, board) -> dict:
    """One epoch: training, a check that the weights stayed finite, the held-out metrics; its metrics row (also
    given to tensorboard with --tensorboard)."""
    t0 = time.perf_counter()
    trained = train_one_epoch(
        net.wrapped, net.loss_fn, net.optimizer, loaders.train, device, precision, epoch, progress,
        lambda step: lr_at(cfg.lr_schedule, cfg.lr, epoch, step, len(loaders.train), cfg.epochs), net.forward)
    train_seconds = time.perf_counter() - t0
    check_finite_state(net.model.state_dict().items(), f"epoch {epoch}")
    test = evaluate(net.model, loaders.test, net.loss_fn)
    facts = {"precision": precision, "memory_format": net.memory_format, "compiled": net.forward.active}
    if cfg.loss == "vgg":
        facts["loss_is_perceptual"] = getattr(net.loss_fn, "perceptual", None)
    row = metrics_row(epoch, trained.lr, {"loss": trained.loss, **trained.terms}, test, "test_",
                      (t0, train_seconds, trained.seen * info.world_size), facts)
    if board is not None:
        for key in BOARD_KEYS:
            if key in row:  # a VAE's terms
                board.add_scalar(key, row[key], epoch)
    return row


def save_endpoint(epoch: int, out: Path, args: dict, history: list, net: Network, skipped: int,
                  fixed: torch.Tensor, board) -> None:
    """checkpoint.pt and checkpoint_epoch{epoch}.pt, and the reconstruction pictures (none with --num-images 0)."""
    record = EndpointRecord(kind="endpoint", epoch=epoch, args=args, metrics=history).to_json()
    state = checkpoint_state({**record, "skipped_images": skipped}, {"model": net.model.state_dict()}, net.optimizer)
    save_checkpoint(out / f"checkpoint_epoch{epoch:03d}.pt", state)
    save_checkpoint(out / "checkpoint.pt", state)
    if len(fixed):
        save_reconstructions(fixed, reconstruct(net.model, fixed), [
            out / f"reconstructions_epoch{epoch:03d}.png", out / "reconstructions.png"], epoch, board)


def summarize(log, out: Path, epochs: int, history: list, skipped: int) -> dict:
    """What run returns (the last epoch's figures), as the last line printed says it."""
    summary = {"out": str(out), "epochs": epochs, "skipped_images": skipped,
               **({k: history[-1][k] for k in ("train_loss", "test_loss", "test_mse", "test_psnr")} if history else {})}
    log(f"done: {summary.get('epochs')} epochs, test loss {summary.get('test_loss', float('nan')):.5f}, "
        f"test PSNR {summary.get('test_psnr', float('nan')):.2f} dB, {skipped} files or folders skipped; "
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
