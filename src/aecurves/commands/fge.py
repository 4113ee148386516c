"""`aecurves fge --ckpt ENDPOINT`: fast geometric ensembling (Garipov et al. 2018, Sec. 4), read top to bottom.

From one trained endpoint, FGE trains on with a cyclical learning rate, takes a snapshot of the network at the
lowest lr of every cycle, and ensembles the snapshots by averaging their outputs. It follows fge.py of
timgaripov/dnn-mode-connectivity:

- the lr is set before every step to utils.cyclic_learning_rate(epoch, cycle, lr_1, lr_2)(step / steps):
  linearly from lr_1 down to lr_2 over the first half of each cycle of `--cycle` epochs (even, default 4), then
  back up (schedules.cyclic_lr);
- a snapshot is taken at the end of every epoch e (counted from 0, as fge.py does) with (e mod cycle) + 1 ==
  cycle / 2 (schedules.is_snapshot_epoch): with the defaults, `--epochs 20 --cycle 4`, after epochs 1, 5, 9, 13
  and 17;
- training starts from the endpoint's weights and optimizer state, and minimises the endpoint's objective: its
  reconstruction loss and, for a VAE, β·KL/D with the endpoint's β (--kl-weight), the latent sampled;
- the ensemble (the snapshots' average output) is measured on the held-out images (fge.py: the test split).

Where it differs from fge.py, and why (docs/paper.md says the same):
- Adam, not SGD with momentum 0.9: the endpoints are trained with Adam (train.py). Its state is loaded from the
  endpoint checkpoint when that holds one that fits the network, else the optimizer starts fresh (a point
  written by export-point holds none); fge.json ("optimizer") and the log say which.
- lr_1 defaults to the endpoint's own training lr (its checkpoint's args["lr"]) instead of 0.05, an SGD lr; lr_2
  to lr_1 × 0.002, fge.py's ratio 1e-4 / 0.05; the weight decay to the endpoint's (Adam's weight_decay, 0 for
  the founding document's training) instead of 1e-4. The batch size defaults to the endpoint's too.
- BatchNorm statistics are recomputed for every snapshot, and for the starting endpoint, on the fixed subset
  of `--bn-images` training images that eval-curve uses (metrics.fixed_subset, in batches of
  config.EVAL_BATCH_SIZE), and saved in the snapshot; fge.py evaluates with the running statistics of
  training. The run's own training statistics are left as they are, so recomputing changes nothing that
  follows.
- The ensemble of an autoencoder averages reconstructions (a classifier's averages softmax outputs), measured by
  MSE, PSNR (mean of per-image PSNR) and SSIM (for images of at least 11 px), beside every snapshot and the
  starting endpoint (metrics.evaluate_averages, the engine of eval-curve's ensembles).
- Every snapshot is saved as an ordinary endpoint checkpoint, OUT/snapshot_K.pt (K from 1), which every command
  accepts (its optimizer state is left out, as export-point's points); fge.py saves a checkpoint at every half
  cycle, snapshot or not.
- Resumable like `train`: OUT/checkpoint.pt holds the training state after every epoch, and `--resume` reaches
  the same final state as an uninterrupted run (the shuffling of epoch e is a permutation seeded by --seed and
  e, so no epoch is replayed); `--resume --epochs N` trains a finished run on to N epochs.

Outputs in --out (default runs/fge): snapshot_K.pt, checkpoint.pt, metrics.jsonl (one row per epoch), fge.json
(records.FgeRecord, written last: the config, the schedule, per-epoch lr and loss, the snapshot epochs, every
network's metrics and the ensemble's), reconstructions.png (held-out images, the endpoint, every snapshot and the
average).
"""

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch.func import functional_call

