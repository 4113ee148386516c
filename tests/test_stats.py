import math

import pytest

from aecurves.stats import mean_interval


def test_t_interval_against_hand_computed_values():
    # 1, 2, 3: mean 2, sample std 1, t(0.975, 2) = 4.302653 → half-width 4.302653 / sqrt(3) = 2.484138
    r = mean_interval([1.0, 2.0, 3.0])
    assert r["n"] == 3 and r["mean"] == 2.0 and r["std"] == pytest.approx(1.0)
    assert r["lo"] == pytest.approx(2 - 2.484138, abs=1e-6) and r["hi"] == pytest.approx(2 + 2.484138, abs=1e-6)
    # two values 0.1, 0.3: std 0.141421, t(0.975, 1) = 12.706205 → half-width 12.706205 · 0.141421 / sqrt(2) = 1.270620
    r = mean_interval([0.1, 0.3])
    assert r["lo"] == pytest.approx(0.2 - 1.270620, abs=1e-6) and r["hi"] == pytest.approx(0.2 + 1.270620, abs=1e-6)
    assert (r["min"], r["max"]) == (0.1, 0.3)
    # a 90% interval is narrower: t(0.95, 2) = 2.919986
    assert mean_interval([1.0, 2.0, 3.0], 0.9)["hi"] == pytest.approx(2 + 2.919986 / math.sqrt(3), abs=1e-6)


def test_one_value_has_no_interval_and_missing_values_are_left_out():
    r = mean_interval([0.5, None, float("nan")])
    assert r["n"] == 1 and r["mean"] == 0.5 and r["std"] is None and r["lo"] is None and r["hi"] is None
    assert mean_interval([])["mean"] is None


def test_bootstrap_barrier_resamples_images():
    import numpy as np

    from aecurves.stats import bootstrap_barrier, loss_barrier

    ts = np.linspace(0, 1, 5)
    bump = np.array([0.0, 0.5, 1.0, 0.5, 0.0])
    # every image with the same curve: each resample has that barrier, so the interval is that one value
    same = np.tile((1.0 + bump)[:, None], (1, 7))
    lo, hi = bootstrap_barrier(ts, same, n_boot=50)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # images that disagree: the interval holds the barrier of the mean, and equals a loop over the same draws
    rng = np.random.default_rng(3)
    per_image = 1.0 + bump[:, None] * rng.uniform(0, 2, size=(1, 40)) + rng.normal(0, 0.05, size=(5, 40))
    lo, hi = bootstrap_barrier(ts, per_image, n_boot=400, seed=1, chunk=64)
    assert lo < loss_barrier(ts, per_image.mean(1)) < hi and hi - lo > 0.05
    draws = np.random.default_rng(1)
    by_hand = []
    for start in range(0, 400, 64):
        for counts in draws.multinomial(40, np.full(40, 1 / 40), size=min(64, 400 - start)):
            by_hand.append(loss_barrier(ts, per_image @ counts / 40))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])), rel=1e-12)
