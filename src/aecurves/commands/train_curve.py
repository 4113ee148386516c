"""`aecurves train-curve`: a low-loss curve between two trained autoencoders (the paper's train.py).

Each batch draws a fresh t in [0, 1] and minimises
    loss(t) = reconstruction loss at θ(t) + wd/2 · ‖θ(t)‖²
over the free bends, with Adam at the lr of `--lr-schedule` (default: the paper's, set before every step).
t is stratified by default: each epoch's S batches take one t from each of the S equal slices of [0, 1], in
random order, so every epoch covers the whole curve (the paper draws t i.i.d. uniform: `uniform`).
The network's objective alone (its reconstruction loss; for a VAE, that + β·KL/D with its latent sampled, as the
endpoints were trained) is reported as `train_loss`, so it compares with the endpoints' figures; the regulariser
is reported as `train_l2_term`, and a VAE's two terms as `train_distortion` and `train_rate`.

After every epoch the midpoint θ(0.5) is measured exactly as eval-curve measures it (BatchNorm statistics
from the same fixed subset of training images, held-out metrics in fp32), so the last epoch's figure is
eval-curve's value at t = 0.5.
"""

import dataclasses
import functools
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from aecurves import console, runtime, wandb_log
from aecurves.checkpoint import load_checkpoint, load_endpoint_pair, save_checkpoint
from aecurves.config import (
    EVAL_BATCH_SIZE,
    TrainConfig,
    TrainCurveConfig,
    as_record,
    recorded_value,
    role_fields,
    settle_with_checkpoint,
    validate,
)
from aecurves.curves import Curve, CurvePoint, make_coefficients
from aecurves.data import BatchLoader, check_outside_data, load_data_once
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.metrics import check_finite, check_finite_state, evaluate, fixed_subset, usable_memory_format
from aecurves.models import build_model, is_vae
from aecurves.records import refuse_other_outputs
from aecurves.schedules import lr_at, set_lr
from aecurves.training import (
    TABLE_HEAD,
    TABLE_TAIL,
    checkpoint_state,
    epoch_terms,
    metrics_row,
    objective_and_terms,
    run_epochs,
    run_folder,
)

TABLE = (*TABLE_HEAD, ("l2_term", "train_l2_term", "9.5f"), ("mid_test_loss", "mid_test_loss", "9.5f"),
         ("mid_test_mse", "mid_test_mse", "9.5f"), *TABLE_TAIL)  # the epoch table printed (training.epoch_line)


def _same_setting(key: str, a, b) -> bool:
    """Checkpoint and flag agree, comparing paths resolved and curve names in any case."""
    if a is None or b is None:
        return a == b
    if key in ("init_start", "init_end"):  # an endpoint file that moved since: _run checks its weights
        before, now = (Path(p).expanduser().resolve() for p in (a, b))
        return before == now or (not before.exists() and now.is_file())
    if key == "data_dir":
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    if key == "curve":
        return str(a).lower() == str(b).lower()
    return a == b


def resolve_curve_config(cfg: TrainCurveConfig, saved: dict | None, ckpt_path) -> None:
    """On resume, what defines the curve and its data comes from the checkpoint unless given explicitly (and
    then it must agree); epochs, lr and save_every_epoch too unless given, and they may change; device... come from
    the flags. A checkpoint from before a setting existed was trained with its legacy value (a constant lr, uniform
    t), so resuming it keeps that."""
    if saved is not None:
        settle_with_checkpoint(cfg, saved, ckpt_path, _same_setting)
    if not cfg.init_start or not cfg.init_end:
        raise UserError("train-curve needs both endpoints: --init_start CKPT1 --init_end CKPT2 "
                        "(checkpoints written by `aecurves train`).")
    cfg.curve = make_coefficients(cfg.curve, cfg.num_bends).name  # validates before any loading
    if cfg.num_bends == 2 and cfg.fix_start and cfg.fix_end:
        raise UserError("Nothing to train: with --num_bends 2 the curve is the straight segment, and both ends are "
                        "fixed. Use --num_bends 3 (or more), or drop --fix_start/--fix_end. To evaluate the segment "
                        "itself, use `aecurves eval-curve --segment START END`.")


