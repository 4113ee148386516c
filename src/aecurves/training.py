"""One epoch of training: the loop that `train` (an endpoint) and `fge` (fast geometric ensembling) share, and the
objective of one batch with a VAE's two terms, which `train-curve` shares too."""

from typing import NamedTuple

import torch

from aecurves import console, runtime
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