from aecurves import console, runtime, wandb_log
from aecurves.checkpoint import arch_mismatch, check_fits, load_checkpoint, save_checkpoint, trusted_arch
from aecurves.config import (
    EVAL_BATCH_SIZE,
    FGE_LR_2_RATIO,
    MAX_LR,
    SUBSET_SEED,
    FgeConfig,
    TrainConfig,
    as_record,
    is_given,
    recorded_value,
    settle_with_checkpoint,
    validate,
)
from aecurves.curves import batchnorms, recompute_bn
from aecurves.data import BatchLoader, check_outside_data, load_run_data
from aecurves.errors import UserError
from aecurves.files import append_jsonl, folder_lock, read_json, sha256, write_json, write_jsonl
from aecurves.losses import make_loss
from aecurves.metrics import average_outputs, check_finite_state, evaluate, evaluate_averages, fixed_subset
from aecurves.models import build_model, is_vae, num_parameters
from aecurves.records import FgeRecord, snapshot_file
from aecurves.schedules import cyclic_lr, is_snapshot_epoch, snapshot_epochs
from aecurves.ssim import SSIM_WINDOW
from aecurves.training import TERMS, term_columns, train_one_epoch

COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_mse", "snapshot", "seconds", "images/s"]
INTERRUPTED = ("interrupted; the epochs and snapshots finished so far are kept in {out}: run the same command with "
               "--resume to continue")
DEFAULT_BATCH_SIZE = TrainConfig.__dataclass_fields__["batch_size"].default
ADAM_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
FRESH = "fresh Adam"  # how fge.json's "optimizer" note of a run that started with a fresh Adam begins


@dataclasses.dataclass
class Plan:
    """What a run starts from, once every input was checked (nothing written yet)."""
    out: Path
    endpoint: dict            # the endpoint checkpoint
    endpoint_sha256: str
    arch: dict
    resumed: dict | None      # OUT/checkpoint.pt on --resume
    found: tuple              # run_state(out) when it was checked


def run(cfg: FgeConfig) -> dict:
    cfg = dataclasses.replace(cfg)  # resolved below; the caller's config stays as given
    check_config(cfg)
    plan = resolve(cfg)
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    eargs = plan.endpoint["args"]
    data = load_run_data(eargs, cfg.cache_dir, progress=not cfg.no_progress)
    if data.channels != plan.arch["channels"] or data.image_size != plan.arch["image_size"]:
        raise UserError(f"The data of the endpoint {cfg.ckpt} ({data.channels} channels, {data.image_size}px) does "
                        f"not fit its network ({plan.arch['channels']} channels, {plan.arch['image_size']}px): the "
                        "checkpoint is damaged or its data has changed; nothing was written.")
    if len(data.train) == 0:
        raise UserError(f"The endpoint's training split is empty ({data.source}); FGE has nothing to train on.")
    loss_name = eargs.get("loss") or "mse"
    loss_fn = make_loss(loss_name, cfg.vgg_weights, cfg.kl_weight).to(device)
    # one writer per run folder (released when the block ends or the process dies)
    with folder_lock(plan.out, "FGE run"):
        if run_state(plan.out) != plan.found:
            raise UserError(f"Another aecurves process changed the run in {plan.out} while this one was starting; "
                            "run the command again. Nothing was changed.")
        with wandb_log.logging_run(cfg, "fge", plan.out) as tracker:
            return _run(cfg, plan, data, loss_fn, loss_name, device, precision, tracker)


def check_config(cfg: FgeConfig) -> None:
    """What can be checked without reading a file."""
    validate(cfg)
    if cfg.cycle % 2:
        raise UserError(f"--cycle must be an even number of epochs, got {cfg.cycle}: a snapshot is taken at the end "
                        "of each cycle's first half, where the lr is lowest (fge.py asserts an even cycle). Pass "
                        "--cycle 2, 4 (the default), 6 ...")


def check_schedule(cfg: FgeConfig) -> None:
    """The settings once resolved (from the flags, a resumed checkpoint and the endpoint)."""
    first = cfg.cycle // 2
    if cfg.epochs < first:
        raise UserError(f"--epochs {cfg.epochs} is shorter than half a cycle (--cycle {cfg.cycle}), so no snapshot "
                        f"would be taken: the first is taken at the end of epoch {first} (counting from 1). Pass "
                        f"--epochs {first} or more (fge.py's default: 20 with --cycle 4), or a shorter --cycle; "
                        "nothing was written.")
    if cfg.lr_2 > cfg.lr_1:
        raise UserError(f"--lr-2 {cfg.lr_2:g} is larger than --lr-1 {cfg.lr_1:g}: lr_1 is the highest lr of each "
                        "cycle and lr_2 the lowest, where the snapshots are taken. Swap them, or lower --lr-2 "
                        f"(default: --lr-1 x {FGE_LR_2_RATIO:g}); nothing was written.")