def fill_from_endpoint(cfg: TrainCurveConfig, endpoint_args: dict, end_args: dict) -> None:
    """Data, loss and KL weight default to the start endpoint's (the fields of roles data and model: DataConfig's,
    the loss and β); flags given explicitly win. Endpoints trained with different losses, or different β, need an
    explicit --loss or --kl-weight: either one would be a silent choice. An endpoint from before --kl-weight existed
    was trained with β = 1 (the field's legacy value)."""
    losses = (endpoint_args.get("loss") or "mse", end_args.get("loss") or "mse")
    if cfg.loss is None and losses[0] != losses[1]:
        raise UserError(f"The endpoints were trained with different losses ({losses[0]} and {losses[1]}); pass "
                        f"--loss {losses[0]} or --loss {losses[1]} to say which one the curve minimises.")
    betas = tuple(recorded_value(TrainConfig, "kl_weight", args) for args in (endpoint_args, end_args))
    if cfg.kl_weight is None and betas[0] != betas[1]:
        raise UserError(f"The endpoints were trained with different KL weights (--kl-weight {betas[0]:g} and "
                        f"{betas[1]:g}); pass --kl-weight {betas[0]:g} or --kl-weight {betas[1]:g} to say which "
                        "objective the curve minimises.")
    for k in role_fields(cfg, "data", "model"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, recorded_value(TrainConfig, k, endpoint_args) if k == "kl_weight"
                    else endpoint_args.get(k))
    cfg.use_test = bool(cfg.use_test)  # an endpoint from before --use-test held out the valid partition
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())


def check_fixed_ends(curve: Curve, start_state: dict, end_state: dict, cfg: TrainCurveConfig) -> None:
    """On resume, a fixed end of the curve must still be the endpoint file's network (the file may have been moved,
    or replaced in place)."""
    for k, fixed, state, path in ((0, curve.fix_start, start_state, cfg.init_start),
                                  (-1, curve.fix_end, end_state, cfg.init_end)):
        if fixed and not torch.equal(curve.bends[k].detach().cpu(), curve.flatten(state).cpu()):
            raise UserError(f"The endpoint {path} is not the network this curve was trained from (its fixed "
                            f"{'start' if k == 0 else 'end'}): resuming would join a different network. Pass the "
                            "endpoint the curve was started with, or train a new curve in another --out folder.")


def sample_ts(n: int, generator: torch.Generator, method: str) -> list[float]:
    """The t of each of an epoch's n steps: i.i.d. U(0, 1), or one from each slice [i/n, (i+1)/n) in random order."""
    if method == "stratified":
        return ((torch.randperm(n, generator=generator) + torch.rand(n, generator=generator)) / n).tolist()
    return torch.rand(n, generator=generator).tolist()


def train_curve_one_epoch(net, curve, loss_fn, optimizer, loader, device, precision, epoch, ts, lr_for_step, wd,
                          progress=True):
    """One pass over `loader`, step i at t = ts[i]. Returns (objective, l2 term, images, last lr, a VAE's mean
    distortion and rate or {}): the objective is the network's own (losses.Objective), without the l2 term."""
    curve.train()  # a VAE samples its latent in training mode
    loader.set_epoch(epoch)
    sums = torch.zeros(3, device=device)  # objective*n, l2 term*n, n
    term_sums = None  # a VAE's distortion*n, rate*n
    lr = optimizer.param_groups[0]["lr"]
    bar = console.progress(loader, f"epoch {epoch}", progress, unit="batch")
    for step, x in enumerate(bar):
        t = ts[step]
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        with runtime.autocast(device, precision):
            rec_loss, terms = objective_and_terms(loss_fn, net(x, t), x)
        l2_term = wd / 2 * curve.l2(t) if wd else torch.zeros((), device=device)
        loss = rec_loss + l2_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        sums += torch.stack([rec_loss.detach() * n, l2_term.detach() * n, torch.tensor(float(n), device=device)])
        if terms is not None:
            term_sums = terms * n if term_sums is None else term_sums + terms * n
        if step % 10 == 0:
            value = loss.item()
            check_finite(value, f"epoch {epoch}, step {step} (t={t:.3f})")
            bar.set_postfix(loss=f"{value:.4f}", t=f"{t:.2f}", lr=f"{lr:.1e}")
    sums = runtime.all_reduce_sum(sums if term_sums is None else torch.cat([sums, term_sums]))
    train_loss, l2_mean = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    check_finite(train_loss + l2_mean, f"epoch {epoch}")
    return train_loss, l2_mean, sums[2].item(), lr, epoch_terms(sums[3:] if term_sums is not None else None, sums[2])


