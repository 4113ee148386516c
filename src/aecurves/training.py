"""One epoch of training: the loop that `train` (an endpoint) and `fge` (fast geometric ensembling) share."""

import torch

from aecurves import console, runtime
from aecurves.metrics import check_finite
from aecurves.schedules import set_lr


def train_one_epoch(model, loss_fn, optimizer, loader, device, precision, epoch, progress=True, lr_for_step=None,
                    forward=None):
    """Returns (mean training loss, images seen by this process, lr of the last step).

    `lr_for_step(step)`, when given, sets the optimizer's lr before every step (the lr schedule). `forward`, when
    given, runs the batches instead of `model` itself (e.g. `model` through torch.compile).
    """
    forward = forward or model
    model.train()
    loader.set_epoch(epoch)
    total = torch.zeros((), device=device)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = console.progress(loader, f"epoch {epoch}", progress, unit="batch")
    for step, x in enumerate(bar):
        if lr_for_step is not None:
            lr = lr_for_step(step)
            set_lr(optimizer, lr)
        with runtime.autocast(device, precision):
            loss = loss_fn(forward(x), x)
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