def _same_setting(key, saved, given) -> bool:
    """Checkpoint and flag agree. An endpoint moved since the run started agrees at its new path, as train-curve's
    do: resolve() then compares its content with the run's record (endpoint_sha256)."""
    if key == "ckpt":
        before, now = (Path(p).expanduser().resolve() for p in (saved, given))
        return before == now or (not before.exists() and now.is_file())
    return saved == given


def resolve(cfg: FgeConfig) -> Plan:
    """Every input checked, every setting resolved (in place), nothing written: a refused run leaves no trace."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the FGE run (nothing was written).")
    own, record = out / "checkpoint.pt", out / "fge.json"
    resumed = None
    if own.exists() or record.exists() or any(out.glob("snapshot_*.pt")):
        if not cfg.resume:
            if record.exists():
                done = read_json(record)
                what = (f" ({done['budget_epochs']} epochs, {len(done['snapshots'])} snapshots)"
                        if isinstance(done, dict) and "budget_epochs" in done and "snapshots" in done else "")
                raise UserError(f"{out} already holds a finished FGE run{what} (fge.json). To train it on and take "
                                "more snapshots, pass --resume --epochs N with N larger than its epochs; to start "
                                "over, choose another --out folder. Nothing was changed.")
            raise UserError(f"{out} already holds a run (checkpoint.pt or snapshot files). Pass --resume to continue "
                            "the FGE run in it, or choose another --out folder; nothing was overwritten.")
        if not own.is_file() and record.exists():
            raise UserError(f"{out} holds an FGE record (fge.json) but no checkpoint.pt to resume from; choose "
                            "another --out folder. Nothing was changed.")
        if own.is_file():  # else only snapshots of a run killed before its first checkpoint: they are retaken
            resumed = load_checkpoint(own, "fge", "FGE run checkpoint")
            trusted_arch(resumed["model_config"], cfg.model, own)
            settle_with_checkpoint(cfg, resumed["args"], own, same=_same_setting)
            check_config(cfg)
    if not cfg.ckpt:
        raise UserError("fge needs --ckpt ENDPOINT: the endpoint checkpoint to start from (from `aecurves train` "
                        "or `aecurves export-point`); only --resume of a run in --out takes it from the run.")
    ckpt = Path(cfg.ckpt).expanduser().resolve()
    if resumed is not None and not is_given(cfg, "ckpt") and not ckpt.exists():
        raise UserError(f"The endpoint the FGE run in {out} started from, {ckpt}, is no longer there. If it moved, "
                        "pass --ckpt with its new path (its content is checked against the run's record); nothing "
                        "was changed.")
    cfg.ckpt = str(ckpt)
    if ckpt.parent == out.resolve() and is_output(ckpt.name):
        raise UserError(f"--ckpt {ckpt} is a file this run writes in --out {out}; pass the endpoint to start from and "
                        "another --out folder. Nothing was written.")
    endpoint = load_checkpoint(ckpt, "endpoint", "endpoint (--ckpt)")
    arch = trusted_arch(endpoint["args"], cfg.model, ckpt)
    check_fits(build_model(arch).state_dict(), endpoint["model"], ckpt, "endpoint (--ckpt)")
    digest = sha256(ckpt)
    if resumed is not None:
        if arch_mismatch(resumed["model_config"], arch) or resumed["fge"].get("endpoint_sha256") != digest:
            raise UserError(f"The endpoint {ckpt} is not the file the FGE run in {out} started from (its content "
                            f"differs from the one recorded for {resumed['args'].get('ckpt')}). Pass that endpoint, "
                            "or start a new run in another --out folder; nothing was changed.")
    settle_from_endpoint(cfg, endpoint["args"], ckpt)
    validate(cfg)  # the endpoint's values within the flags' bounds too
    check_schedule(cfg)
    if resumed is not None and cfg.epochs < resumed["epoch"]:
        raise UserError(f"The FGE run in {out} has already trained {resumed['epoch']} epochs; --epochs {cfg.epochs} "
                        f"would take it back. Pass --epochs {resumed['epoch']} or more; nothing was changed.")
    check_outside_data(out, endpoint["args"].get("data_dir"), "--out")
    return Plan(out, endpoint, digest, arch, resumed, run_state(out))


def is_output(name: str) -> bool:
    """A file name this command writes in --out and reads back."""
    return name in ("checkpoint.pt", "fge.json") or name.startswith("snapshot_")


def run_state(out: Path) -> tuple:
    """What --out holds now, to notice another process that changed it after it was checked."""
    if not out.is_dir():
        return ()
    return tuple((p.name, p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if is_output(p.name))


def settle_from_endpoint(cfg: FgeConfig, eargs: dict, ckpt) -> None:
    """The defaults that come from the endpoint: lr_1 (its training lr), lr_2, weight decay, batch size and KL
    weight (an endpoint from before --kl-weight existed was trained with 1, the field's legacy value)."""
    if cfg.kl_weight is None:
        cfg.kl_weight = float(recorded_value(TrainConfig, "kl_weight", eargs))
    if cfg.lr_1 is None:
        lr = eargs.get("lr")
        if not _number(lr) or not 0 < lr <= MAX_LR:
            raise UserError(f"The endpoint {ckpt} records no training lr (a point written by export-point holds "
                            "none), and --lr-1 defaults to it: pass --lr-1 (e.g. the lr its endpoints were trained "
                            "with); nothing was written.")
        cfg.lr_1 = float(lr)
    if cfg.lr_2 is None:
        cfg.lr_2 = cfg.lr_1 * FGE_LR_2_RATIO
    if cfg.wd is None:
        cfg.wd = float(eargs["wd"]) if _number(eargs.get("wd")) else 0.0
    if cfg.batch_size is None:
        size = eargs.get("batch_size")
        cfg.batch_size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 \
            else DEFAULT_BATCH_SIZE


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------------------
# training


@dataclasses.dataclass
class Training:
    """What a run trains: the network, its optimizer, the rows of the epochs done and the snapshots taken."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_note: str       # fge.json's "optimizer": where its state came from
    history: list
    start_epoch: int
    snapshots: list


@dataclasses.dataclass
class Loaders:
    train: BatchLoader        # shuffled, a permutation seeded by --seed and the epoch
    test: BatchLoader         # the held-out images
    bn: BatchLoader | None    # eval-curve's fixed subset of training images; None when the network has no BatchNorm
    bn_images: int            # images in that subset (0 without BatchNorm)


def _run(cfg: FgeConfig, plan: Plan, data, loss_fn, loss_name: str, device, precision: str, tracker) -> dict:
    """The run: the network and optimizer where it starts, its epochs (a snapshot at the end of each cycle's first
    half), then the endpoint, every snapshot and their output average measured on the held-out images, fge.json
    written last. `tracker` (wandb_log) gets each epoch's row and the measured start and ensemble."""
    out = plan.out
    runtime.seed_everything(cfg.seed)
    run, vae = start_training(cfg, plan, device)
    loaders = make_loaders(cfg, data, run.model, device)
    print_start(cfg, plan, data, run, loaders, loss_fn, vae, device, precision)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "metrics.jsonl", run.history)  # mirrors the checkpoint (drops rows a crashed run logged)
    for epoch in range(run.start_epoch, cfg.epochs):
        train_epoch(cfg, plan, run, epoch, loss_fn, loaders, device, precision)
        tracker.log(run.history[-1], epoch)
    if run.start_epoch >= cfg.epochs:
        print(f"nothing to train: the run is already at epoch {run.start_epoch} of {cfg.epochs}; measuring")

    t0 = time.perf_counter()
    notes = measurement_notes(data.image_size, loaders)
    fixed = data.test[: cfg.num_images].to(device).float().div(255)
    measured = measure(plan, run.snapshots, loaders.test, loaders.bn, data.image_size >= SSIM_WINDOW, fixed, device)
    seconds = {"training": sum(r["epoch_seconds"] for r in run.history), "evaluation": time.perf_counter() - t0}
    files = {"json": str(out / "fge.json"), "metrics": str(out / "metrics.jsonl"),
             "checkpoint": str(out / "checkpoint.pt"), "snapshots": [str(out / s["file"]) for s in run.snapshots]}
    if len(fixed):
        files["reconstructions"] = str(out / "reconstructions.png")
        save_picture(out / "reconstructions.png", fixed, measured["reconstructions"], run.snapshots)
    record = make_record(cfg, plan, data, run, loss_fn, loss_name, loaders, measured, notes, str(device), precision,
                         seconds, files)
    write_json(out / "fge.json", record.to_json())  # last: its presence marks a finished run
    print_done(cfg, out, record)
    results = measured["results"]
    tracker.summary({k: record.get(k) for k in ("start", "ensemble", "ensemble_mse_gain")})  # fge.json's numbers
    return {"out": str(out), "epochs": cfg.epochs, "snapshot_epochs": record.get("snapshot_epochs"),
            "start": results["start"], "ensemble": results["ensemble"],
            "snapshots": [results[f"snapshot_{s['index']}"] for s in run.snapshots], "files": files}