def base_runner(base: torch.nn.Module, memory_format: str):
    """f(weights, x): `base` at the weights θ(t). With channels_last batches the convolution kernels are given to it
    in channels_last too, as train's model holds them: a copy of each kernel per step, cheaper than the layout
    change every convolution's forward and backward would otherwise make (measured: docs/performance.md)."""
    def run(weights: dict, x: torch.Tensor) -> torch.Tensor:
        if memory_format == "channels_last":
            weights = {n: w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w
                       for n, w in weights.items()}
        return functional_call(base, weights, (x,))

    return run


def midpoint_monitor(curve, bn_loader, test_loader, loss_fn) -> dict:
    """θ(0.5) measured as eval-curve measures it: BN statistics from its fixed subset, held-out metrics."""
    curve.update_bn(bn_loader, 0.5)
    return evaluate(CurvePoint(curve, 0.5), test_loader, loss_fn)


def run(cfg: TrainCurveConfig) -> dict:
    cfg = dataclasses.replace(cfg)  # resolved below; the caller's config stays as given
    validate(cfg)
    with runtime.distributed(cfg.device) as (info, device):
        return _run(cfg, info, device)


def _run(cfg: TrainCurveConfig, info: runtime.Dist, device: torch.device) -> dict:
    log = print if info.is_main else (lambda *a, **k: None)
    progress = info.is_main and not cfg.no_progress
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    resumed = resolve_resume(cfg, out, ckpt_path)
    resolve_curve_config(cfg, resumed["args"] if resumed else None, ckpt_path)
    a, b, arch = resolve_endpoints(cfg, out)
    precision = runtime.resolve_precision(cfg.precision, device)
    data = load_data_once(info, progress, dataset=cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                          limit=cfg.limit, val_fraction=cfg.val_fraction, use_test=cfg.use_test,
                          cache_dir=cfg.cache_dir)
    check_data_fits(data, arch)

    curve, vae, loss_fn, optimizer = build_curve(cfg, arch, a["model"], b["model"], device)
    history, start_epoch = restore(cfg, curve, optimizer, resumed, a["model"], b["model"], device)
    memory_format, format_note = usable_memory_format(cfg.memory_format, curve.base, curve.weights(0.5),
                                                      data.train[:2].to(device).float().div(255))
    curve.run_base = runtime.CompiledOrEager(base_runner(curve.base, memory_format), cfg.compile, "base network",
                                             log)
    describe(log, cfg, device, precision, data, curve, vae, loss_fn, optimizer, (memory_format, format_note))
    if resumed:
        log(f"resuming from {ckpt_path} at epoch {start_epoch}")
    loaders = make_loaders(cfg, info, data, device, memory_format)
    net = DistributedDataParallel(curve, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else curve

    with run_folder(out, "curve run", info.is_main, history), \
            wandb_log.logging_run(cfg, "train-curve", out, info.is_main) as tracker:
        one_epoch = functools.partial(train_and_monitor, cfg=cfg, info=info, net=net, curve=curve, loss_fn=loss_fn,
                                      optimizer=optimizer, loaders=loaders, device=device, precision=precision,
                                      facts={"precision": precision, "memory_format": memory_format},
                                      progress=progress)
        save = functools.partial(save_curve, path=ckpt_path, args=as_record(cfg), arch=arch, history=history,
                                 curve=curve, optimizer=optimizer)
        run_epochs(range(start_epoch + 1, cfg.epochs + 1), history, one_epoch, TABLE, log,
                   out if info.is_main else None, cfg.save_every_epoch, save, tracker)

    log(f"done: curve checkpoint {ckpt_path}; evaluate it with `aecurves eval-curve --ckpt {ckpt_path}`")
    return {"out": str(out), "checkpoint": str(ckpt_path), **(history[-1] if history else {})}


def resolve_resume(cfg: TrainCurveConfig, out: Path, ckpt_path: Path) -> dict | None:
    """The curve checkpoint --resume continues (None: a new run), after refusing to overwrite a run or to write
    into another command's output."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the curve run (nothing was written).")
    refuse_other_outputs(out, "train-curve", ("evaluation", "plane"))
    if cfg.resume and ckpt_path.is_file():
        return load_checkpoint(ckpt_path, "curve", "curve checkpoint")
    if ckpt_path.exists():
        raise UserError(f"{out} already holds a curve run (checkpoint.pt). Pass --resume to continue it, "
                        "or choose another --dir/--out folder; nothing was overwritten.")
    return None


def resolve_endpoints(cfg: TrainCurveConfig, out: Path) -> tuple[dict, dict, dict]:
    """(start endpoint, end endpoint, their architecture), with the paths resolved and the data and model settings
    filled from the endpoints (fill_from_endpoint)."""
    a, b, arch = load_endpoint_pair(cfg.init_start, cfg.init_end, cfg.model,
                                    data_chosen=bool(cfg.dataset or cfg.data_dir))
    cfg.init_start, cfg.init_end = (str(Path(p).resolve()) for p in (cfg.init_start, cfg.init_end))
    cfg.model = arch["model"]
    fill_from_endpoint(cfg, a["args"], b["args"])
    check_outside_data(out, cfg.data_dir, "--out")
    return a, b, arch


def check_data_fits(data, arch: dict) -> None:
    if data.channels != arch["channels"] or data.image_size != arch["image_size"]:
        raise UserError(f"The data ({data.channels} channels, {data.image_size}px) does not fit the endpoints "
                        f"({arch['channels']} channels, {arch['image_size']}px); drop the --dataset/"
                        "--data_path overrides or pass data like the endpoints were trained on.")


def build_curve(cfg: TrainCurveConfig, arch: dict, start: dict, end: dict, device) -> tuple:
    """(the curve between the endpoints' weights `start` and `end`, its middle bends on their segment unless
    --init-linear-off, whether it is a VAE's, its loss, a fresh Adam over its free bends), from --seed."""
    runtime.seed_everything(cfg.seed)
    curve = Curve(build_model(arch), cfg.curve, cfg.num_bends, cfg.fix_start, cfg.fix_end)
    vae = is_vae(curve.base, arch)  # on the CPU, before the move: it feeds the network a batch made there
    curve.set_endpoints(start, end)
    if not cfg.init_linear_off:
        curve.init_linear()
    curve.to(device)
    loss_fn = make_loss(cfg.loss, cfg.vgg_weights, cfg.kl_weight).to(device)
    optimizer = runtime.adam([p for p in curve.bends if p.requires_grad], lr=cfg.lr)
    return curve, vae, loss_fn, optimizer


def restore(cfg: TrainCurveConfig, curve: Curve, optimizer, resumed: dict | None, start: dict, end: dict,
            device) -> tuple[list, int]:
    """(metrics rows so far, the epoch to start after): a resumed run's bends, optimizer state and metrics."""
    if not resumed:
        return [], 0
    curve.load_curve_state(resumed["curve"])
    check_fixed_ends(curve, start, end, cfg)
    curve.to(device)
    runtime.load_optimizer_state(optimizer, resumed["optimizer"])
    return list(resumed["metrics"]), resumed["epoch"]


def describe(log, cfg: TrainCurveConfig, device, precision: str, data, curve: Curve, vae: bool, loss_fn, optimizer,
             memory_format: tuple[str, str]) -> None:
    """The data, the curve, its objective and how the run computes, as printed before the first epoch."""
    memory_format, format_note = memory_format
    log(f"data: {data.source}")
    log(f"curve: {cfg.curve} with {cfg.num_bends} bends between {cfg.init_start} and {cfg.init_end}; "
        f"start {'fixed' if cfg.fix_start else 'free'}, end {'fixed' if cfg.fix_end else 'free'}, "
        f"{curve.num_trainable():,} trainable parameters")
    objective = f" + β·KL/D with β = --kl-weight {cfg.kl_weight:g} (a VAE, its latent sampled)" if vae else ""
    log(f"loss: {loss_fn.description}{objective} + wd/2·‖θ(t)‖² with wd={cfg.wd}; Adam lr {cfg.lr:g} "
        f"({cfg.lr_schedule} schedule), t {cfg.t_sampling}; device {device}, precision {precision}, "
        f"{memory_format}, Adam {runtime.adam_implementation(optimizer)}{', compiled' if cfg.compile else ''}")
    if format_note:
        log(f"note: {format_note}")
    log(f"monitor: θ(0.5) on the held-out images after BN statistics from {min(cfg.bn_images, len(data.train))} "
        "training images (eval-curve's protocol)")


class Loaders(NamedTuple):
    train: BatchLoader  # this process's shard, reshuffled every epoch
    bn: BatchLoader  # the fixed subset of training images the midpoint's BN statistics come from
    test: BatchLoader  # this process's shard of the held-out images


def make_loaders(cfg: TrainCurveConfig, info: runtime.Dist, data, device, memory_format: str) -> Loaders:
    """The monitor uses eval-curve's protocol: the same fixed BN subset and batch size (BN statistics are averaged
    per batch), so its last figure is eval-curve's at t = 0.5."""
    cl = memory_format == "channels_last"
    return Loaders(BatchLoader(data.train, cfg.batch_size, device, shuffle=True, seed=cfg.seed, rank=info.rank,
                               world_size=info.world_size, channels_last=cl),
                   BatchLoader(fixed_subset(data.train, cfg.bn_images), EVAL_BATCH_SIZE, device, channels_last=cl),
                   BatchLoader(data.test, EVAL_BATCH_SIZE, device, rank=info.rank, world_size=info.world_size,
                               channels_last=cl))


def train_and_monitor(epoch: int, cfg: TrainCurveConfig, info: runtime.Dist, net, curve: Curve, loss_fn, optimizer,
                      loaders: Loaders, device, precision: str, facts: dict, progress: bool) -> dict:
    """One epoch: training at the epoch's t, a check that the bends and the BN buffers stayed finite, the
    midpoint's held-out metrics; its metrics row."""
    t0 = time.perf_counter()
    # t comes from a generator seeded by (seed, epoch, rank): reproducible, and resumable per epoch
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + info.rank)
    ts = sample_ts(len(loaders.train), gen, cfg.t_sampling)
    train_loss, l2_mean, seen, lr, train_terms = train_curve_one_epoch(
        net, curve, loss_fn, optimizer, loaders.train, device, precision, epoch, ts,
        lambda step: lr_at(cfg.lr_schedule, cfg.lr, epoch, step, len(loaders.train), cfg.epochs), cfg.wd, progress)
    train_seconds = time.perf_counter() - t0
    check_finite_state([*((f"bend {k}", b) for k, b in enumerate(curve.bends)), *curve.base.named_buffers()],
                       f"epoch {epoch}")
    mid = midpoint_monitor(curve, loaders.bn, loaders.test, loss_fn)
    return metrics_row(epoch, lr, {"loss": train_loss, "l2_term": l2_mean, **train_terms}, mid, "mid_test_",
                       (t0, train_seconds, seen), {**facts, "compiled": curve.run_base.active})


def save_curve(epoch: int, path: Path, args: dict, arch: dict, history: list, curve: Curve, optimizer) -> None:
    record = {"kind": "curve", "model_config": arch, "epoch": epoch, "args": args, "metrics": history}
    save_checkpoint(path, checkpoint_state(record, {"curve": curve.curve_state()}, optimizer))
