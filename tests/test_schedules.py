"""Learning-rate schedules: values against hand-computed ones, and the per-step form of the paper's."""

import math

import pytest

from aecurves.errors import UserError
from aecurves.schedules import lr_at, lr_factor, progress


@pytest.mark.parametrize("alpha, factor", [
    (0.0, 1.0), (0.3, 1.0), (0.5, 1.0),             # first half: the base lr
    (0.6, 1 - 0.1 / 0.4 * 0.99),                    # 0.7525
    (0.7, 0.505), (0.8, 1 - 0.3 / 0.4 * 0.99),      # linear fall...
    (0.9, 0.01), (0.95, 0.01), (1.0, 0.01),         # ...to 1% at 90%, then flat
])
def test_paper_factor_by_hand(alpha, factor):
    assert lr_factor("paper", alpha) == pytest.approx(factor, abs=1e-12)


def test_cosine_and_constant_by_hand():
    assert lr_factor("cosine", 0.0) == 1.0
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor("constant", 0.73) == 1.0
    with pytest.raises(UserError, match="paper, cosine, constant"):
        lr_factor("step", 0.5)


def paper_train_py(base_lr, epoch, total_epochs):
    """Garipov et al.'s learning_rate_schedule, transcribed: set once at the start of each 1-based epoch."""
    alpha = epoch / total_epochs
    factor = 1.0 if alpha <= 0.5 else (1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9 else 0.01)
    return factor * base_lr


def test_per_step_lr_equals_the_papers_at_the_last_step_of_every_epoch():
    steps, epochs, base = 7, 10, 0.05
    for epoch in range(1, epochs + 1):
        expected = paper_train_py(base, epoch, epochs)
        assert lr_at("paper", base, epoch, steps - 1, steps, epochs) == pytest.approx(expected)


def test_per_step_lr_moves_within_an_epoch():
    # 10 epochs of 4 steps: step 1 of epoch 6 has done 5.5 epochs -> alpha 0.55 -> 1 - 0.05/0.4*0.99 = 0.87625
    assert progress(6, 1, 4, 10) == pytest.approx(0.55)
    assert lr_at("paper", 1e-3, 6, 1, 4, 10) == pytest.approx(0.87625e-3)
    assert lr_at("paper", 1e-3, 6, 0, 4, 10) > lr_at("paper", 1e-3, 6, 1, 4, 10) > lr_at("paper", 1e-3, 6, 3, 4, 10)
    # the last step of training is at 1%, the first at the base lr
    assert lr_at("paper", 1e-3, 10, 3, 4, 10) == pytest.approx(1e-5)
    assert lr_at("paper", 1e-3, 1, 0, 4, 10) == 1e-3
