"""A group's numbers over its pairs, from the collected pairs and endpoints: barriers and their spread, each path
kind's intervals, the equal-budget ensembles' means and winner, and whether the endpoints had converged."""

import numpy as np

from .model import (
    BUDGET_FACTOR,
    EQUAL_BUDGET_METRICS,
    EQUAL_BUDGET_ROWS,
    PATHS,
    Bootstrap,
    BudgetOverPairs,
    Convergence,
    Endpoint,
    EqualBudget,
    GroupSummary,
    Interval,
    Pair,
)

# Convergence: an endpoint whose held-out loss still falls by more than CONVERGED_GAIN when it is trained on for as
# long as a curve (the extra-trained endpoint, measured like every point of the paths) had not converged. 2%: the
# differences the report draws conclusions from are of that size (a curve ensemble beats the better endpoint by
# 2-3% in MSE on the CelebA sample; a barrier of 5% of the loss is "no clear barrier"), so an endpoint still 2% away
# from where more of the same training takes it is not a minimum at the resolution of those comparisons. The
# last-epoch gain cannot tell: under the paper's schedule the lr ends at 1% of its start, so it is near 0 by
# construction (measured on CelebA: 0.0-0.4% in the last epoch, yet 17-18% from 10 more epochs).
CONVERGED_GAIN = 0.02
PATH_INTERVALS = ("barrier", "removed", "best_vs_endpoint", "best_vs_extra")
TERM_INTERVALS = ("distortion_barrier", "rate_barrier")  # a VAE group's: its objective's two terms


def group_summary(endpoints: list[Endpoint], pairs: list[Pair]) -> GroupSummary:
    done = [p for p in pairs if p.available]
    ev = [e.eval for e in endpoints if e.eval is not None]
    s = GroupSummary(pairs=len(pairs), pairs_evaluated=len(done),
                     pairs_damaged=sum(p.eval_status == "damaged" for p in pairs))
    if not done or not ev:
        return s
    # the data the endpoints were trained and measured on, and how well they fit it (for the caveat)
    n_train, n_test = (sorted({n for n in values if isinstance(n, int)})
                       for values in zip(*((p.protocol.n_train, p.protocol.n_test) for p in done)))
    ratios = [e.te_mse / e.tr_mse for e in ev if e.te_mse is not None and e.tr_mse]
    s.train_set_images = n_train[0] if len(n_train) == 1 else None
    s.test_set_images = n_test[0] if len(n_test) == 1 else None
    s.endpoint_te_psnr_max = float(max(e.te_psnr for e in ev))
    s.endpoint_mse_test_over_train = float(np.mean(ratios)) if ratios else None
    _barriers(s, done, ev)
    # over pairs, per path: the barrier, the share of the naive barrier removed, the best point against the
    # better endpoint and against the better extra-trained endpoint; each as mean, std, range and 95% t-interval
    # for VAEs, also the test barrier of each term of the objective
    keys = PATH_INTERVALS + TERM_INTERVALS * any(p.vae is not None for p in done)
    s.paths = {name: {key: Interval.of(getattr(p.paths[name], key) for p in done if name in p.paths)
                      for key in keys}
               for name, _ in PATHS if any(name in p.paths for p in done)}
    s.bootstrap = _bootstrap(done)
    return s


def _barriers(s: GroupSummary, done: list[Pair], ev: list) -> None:
    seg = np.array([p.segment.te_barrier for p in done], dtype=float)
    cur = np.array([p.curve.te_barrier for p in done], dtype=float)
    removed = [p.barrier_removed for p in done if p.barrier_removed is not None]
    s.endpoint_te_loss_mean = float(np.mean([e.te_loss for e in ev]))
    s.segment_te_barrier_mean, s.segment_te_barrier_min, s.segment_te_barrier_max = \
        float(seg.mean()), float(seg.min()), float(seg.max())
    s.curve_te_barrier_mean, s.curve_te_barrier_min, s.curve_te_barrier_max = \
        float(cur.mean()), float(cur.min()), float(cur.max())
    s.barrier_removed_mean = float(np.mean(removed)) if removed else None
    s.barrier_removed_min = float(np.min(removed)) if removed else None
    s.worst_psnr_curves = float(min(p.curve.te_psnr_min for p in done))
    s.worst_psnr_segments = float(min(p.segment.te_psnr_min for p in done))
    s.worst_psnr_endpoints = float(min(e.te_psnr for e in ev))
    s.segment_barrier_relative = s.segment_te_barrier_mean / s.endpoint_te_loss_mean \
        if s.endpoint_te_loss_mean > 0 else None