def start_training(cfg: FgeConfig, plan: Plan, device) -> tuple[Training, bool]:
    """(the run where it starts, whether its network is a VAE): the endpoint's weights and optimizer state (a fresh
    Adam when it holds none that fits), or on --resume the run's own checkpoint."""
    model = build_model(plan.arch)
    vae = is_vae(model, plan.arch)  # on the CPU, before the move: it feeds the network a batch made there
    model.to(device)
    resumed = plan.resumed
    source, source_path = (resumed, plan.out / "checkpoint.pt") if resumed else (plan.endpoint, cfg.ckpt)
    check_fits(model.state_dict(), source["model"], source_path)
    model.load_state_dict(source["model"])
    if resumed:
        note = resumed["fge"].get("optimizer", "")
        optimizer = new_adam(model, cfg, fresh=note.startswith(FRESH))  # the form the run started with
        try:
            runtime.load_optimizer_state(optimizer, resumed["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UserError(f"The optimizer state in {source_path} does not fit the network ({type(exc).__name__}): "
                            "the file is damaged; start a new run in another --out folder.") from None
        run = Training(model, optimizer, note, list(resumed["metrics"]), resumed["epoch"],
                       [dict(s) for s in resumed["fge"].get("snapshots", [])])
    else:
        optimizer, note = adam_for(model, cfg, plan.endpoint["optimizer"])
        run = Training(model, optimizer, note, [], 0, [])
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.wd
    return run, vae


def new_adam(model: torch.nn.Module, cfg: FgeConfig, fresh: bool) -> torch.optim.Adam:
    """Adam at --lr-1 with --wd. One that takes the endpoint's state is runtime.adam's (fused where torch has the
    kernel), the form train saved that state with. A fresh one is torch's default form (single-tensor on the CPU,
    for-each on CUDA), as fge has always built it: the fused form differs from it in float rounding, so it would
    change the numbers of every run that starts fresh (from a snapshot or an exported point) and of its resumption."""
    if fresh:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr_1, weight_decay=cfg.wd)
    return runtime.adam(model.parameters(), lr=cfg.lr_1, weight_decay=cfg.wd)


