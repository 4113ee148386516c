"""One epoch of training: the loop that `train` (an endpoint) and `fge` (fast geometric ensembling) share, and the
objective of one batch with a VAE's two terms, which `train-curve` shares too; and what `train` and `train-curve`
do alike around their epochs: the run folder, the epoch loop, the metrics row, the printed epoch table and the
checkpoint's dict."""

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from aecurves import console, runtime
from aecurves.files import append_jsonl, folder_lock, write_jsonl
from aecurves.losses import Objective, split_output
from aecurves.metrics import check_finite
from aecurves.schedules import set_lr

TERMS = ("distortion", "rate")  # a VAE's terms, in the order objective_and_terms returns them


class Epoch(NamedTuple):
    """What one epoch of training gives: the mean objective, the images this process saw, the lr of the last step
    and, for a VAE, the epoch's mean distortion and rate ({} for an autoencoder)."""
    loss: float
    seen: int
    lr: float
    terms: dict


def objective_and_terms(loss_fn, out, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the batch's objective, its mean distortion and rate stacked [2] or None): a VAE's terms come from the
    same computation as the objective, so reporting them costs no second pass through the loss (a perceptual loss
    would run VGG again). The objective is losses.Objective.forward's, bit for bit (Objective.add_kl)."""
    recon, kl = split_output(out)
    if kl is None or not isinstance(loss_fn, Objective):
        return loss_fn(out, x), None
    distortion = loss_fn.distortion(recon, x)
    rate = kl.float().mean()
    return loss_fn.add_kl(distortion, rate, recon), torch.stack([distortion.detach().float(), rate.detach()])


def epoch_terms(sums: torch.Tensor | None, n: torch.Tensor) -> dict:
    """{"distortion": mean, "rate": mean} from the all-reduced sums of a VAE's terms; {} for an autoencoder."""
    if sums is None:
        return {}
    return {name: (value / n).item() for name, value in zip(TERMS, sums)}


def term_columns(row: dict, prefix: str, at: int, values: list, columns: list, formats: list) -> tuple:
    """(values, columns, formats) of a printed epoch row, with a VAE's `{prefix}distortion` and `{prefix}rate`
    inserted at index `at` (right after the objective they add up to); an autoencoder's row as given."""
    if f"{prefix}rate" not in row:
        return values, columns, formats
    return ([*values[:at], row[f"{prefix}distortion"], row[f"{prefix}rate"], *values[at:]],
            [*columns[:at], "distortion", "rate", *columns[at:]], [*formats[:at], "9.5f", "9.2f", *formats[at:]])


def train_one_epoch(model, loss_fn, optimizer, loader, device, precision, epoch, progress=True, lr_for_step=None,
                    forward=None) -> Epoch:
    """One pass over `loader` minimising `loss_fn(forward(x), x)`: an Epoch (mean objective, images seen by this
    process, lr of the last step, a VAE's mean distortion and rate).

    `lr_for_step(step)`, when given, sets the optimizer's lr before every step (the lr schedule). `forward`, when
    given, runs the batches instead of `model` itself (e.g. `model` through torch.compile).
    """
    forward = forward or model
    model.train()  # a VAE samples its latent in training mode
    loader.set_epoch(epoch)
    total = torch.zeros((), device=device)
    term_sums = None  # a VAE's distortion and rate, summed over images like `total`
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = console.progress(loader, f"epoch {epoch}", progress, unit="batch")
    for step, x in enumerate(bar):
        if lr_for_step is not None:
            lr = lr_for_step(step)
            set_lr(optimizer, lr)
        with runtime.autocast(device, precision):
            loss, terms = objective_and_terms(loss_fn, forward(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * x.shape[0]
        if terms is not None:
            term_sums = terms * x.shape[0] if term_sums is None else term_sums + terms * x.shape[0]
        seen += x.shape[0]
        if step % 10 == 0:  # .item() syncs with the GPU, so only now and then
            value = loss.item()
            check_finite(value, f"epoch {epoch}, step {step}")
            bar.set_postfix(loss=f"{value:.4f}")
    sums = [total, torch.tensor(float(seen), device=device)]
    stats = runtime.all_reduce_sum(torch.stack(sums if term_sums is None else [*sums, *term_sums]))
    mean = (stats[0] / stats[1]).item()
    check_finite(mean, f"epoch {epoch}")
    return Epoch(mean, seen, lr, epoch_terms(stats[2:] if term_sums is not None else None, stats[1]))


# The epoch table a run prints, a column each: (its header, the key of the metrics row, its format). Every run's table
# starts with TABLE_HEAD and ends with TABLE_TAIL; a VAE's training distortion and rate follow train_loss.
TABLE_HEAD = (("epoch", "epoch", "d"), ("lr", "lr", "9.2e"), ("train_loss", "train_loss", "9.5f"))
TABLE_TAIL = (("seconds", "epoch_seconds", "8.1f"), ("images/s", "images_per_s", "8.0f"))


def epoch_line(row: dict, table: tuple, header: bool) -> str:
    """One epoch's line of the table (with the header above it when `header`), the figures of its metrics row."""
    columns, keys, formats = (list(c) for c in zip(*table))
    values = [row[k] for k in keys]
    return console.table_row(*term_columns(row, "train_", keys.index("train_loss") + 1, values, columns, formats),
                             header)


def metrics_row(epoch: int, lr: float, train: dict, held_out: dict, prefix: str, timing: tuple, facts: dict) -> dict:
    """One epoch's line of metrics.jsonl (and of the checkpoint's metrics): the lr of its last step, the training
    figures (`train`: "loss" first, each as train_{name}), the held-out ones (metrics.evaluate's, as {prefix}loss, a
    VAE's terms, {prefix}mse, {prefix}psnr), its time (`timing`: (perf_counter at its start, seconds of training,
    images trained on by all processes)) and `facts` about how it ran (precision, memory format, ...)."""
    t0, train_seconds, images = timing
    return {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()}, f"{prefix}loss": held_out["loss"],
            **{f"{prefix}{k}": held_out[k] for k in TERMS if k in held_out}, f"{prefix}mse": held_out["mse"],
            f"{prefix}psnr": held_out["psnr"], "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": images / train_seconds, **facts}


def checkpoint_state(record: dict, weights: dict, optimizer: torch.optim.Optimizer) -> dict:
    """What a run's checkpoint holds: its record (kind, epoch, args, the metrics rows so far...), its weights and
    the optimizer's state, so that --resume continues exactly where it stopped."""
    return {**record, **weights, "optimizer": optimizer.state_dict()}


@contextlib.contextmanager
def run_folder(out: Path, what: str, is_main: bool, history: list):
    """The block in which a run writes `out`: rank 0 holds its lock (one writer per run folder, released when the
    block ends or the process dies), creates it and rewrites metrics.jsonl from `history`, the checkpoint's rows (so
    that it drops the rows a crashed run logged after its last save); the other ranks write nothing."""
    if not is_main:
        yield
        return
    with folder_lock(out, what):
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "metrics.jsonl", history)
        yield


def run_epochs(epochs: range, history: list, one_epoch: Callable[[int], dict], table: tuple, log,
               out: Path | None, every: int, save: Callable[[int], None], tracker=None) -> None:
    """The epochs of a run: `one_epoch(epoch)` trains and measures one and gives its metrics row, which joins
    `history` and is printed as a line of the epoch table; rank 0 (`out` given) appends it to metrics.jsonl (and
    gives its numbers to `tracker`, a wandb_log.Tracker, at step `epoch`) and calls `save(epoch)` every `every`
    epochs and after the last."""
    for epoch in epochs:
        row = one_epoch(epoch)
        history.append(row)
        log(epoch_line(row, table, header=epoch == epochs.start))
        if out is not None:
            append_jsonl(out / "metrics.jsonl", row)
            if tracker is not None:
                tracker.log(row, epoch)
            if epoch % every == 0 or epoch == epochs[-1]:
                save(epoch)