def _bootstrap(done: list[Pair]) -> dict[str, Bootstrap]:
    """Per path kind, over pairs, how often the bootstrap interval over held-out images puts its barrier above 0."""
    out = {}
    for name, _ in PATHS:
        stats = [getattr(p, name) for p in done]
        los = [x.te_barrier_lo for x in stats if x is not None and x.te_barrier_lo is not None]
        if los:
            out[name] = Bootstrap(pairs=len(los), above_zero=sum(lo > 0 for lo in los))
    return out


def equal_budget_summary(pairs: list[Pair], epochs) -> EqualBudget:
    """Over the pairs that measured them: per row, each metric's mean with its 95% t-interval; the winner by held-out
    MSE among the rows every such pair has, the runner-up, and per pair the winner's MSE relative to the runner-up's
    ((winner − runner-up) / runner-up, so negative means the winner is better) as a mean with its interval; the same
    for the best row at one curve's budget against the curve ensemble (or, when that is the best, the next)."""
    done = [p.equal_budget.rows for p in pairs if p.available and p.equal_budget and p.equal_budget.rows]
    keys = [k for k, _, _ in EQUAL_BUDGET_ROWS if done and all(k in d for d in done)]
    out = EqualBudget(pairs=len(done), curve_epochs=epochs)
    for key, _, _ in EQUAL_BUDGET_ROWS:
        have = [d[key] for d in done if key in d]
        if have:
            out.rows[key] = BudgetOverPairs(len(have), have[0].budget_epochs,
                                            *(Interval.of(getattr(h, m) for h in have) for m in EQUAL_BUDGET_METRICS))
    if len(keys) < 2:
        return out

    def versus(k, other) -> Interval:
        return Interval.of((d[k].mse - d[other].mse) / d[other].mse for d in done if d[other].mse > 0)

    ranked = sorted(keys, key=lambda k: float(np.mean([d[k].mse for d in done])))
    out.ranked, out.winner, out.runner_up = ranked, ranked[0], ranked[1]
    out.winner_vs_runner_up = versus(*ranked[:2])
    out.winner_by_psnr = min(keys, key=lambda k: -float(np.mean([d[k].psnr for d in done])))
    one = [k for k in ranked if BUDGET_FACTOR[k] == 1]
    if one and "curve_ensemble" in keys:
        best = one[0]
        other = "curve_ensemble" if best != "curve_ensemble" else (one[1] if len(one) > 1 else None)
        if other is not None:
            out.best_at_one_curve, out.one_curve_other = best, other
            out.one_curve_vs_other = versus(best, other)
    return out


def convergence(endpoints: list[Endpoint], extra_training: bool, epochs) -> Convergence:
    """Whether the endpoints had converged, judged from what the study measures: each endpoint's held-out loss gain
    when trained on for as long as a curve ((loss_endpoint − loss_extra) / loss_endpoint, both measured by
    eval-curve with BatchNorm recomputed); not converged when any gain exceeds CONVERGED_GAIN. Without extra training
    it is not measured (the last-epoch gain is no measure of it: see CONVERGED_GAIN)."""
    gains = {str(e.seed): e.extra.gain for e in endpoints if e.extra is not None and e.extra.gain is not None}
    out = Convergence(threshold=CONVERGED_GAIN, extra_epochs=epochs, endpoints=len(endpoints), gains=gains,
                      extra_training=extra_training, measured=bool(gains),
                      metric="held-out loss (the MSE in the mse group), extra-trained endpoint vs its starting "
                             "endpoint")
    if gains:
        out.min, out.max = min(gains.values()), max(gains.values())
        out.above = [seed for seed, g in gains.items() if g > CONVERGED_GAIN]
        out.converged = not out.above
    return out