def adam_for(model: torch.nn.Module, cfg: FgeConfig, saved: dict) -> tuple[torch.optim.Adam, str]:
    """(Adam over the model's parameters, what its state is): the endpoint's state when it holds Adam's for exactly
    these parameters, else a fresh one (the note says why). The lr is set before every step; the weight decay is
    --wd's."""
    def fresh(why: str):
        return new_adam(model, cfg, fresh=True), f"{FRESH} ({why})"

    if not saved:
        return fresh("the endpoint checkpoint holds no optimizer state, e.g. a point written by export-point")
    params = list(model.parameters())
    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == len(params)
            and isinstance(state, dict)):
        return fresh("the endpoint's optimizer state does not fit this network's parameters")
    for j, pid in enumerate(groups[0]["params"]):
        entry = state.get(pid)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not set(entry) <= ADAM_STATE or any(
                k != "step" and (not torch.is_tensor(v) or v.shape != params[j].shape) for k, v in entry.items()):
            return fresh("the endpoint's optimizer state is not Adam's for this network's parameters")
    optimizer = new_adam(model, cfg, fresh=False)
    try:
        runtime.load_optimizer_state(optimizer, saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        return fresh(f"the endpoint's optimizer state could not be loaded: {type(exc).__name__}")
    return optimizer, "Adam, its state loaded from the endpoint checkpoint"


def make_loaders(cfg: FgeConfig, data, model: torch.nn.Module, device) -> Loaders:
    train = BatchLoader(data.train, cfg.batch_size, device, shuffle=True, seed=cfg.seed)
    test = BatchLoader(data.test, EVAL_BATCH_SIZE, device)
    bn_subset = fixed_subset(data.train, cfg.bn_images)
    bn = BatchLoader(bn_subset, EVAL_BATCH_SIZE, device) if batchnorms(model) else None
    return Loaders(train, test, bn, len(bn_subset) if bn is not None else 0)


def print_start(cfg: FgeConfig, plan: Plan, data, run: Training, loaders: Loaders, loss_fn, vae: bool, device,
                precision: str) -> None:
    planned = snapshot_epochs(cfg.epochs, cfg.cycle)
    print(f"data: {data.source}")
    objective = f" + β·KL/D with β = --kl-weight {cfg.kl_weight:g} (a VAE)" if vae else ""
    print(f"model: {plan.arch['model']}: {num_parameters(run.model):,} parameters; loss: {loss_fn.description}"
          f"{objective}; device {device}, precision {precision}, batch {cfg.batch_size}, {len(loaders.train)} steps "
          "per epoch")
    print(f"FGE from {cfg.ckpt}: {cfg.epochs} epochs, cycles of {cfg.cycle}, lr from {cfg.lr_1:g} down to "
          f"{cfg.lr_2:g} and back (set before every step), weight decay {cfg.wd:g}; optimizer: {run.optimizer_note}; "
          f"snapshots after epochs {', '.join(map(str, planned))} (counted from 0), BatchNorm statistics "
          f"recomputed on {loaders.bn_images} training images")
    if plan.resumed:
        print(f"resuming from {plan.out / 'checkpoint.pt'} at epoch {run.start_epoch} ({len(run.snapshots)} "
              "snapshots taken)")


def train_epoch(cfg: FgeConfig, plan: Plan, run: Training, epoch: int, loss_fn, loaders: Loaders, device,
                precision: str) -> None:
    """One epoch at the cyclic lr, a snapshot at its end when the lr is at its lowest, the epoch's row (printed and
    appended to metrics.jsonl), and the run's checkpoint."""
    t0 = time.perf_counter()
    steps = len(loaders.train)

    def lr_for_step(step):
        return cyclic_lr(epoch, step, steps, cfg.cycle, cfg.lr_1, cfg.lr_2)

    train_loss, seen, lr, train_terms = train_one_epoch(run.model, loss_fn, run.optimizer, loaders.train, device,
                                                        precision, epoch, not cfg.no_progress, lr_for_step)
    train_seconds = time.perf_counter() - t0
    check_finite_state(run.model.state_dict().items(), f"epoch {epoch}")
    test = evaluate(run.model, loaders.test, loss_fn)  # with the running statistics of training, as train's rows
    index = None
    if is_snapshot_epoch(epoch, cfg.cycle):
        index = len(run.snapshots) + 1
        run.snapshots.append(save_snapshot(plan.out, index, epoch, lr, run.model, loaders.bn, plan.endpoint, cfg))
    row = {"epoch": epoch, "lr_first": lr_for_step(0), "lr": lr, "train_loss": train_loss,
           **{f"train_{k}": v for k, v in train_terms.items()}, "test_loss": test["loss"],
           **{f"test_{k}": test[k] for k in TERMS if k in test}, "test_mse": test["mse"],
           "test_psnr": test["psnr"], "snapshot": index,
           "epoch_seconds": time.perf_counter() - t0, "images_per_s": seen / train_seconds,
           "precision": precision}
    run.history.append(row)
    print(format_row(row, header=epoch == run.start_epoch))
    append_jsonl(plan.out / "metrics.jsonl", row)
    save_checkpoint(plan.out / "checkpoint.pt", {
        "kind": "fge", "model": run.model.state_dict(), "model_config": dict(plan.arch),
        "optimizer": run.optimizer.state_dict(), "epoch": epoch + 1, "args": as_record(cfg), "metrics": run.history,
        "fge": {"endpoint": cfg.ckpt, "endpoint_sha256": plan.endpoint_sha256, "optimizer": run.optimizer_note,
                "snapshots": run.snapshots}})


def format_row(row: dict, header: bool) -> str:
    values = [row["epoch"], row["lr"], row["train_loss"], row["test_loss"], row["test_mse"],
              "" if row["snapshot"] is None else f"#{row['snapshot']}", row["epoch_seconds"], row["images_per_s"]]
    formats = ["d", "9.2e", "9.5f", "9.5f", "9.5f", "", "8.1f", "8.0f"]
    return console.table_row(*term_columns(row, "train_", 3, values, COLUMNS, formats), header)


@torch.no_grad()
def with_bn_recomputed(model: torch.nn.Module, bn_loader) -> tuple[torch.nn.Module, int]:
    """(a copy of `model` with its BatchNorm statistics recomputed from `bn_loader`, images used); `model` itself,
    and so the training that follows, is left as it is."""
    copied = copy.deepcopy(model)
    used = recompute_bn(copied, dict(copied.named_parameters()), bn_loader) if bn_loader is not None else 0
    copied.eval()
    return copied, used


def save_snapshot(out: Path, index: int, epoch: int, lr: float, model, bn_loader, endpoint: dict,
                  cfg: FgeConfig) -> dict:
    """OUT/snapshot_K.pt: the network now, its BatchNorm statistics recomputed, as an ordinary endpoint checkpoint
    (the endpoint's data and architecture settings, no optimizer state). Returns its entry in the run's record."""
    snapshot, used = with_bn_recomputed(model, bn_loader)
    state = {k: v.detach().cpu().clone() for k, v in snapshot.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"The snapshot after epoch {epoch} has non-finite values in {', '.join(bad[:4])} once its "
                        "BatchNorm statistics were recomputed; lower --lr-1, then run again with --resume.")
    entry = {"index": index, "epoch": epoch, "file": snapshot_file(index), "lr_last_step": lr, "bn_images": used}
    save_checkpoint(out / snapshot_file(index), {
        "kind": "endpoint", "model": state, "optimizer": {}, "epoch": endpoint["epoch"] + epoch + 1, "metrics": [],
        "args": dict(endpoint["args"]),
        "fge_snapshot": {"endpoint": cfg.ckpt, **entry, "cycle": cfg.cycle, "lr_1": cfg.lr_1, "lr_2": cfg.lr_2}})
    return entry


# ----------------------------------------------------------------------------------------------------------
# measuring


@torch.no_grad()
def measure(plan: Plan, snapshots: list, test_loader, bn_loader, ssim: bool, fixed, device) -> dict:
    """MSE, PSNR (and SSIM) on the held-out images of the starting endpoint (its BatchNorm statistics recomputed
    like the snapshots'), of every snapshot as saved in its file, and of the snapshots' output average."""
    base = build_model(plan.arch).to(device)
    start = build_model(plan.arch).to(device)
    start.load_state_dict(plan.endpoint["model"])
    start, start_used = with_bn_recomputed(start, bn_loader)
    states = [start.state_dict()]
    for s in snapshots:
        path = plan.out / s["file"]
        state = load_checkpoint(path, "endpoint", f"snapshot {s['index']}")["model"]
        check_fits(base.state_dict(), state, path, f"snapshot {s['index']}")
        states.append({k: v.to(device) for k, v in state.items()})
    base.eval()
    networks = [lambda x, state=state: functional_call(base, state, (x,)) for state in states]
    averages = {"start": [0], **{f"snapshot_{s['index']}": [k + 1] for k, s in enumerate(snapshots)},
                "ensemble": list(range(1, len(states)))}
    results = evaluate_averages(networks, averages, test_loader, ssim)
    recons = {}
    if len(fixed):
        recons = {name: v.cpu() for name, v in average_outputs(networks, averages, fixed).items()}
    return {"results": results, "reconstructions": recons, "start_bn_images": start_used}


def save_picture(path: Path, fixed: torch.Tensor, recons: dict, snapshots: list) -> None:
    from aecurves import plots

    rows = [("original", fixed.cpu()), ("endpoint", recons["start"])]
    rows += [(f"snapshot {s['index']} (epoch {s['epoch']})", recons[f"snapshot_{s['index']}"]) for s in snapshots]
    rows.append((f"FGE average of {len(snapshots)}", recons["ensemble"]))
    plots.save_labelled_rows(rows, path, title="FGE: held-out images, the endpoint, its snapshots and their average")


# ----------------------------------------------------------------------------------------------------------
# the record


def measurement_notes(image_size: int, loaders: Loaders) -> list:
    notes = []
    if image_size < SSIM_WINDOW:
        notes.append(f"SSIM omitted: {image_size}px images are smaller than its {SSIM_WINDOW}x{SSIM_WINDOW} window")
    if loaders.bn is None:
        notes.append("the network has no BatchNorm: no statistics to recompute")
    return notes


def make_record(cfg: FgeConfig, plan: Plan, data, run: Training, loss_fn, loss_name: str, loaders: Loaders,
                measured: dict, notes: list, device: str, precision: str, seconds: dict, files: dict) -> FgeRecord:
    """fge.json: the config, the schedule, every epoch's row, the snapshots, and the metrics of the endpoint, of
    every snapshot and of their output average."""
    eargs, snapshots, results = plan.endpoint["args"], run.snapshots, measured["results"]
    best = min(results[f"snapshot_{s['index']}"]["mse"] for s in snapshots)
    ensemble, start = results["ensemble"], results["start"]
    return FgeRecord(config=as_record(cfg), budget_epochs=cfg.epochs, files=files, rest={
        "reference": "timgaripov/dnn-mode-connectivity fge.py (Garipov et al. 2018)",
        "endpoint": {"checkpoint": cfg.ckpt, "sha256": plan.endpoint_sha256, "epoch": plan.endpoint["epoch"],
                     "lr": eargs.get("lr"), "loss": loss_name,
                     "kl_weight": recorded_value(TrainConfig, "kl_weight", eargs)},
        "optimizer": run.optimizer_note,
        "schedule": {"cycle": cfg.cycle, "lr_1": cfg.lr_1, "lr_2": cfg.lr_2, "lr_2_over_lr_1": cfg.lr_2 / cfg.lr_1,
                     "set": "before every step: cyclic_lr(epoch, step, steps_per_epoch, cycle, lr_1, lr_2)",
                     "epochs_counted_from": 0},
        "steps_per_epoch": len(loaders.train),
        "train_images": len(data.train),
        "test_images": len(data.test),
        "loss": loss_name,
        "kl_weight": cfg.kl_weight,
        "loss_description": loss_fn.description,
        "data": {**{k: eargs.get(k) for k in ("dataset", "data_dir", "image_size", "limit", "val_fraction",
                                                "use_test")}, "source": data.source},
        "bn": {"recomputed": loaders.bn is not None, "images": loaders.bn_images, "subset_seed": SUBSET_SEED,
               "batch_size": EVAL_BATCH_SIZE, "what": "every snapshot and the starting endpoint, on eval-curve's "
               "fixed subset"},
        "metrics": list(start),
        "epochs": run.history,
        "snapshot_epochs": [s["epoch"] for s in snapshots],
        "snapshots": [{**s, "file": str(plan.out / s["file"]), **results[f"snapshot_{s['index']}"]}
                      for s in snapshots],
        "start": {"what": "the starting endpoint (BatchNorm statistics recomputed like the snapshots')",
                  "bn_images": measured["start_bn_images"], **start},
        "ensemble": {"what": f"the output average of the {len(snapshots)} snapshots", "members": len(snapshots),
                     **ensemble},
        "ensemble_mse_gain": {"vs_start": 1 - ensemble["mse"] / start["mse"],
                              "vs_best_snapshot": 1 - ensemble["mse"] / best},
        "notes": notes,
        "device": device,
        "precision": precision,
        "seconds": seconds,
    })


def print_done(cfg: FgeConfig, out: Path, record: FgeRecord) -> None:
    snapshots, start, ensemble = record.get("snapshots"), record.get("start"), record.get("ensemble")
    best = min(s["mse"] for s in snapshots)
    print(f"done: {len(snapshots)} snapshots (after epochs {', '.join(map(str, record.get('snapshot_epochs')))}) in "
          f"{cfg.epochs} epochs; held-out MSE: endpoint {start['mse']:.5f}, best snapshot {best:.5f}, FGE average "
          f"{ensemble['mse']:.5f} ({record.get('ensemble_mse_gain')['vs_start']:+.1%} vs the endpoint), PSNR "
          f"{ensemble['psnr']:.2f} dB; fge.json and snapshot_K.pt in {out}")
