"""Learning-rate schedules, as pure functions of where training stands.

The lr at a step depends only on (base lr, epoch, step, steps per epoch, total epochs), never on what ran
before, so a resumed run (even with a new --lr) continues on exactly the curve an uninterrupted run follows.

`paper` is the schedule of Garipov et al.'s train.py (`learning_rate_schedule`): with α the fraction of
training done, the lr is the base lr while α ≤ 0.5, falls linearly to 1% of it at α = 0.9, then stays at 1%.
Their code sets it once per epoch with α = epoch / total_epochs (1-based epochs: the value at the end of the
epoch); here it is set before every step with α = the fraction of steps done once that step is taken, which
equals theirs at the last step of every epoch and moves smoothly in between.
`cosine` is 0.5·(1 + cos(π α)) times the base lr (0 at the last step); `constant` is the base lr throughout.

`cyclic_lr` is the cyclical schedule of fast geometric ensembling (their utils.cyclic_learning_rate, used by
fge.py), and `is_snapshot_epoch` fge.py's rule for when a snapshot is taken; both count epochs from 0, as fge.py.
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


def cyclic_lr(epoch: int, step: int, steps_per_epoch: int, cycle: int, lr_1: float, lr_2: float) -> float:
    """The lr of step `step` (0-based) of epoch `epoch` (0-based) in FGE's cycles of `cycle` epochs, as
    utils.cyclic_learning_rate(epoch, cycle, lr_1, lr_2)(step / steps_per_epoch) of Garipov et al.'s code: with
    t = ((epoch mod cycle) + step / steps_per_epoch) / cycle, lr_1·(1 − 2t) + lr_2·2t while t < 0.5 (down from
    lr_1 to lr_2 over the first half of the cycle), lr_1·(2t − 1) + lr_2·(2 − 2t) after (back up to lr_1). Set
    before each step, so the first step of every cycle runs at lr_1 and the lowest lr (lr_2) is reached at the
    first step of the cycle's second half."""
    t = ((epoch % cycle) + step / max(steps_per_epoch, 1)) / cycle
    if t < 0.5:
        return lr_1 * (1.0 - 2.0 * t) + lr_2 * 2.0 * t
    return lr_1 * (2.0 * t - 1.0) + lr_2 * (2.0 - 2.0 * t)


def is_snapshot_epoch(epoch: int, cycle: int) -> bool:
    """fge.py's rule: a snapshot is taken at the end of epoch `epoch` (0-based) when (epoch mod cycle) + 1 ==
    cycle // 2, the end of each cycle's first half, where the lr has fallen to (nearly) lr_2."""
    return epoch % cycle + 1 == cycle // 2


def snapshot_epochs(epochs: int, cycle: int) -> list[int]:
    """The 0-based epochs, of `epochs`, at whose end a snapshot is taken (20 epochs, cycle 4: 1, 5, 9, 13, 17)."""
    return [e for e in range(epochs) if is_snapshot_epoch(e, cycle)]
