"""Learning-rate schedules, as pure functions of where training stands.

The lr at a step depends only on (base lr, epoch, step, steps per epoch, total epochs), never on what ran
before, so a resumed run (even with a new --lr) continues on exactly the curve an uninterrupted run follows.

`paper` is the schedule of Garipov et al.'s train.py (`learning_rate_schedule`): with α the fraction of
training done, the lr is the base lr while α ≤ 0.5, falls linearly to 1% of it at α = 0.9, then stays at 1%.
Their code sets it once per epoch with α = epoch / total_epochs (1-based epochs: the value at the end of the
epoch); here it is set before every step with α = the fraction of steps done once that step is taken, which
equals theirs at the last step of every epoch and moves smoothly in between.
`cosine` is 0.5·(1 + cos(π α)) times the base lr (0 at the last step); `constant` is the base lr throughout.
"""

import math

from aecurves.config import LR_SCHEDULES as SCHEDULES
from aecurves.errors import UserError


def lr_factor(schedule: str, alpha: float) -> float:
    """The multiplier of the base lr when a fraction `alpha` in [0, 1] of training is done."""
    if schedule == "constant":
        return 1.0
    if schedule == "paper":
        if alpha <= 0.5:
            return 1.0
        if alpha <= 0.9:
            return 1.0 - (alpha - 0.5) / 0.4 * 0.99
        return 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(alpha, 0.0), 1.0)))
    raise UserError(f"Unknown --lr-schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}.")


def progress(epoch: int, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    """Fraction of training done after step `step` (0-based) of epoch `epoch` (1-based)."""
    return (epoch - 1 + (step + 1) / max(steps_per_epoch, 1)) / total_epochs


def lr_at(schedule: str, base_lr: float, epoch: int, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    return base_lr * lr_factor(schedule, progress(epoch, step, steps_per_epoch, total_epochs))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
