"""Step 2: conclusions. Each is chosen by comparing the collected numbers with the thresholds below, and comes as
a code (what was concluded: tests and report.json readers compare codes, not prose), its text, and the numbers the
text states. So the text cannot contradict the tables: both come from the same numbers."""

from dataclasses import dataclass, field

from .fmt import fdb, finterval, fnum, fpct, fsigned
from .model import EQUAL_BUDGET_SHORT, PATHS, Convergence, EqualBudget, Group, GroupSummary, Interval, Vae

# A segment barrier below NO_BARRIER × the endpoints' mean test loss counts as "no clear barrier"; a curve removing
# at least MOST of it removes "most of the barrier", at least SOME "reduces" it; PSNR within PSNR_TOLERANCE dB is
# "as good".
NO_BARRIER = 0.05
MOST = 0.8
SOME = 0.3
PSNR_TOLERANCE = 0.5
# The caveat beside the result: endpoints trained on fewer than SMALL_TRAIN_SET images, or whose worst held-out PSNR
# is below LOW_PSNR_DB, show the method but say nothing about well-trained autoencoders on a dataset like CelebA.
SMALL_TRAIN_SET = 1000
LOW_PSNR_DB = 22.0
LOSS_NAMES = {"mse": "MSE loss", "vgg": "VGG perceptual loss"}
DISTORTION_NAMES = {"mse": "MSE", "vgg": "VGG perceptual loss"}  # a VAE's reconstruction loss, in its objective
RATE_UNIT = "KL in nats per image"


def objective_name(loss: str, vae: Vae | None) -> str:
    """What a group's networks are measured with: its loss ('MSE loss'), or for VAEs their objective, the
    reconstruction loss + β·KL/D ('VAE objective (MSE + 1·KL/D)')."""
    if vae is None:
        return LOSS_NAMES.get(loss, loss)
    return f"VAE objective ({DISTORTION_NAMES.get(loss, loss)} + {vae.kl_weight:g}·KL/D)"


def noun(vae: Vae | None) -> str:
    """The word for what is measured along a path: a VAE's is its objective."""
    return "loss" if vae is None else "objective"


@dataclass(frozen=True)
class Conclusion:
    code: str      # e.g. "barrier-removed": what the numbers say, stable across wording changes
    text: str
    numbers: dict = field(default_factory=dict)  # the figures the text states (and the names of what it compares)


@dataclass
class Findings:
    """A loss group's conclusions: the answer to the question (the report's first screen), the others, and the caveat
    about the data and the endpoints' quality."""
    answer: Conclusion
    details: list[Conclusion] = field(default_factory=list)
    caveat: Conclusion | None = None

    @property
    def all(self) -> list[Conclusion]:
        return [self.answer, *self.details]

    def codes(self) -> list[str]:
        return [c.code for c in self.all] + ([self.caveat.code] if self.caveat else [])

    def find(self, *codes: str) -> Conclusion | None:
        return next((c for c in self.all if c.code in codes), None)


def findings(group: Group) -> Findings:
    if group.status != "run":
        reason = group.reason.strip() or "no reason recorded."
        remedy = f" Remedy: {group.remedy.strip()}" if group.remedy.strip() else ""
        return Findings(Conclusion("group-skipped", f"The {group.loss} group was skipped: {reason}{remedy} The other "
                                   "groups are complete."))
    s = group.summary
    if not s.evaluated:
        damaged = f"; {s.pairs_damaged} with a damaged eval.json" if s.pairs_damaged else ""
        return Findings(Conclusion("not-evaluated", f"The {group.loss} group has no finished evaluation yet "
                                   f"({s.pairs_evaluated} of {s.pairs} pairs{damaged}).",
                                   {"pairs_evaluated": s.pairs_evaluated, "pairs": s.pairs,
                                    "pairs_damaged": s.pairs_damaged}))
    details = [barrier_ranges(group.loss, s, group.vae), *vae_terms(group.loss, s, group.vae), *barrier_intervals(s),
               *bootstrap(s), psnr(s), *alignment(s.paths), *best_against_extra(s.paths),
               *equal_budget_conclusions(group.equal_budget),
               convergence_conclusion(group.loss, group.convergence, group.vae)]
    if group.warning:
        details.append(Conclusion("group-warning", group.warning))
    return Findings(answer(group.loss, s, group.vae), details, caveat(group.loss, s))


def _mean(r: Interval, fmt) -> str:
    """'mean [lo, hi]', or the mean alone for one pair (the sentence says so)."""
    return fmt(r.mean) if r.lo is None else f"{fmt(r.mean)} [{fmt(r.lo)}, {fmt(r.hi)}]"


def answer(loss: str, s: GroupSummary, vae: Vae | None = None) -> Conclusion:
    """The question in one sentence: how high the straight segment's barrier is, and how much of it the curve
    removes, each with its 95% interval over pairs. The verdict (the code) compares the numbers with NO_BARRIER,
    MOST and SOME. For VAEs, of their objective (the sentence names it)."""
    n, rel = s.pairs_evaluated, s.segment_barrier_relative
    seg, share = s.paths["segment"]["barrier"], s.paths["curve"]["removed"]
    mean, worst = s.barrier_removed_mean, s.barrier_removed_min
    wide = "; its interval includes 0" if seg.lo is not None and seg.lo <= 0 <= seg.hi else ""
    head = (f"{objective_name(loss, vae)}: between two endpoints the straight segment has a held-out barrier of "
            f"{_mean(seg, fnum)} ({fpct(rel)} of the "
            f"endpoints' {noun(vae)}{wide})")
    over = f"mean [95% t-interval] over {n} pairs" if n > 1 else "one pair, so no interval"
    removes = _mean(share, fpct) if share.n == n else fpct(mean)
    if rel is None or rel < NO_BARRIER:
        code, verdict = "no-clear-barrier", (
            f": no clear barrier (under {fpct(NO_BARRIER)} of it), so the endpoints are already nearly linearly "
            f"connected at this scale, and along the curve the barrier is {_mean(s.paths['curve']['barrier'], fnum)}")
    elif mean is None:
        code, verdict = "removal-unknown", ", and the share of it the curve removes could not be computed"
    elif worst >= MOST:
        code, verdict = "barrier-removed", (f", and the curve removes {removes} of it, at least {fpct(worst)} for "
                                            "every pair: the endpoints are connected by paths of nearly constant "
                                            f"low {noun(vae)}")
    elif mean >= MOST:
        code, verdict = "barrier-mostly-removed", (f", and the curve removes most of it on average, {removes}, but "
                                                   f"not for every pair: the worst removes {fpct(worst)}")
    elif mean >= SOME:
        code, verdict = "barrier-reduced", (f", and the curve reduces it by {removes} on average, the worst pair by "
                                            f"{fpct(worst)}, but does not remove most of it")
    else:
        code, verdict = "barrier-not-removed", (f", and the curve does not remove it: {removes} of it on average, "
                                                f"the worst pair {fpct(worst)}")
    numbers = {"pairs": n, "segment_barrier": seg.mean, "segment_barrier_lo": seg.lo,
               "segment_barrier_hi": seg.hi, "barrier_relative": rel, "removed": mean, "removed_lo": share.lo,
               "removed_hi": share.hi, "removed_worst": worst, "curve_barrier": s.curve_te_barrier_mean}
    return Conclusion(code, f"{head}{verdict} ({over}).", numbers)


def barrier_ranges(loss: str, s: GroupSummary, vae: Vae | None = None) -> Conclusion:
    n = s.pairs_evaluated
    text = (f"{objective_name(loss, vae)}: on the straight segments between the endpoints the held-out {noun(vae)} "
            "rises "
            f"above the chord by {fnum(s.segment_te_barrier_mean)} on average over {n} pair{'s' if n != 1 else ''} "
            f"(range {fnum(s.segment_te_barrier_min)} to {fnum(s.segment_te_barrier_max)}; "
            f"{fpct(s.segment_barrier_relative)} of the endpoints' mean held-out {noun(vae)} "
            f"{fnum(s.endpoint_te_loss_mean)}); along the curves the barrier is {fnum(s.curve_te_barrier_mean)} on "
            f"average (range {fnum(s.curve_te_barrier_min)} to {fnum(s.curve_te_barrier_max)}).")
    return Conclusion("barrier-ranges", text, {
        k: getattr(s, k) for k in ("segment_te_barrier_mean", "segment_te_barrier_min", "segment_te_barrier_max",
                                   "curve_te_barrier_mean", "curve_te_barrier_min", "curve_te_barrier_max",
                                   "segment_barrier_relative", "endpoint_te_loss_mean")})


def vae_terms(loss: str, s: GroupSummary, vae: Vae | None) -> list[Conclusion]:
    """A VAE group's objective taken apart: the test barrier of each of its terms, the distortion (the
    reconstruction loss) and the rate (the KL, nats per image), per path kind over pairs; none for autoencoders."""
    if vae is None:
        return []
    kinds = [(name, label) for name, label in PATHS if name in s.paths]
    parts, numbers = [], {"kl_weight": vae.kl_weight}
    for term, what in (("distortion", f"distortion ({DISTORTION_NAMES.get(loss, loss)})"),
                       ("rate", f"rate ({RATE_UNIT})")):
        values = {name: s.paths[name][f"{term}_barrier"] for name, _ in kinds}
        numbers[term] = {name: {"mean": r.mean, "lo": r.lo, "hi": r.hi} for name, r in values.items()}
        parts.append(f"{what}: " + ", ".join(f"{label} {finterval(values[name], fnum)}" for name, label in kinds))
    n = s.pairs_evaluated
    text = (f"The objective's two terms, distortion + {vae.kl_weight:g}·rate/D (D: values per image), each with its "
            f"own held-out barrier (mean [95% t-interval] over {n} pair{'s' if n != 1 else ''}): " + "; ".join(parts)
            + ".")
    return [Conclusion("vae-terms", text, numbers)]


def barrier_intervals(s: GroupSummary) -> list[Conclusion]:
    """Each path kind's test barrier over pairs (mean, 95% t-interval), and the kinds whose interval is too wide to
    tell a barrier from none."""
    parts, wide, numbers = [], [], {}
    for name, label in PATHS:
        r = s.paths.get(name, {}).get("barrier")
        if r is None or r.lo is None:
            continue
        parts.append(f"{label} {finterval(r, fnum)}")
        numbers[name] = {"mean": r.mean, "lo": r.lo, "hi": r.hi}
        if r.lo <= 0 <= r.hi:
            wide.append(name)
    if not parts:
        return []
    text = "Test barrier over pairs, mean [95% t-interval]: " + "; ".join(parts) + "."
    if wide:
        kinds = " and ".join(f"{dict(PATHS)[w]}s" for w in wide)
        text += (f" For the {kinds} the interval includes 0: too wide to tell from {s.pairs_evaluated} pairs whether "
                 "there is a barrier at all.")
    return [Conclusion("interval-includes-zero" if wide else "intervals-exclude-zero", text,
                       {**numbers, "includes_zero": wide})]


def bootstrap(s: GroupSummary) -> list[Conclusion]:
    """Per pair, how often the bootstrap interval over held-out images lies above 0, per path kind."""
    boot = [(name, label, b) for name, label in PATHS if (b := s.bootstrap.get(name))]
    if not boot:
        return []
    text = ("Per pair, the 95% bootstrap interval over held-out images puts the barrier above 0 for "
            + ", ".join(f"{b.above_zero} of {b.pairs} {label}s" for _, label, b in boot))
    some = any(b.above_zero < b.pairs for _, _, b in boot)
    if some:
        text += "; for the others it includes 0, so this test set cannot tell their barrier from none"
    return [Conclusion("bootstrap-some-include-zero" if some else "bootstrap-all-above-zero", text + ".",
                       {name: {"pairs": b.pairs, "above_zero": b.above_zero} for name, _, b in boot})]


def psnr(s: GroupSummary) -> Conclusion:
    a, b, c = s.worst_psnr_curves, s.worst_psnr_endpoints, s.worst_psnr_segments
    text = (f"The worst held-out PSNR along the curves is {fdb(a)} dB, against {fdb(b)} dB for the worst endpoint "
            f"and {fdb(c)} dB along the segments")
    numbers = {"curves_db": a, "endpoints_db": b, "segments_db": c, "tolerance_db": PSNR_TOLERANCE}
    if a >= b - PSNR_TOLERANCE:
        return Conclusion("psnr-as-good", text + ": every point of the curves reconstructs about as well as the "
                          f"endpoints (within {PSNR_TOLERANCE} dB).", numbers)
    return Conclusion("psnr-worse", text + ": some points of the curves reconstruct worse than the endpoints, by up "
                      f"to {fdb(b - a)} dB.", numbers)


def sure(r: Interval) -> str:
    """Whether a mean's 95% interval settles its sign: the caution to add when it does not."""
    if r.lo is None:
        return " (one pair: no interval)"
    if r.lo <= 0 <= r.hi:
        return f"; its 95% interval [{fpct(r.lo)}, {fpct(r.hi)}] includes 0, too wide to conclude from {r.n} pairs"
    return f" (95% interval {fpct(r.lo)} to {fpct(r.hi)})"


def alignment(paths: dict) -> list[Conclusion]:
    """What aligning B to A does to the straight segment and the curve, with the intervals over pairs."""
    if "aligned_segment" not in paths or paths["aligned_segment"]["removed"].mean is None:
        return []
    seg, cur = paths["aligned_segment"]["removed"], paths["aligned_curve"]["removed"]
    return [Conclusion("alignment-removes", f"Aligning B to A (permuting its hidden units, mapping its latent code) "
                       f"removes {fpct(seg.mean)} of the straight segment's barrier on average{sure(seg)}; the curve "
                       f"to the aligned B removes {fpct(cur.mean)}{sure(cur)}.",
                       {"aligned_segment_removed": seg.mean, "aligned_segment_lo": seg.lo,
                        "aligned_segment_hi": seg.hi, "aligned_curve_removed": cur.mean, "aligned_curve_lo": cur.lo,
                        "aligned_curve_hi": cur.hi})]


def best_against_extra(paths: dict) -> list[Conclusion]:
    """How the paths' best point compares with the better endpoint given as much extra training as a curve."""
    vs_extra = {k: v["best_vs_extra"] for k, v in paths.items() if v["best_vs_extra"].mean is not None}
    if "curve" not in vs_extra:
        return []
    best = min(vs_extra, key=lambda k: vs_extra[k].mean)
    r = vs_extra[best]
    below = r.mean < 0
    text = (f"The best point along the {best.replace('_', ' ')} is {fpct(abs(r.mean))} {'below' if below else 'above'}"
            f" the better endpoint trained on for as long as a curve, on average{sure(r)}"
            + ("." if below else ": the paths' low points come from the extra training, not from the path."))
    return [Conclusion("best-below-extra" if below else "best-above-extra", text,
                       {"path": best, "mean": r.mean, "lo": r.lo, "hi": r.hi})]


def _budget(eb: EqualBudget, key: str) -> str:
    epochs = eb.rows[key].budget_epochs if key in eb.rows else None
    return "n/a" if epochs is None else f"{epochs:g}"


def equal_budget_conclusions(eb: EqualBudget) -> list[Conclusion]:
    """Which ensemble of the equal-budget table reconstructs the held-out images best (by MSE), against the
    runner-up, with the 95% interval over pairs; and the best at one curve's budget against the curve ensemble."""
    if not eb.winner:
        return []
    n, w, r, rel = eb.pairs, eb.winner, eb.runner_up, eb.winner_vs_runner_up
    text = (f"Ensembles at equal training budget (held-out MSE over {n} pair{'s' if n != 1 else ''}; training beyond "
            f"the endpoints in epochs): {EQUAL_BUDGET_SHORT[w]} ({_budget(eb, w)} epochs) reconstructs best, MSE "
            f"{fnum(eb.rows[w].mse.mean)} on average; per pair its MSE is {fsigned(rel.mean)} relative to the "
            f"runner-up, {EQUAL_BUDGET_SHORT[r]} ({_budget(eb, r)} epochs){sure(rel)}.")
    if eb.winner_by_psnr and eb.winner_by_psnr != w:
        text += f" By held-out PSNR the best is {EQUAL_BUDGET_SHORT[eb.winner_by_psnr]}."
    out = [Conclusion("equal-budget-winner", text, {"winner": w, "runner_up": r, "winner_mse": eb.rows[w].mse.mean,
                                                    "vs_runner_up": rel.mean, "lo": rel.lo, "hi": rel.hi,
                                                    "winner_by_psnr": eb.winner_by_psnr})]
    best, other = eb.best_at_one_curve, eb.one_curve_other
    if best and (best, other) != (w, r):
        one = eb.one_curve_vs_other
        out.append(Conclusion("equal-budget-one-curve", f"At one curve's budget ({_budget(eb, best)} epochs) the best "
                              f"is {EQUAL_BUDGET_SHORT[best]}: per pair its MSE is {fsigned(one.mean)} relative to "
                              f"{EQUAL_BUDGET_SHORT[other]}'s{sure(one)}.",
                              {"best": best, "other": other, "vs_other": one.mean, "lo": one.lo, "hi": one.hi}))
    return out


def convergence_conclusion(loss: str, c: Convergence, vae: Vae | None = None) -> Conclusion:
    """Whether the endpoints had converged, from the extra-trained endpoints' held-out gain (CONVERGED_GAIN)."""
    what = "objective" if vae is not None else "MSE" if loss == "mse" else "loss"
    if not c.extra_training:
        return Conclusion("convergence-not-measured", f"Convergence of the {loss} endpoints was not measured: the "
                          "study ran without extra training (--no-extra-training). The last-epoch gain in the "
                          "endpoint table is no measure of it: under the paper's schedule the lr ends at 1% of its "
                          "start, so that gain is near 0 by construction.")
    if not c.measured:
        return Conclusion("convergence-pending", f"Convergence of the {loss} endpoints is not measured yet: their "
                          "extra-trained copies have no finished evaluation (baselines/).")
    span = fpct(c.min) if fpct(c.min) == fpct(c.max) else f"{fpct(c.min)} to {fpct(c.max)}"
    of = "" if len(c.gains) == c.endpoints else f" ({len(c.gains)} of {c.endpoints} endpoints measured)"
    trained = (f"trained on for {c.extra_epochs} more epochs (as long as a curve, aecurves train --init), they gained "
               f"{span} in held-out {what} (its relative fall){of}")
    numbers = {"min": c.min, "max": c.max, "threshold": c.threshold, "above": c.above, "measured": len(c.gains)}
    if c.converged:
        return Conclusion("converged", f"The {loss} endpoints had converged by the study's measure: {trained}, within "
                          f"the {fpct(c.threshold)} threshold for every endpoint.", numbers)
    return Conclusion("not-converged", f"The {loss} endpoints had not converged: {trained}; {len(c.above)} of "
                      f"{len(c.gains)} gained more than the {fpct(c.threshold)} threshold "
                      f"(seed{'s' if len(c.above) != 1 else ''} {', '.join(c.above)}). The barrier and ensemble "
                      "comparisons in this report are comparisons with unconverged networks.", numbers)


def caveat(loss: str, s: GroupSummary) -> Conclusion | None:
    """The data's size and the endpoints' quality, stated plainly when the endpoints were trained on few images
    (under SMALL_TRAIN_SET) or reconstruct poorly (worst held-out PSNR under LOW_PSNR_DB); else None."""
    n, worst, best = s.train_set_images, s.worst_psnr_endpoints, s.endpoint_te_psnr_max
    if n is None or worst is None:
        return None
    small, weak = n < SMALL_TRAIN_SET, worst < LOW_PSNR_DB
    if not (small or weak):
        return None
    psnr_text = fdb(worst) if fdb(worst) == fdb(best) else f"{fdb(worst)} to {fdb(best)}"
    held_out = f"{s.test_set_images} held out" if s.test_set_images is not None else "held-out count n/a"
    text = f"These {loss} endpoints were trained on {n} images ({held_out}); their held-out PSNR is {psnr_text} dB"
    ratio = s.endpoint_mse_test_over_train
    if ratio is not None and ratio >= 1:
        text += f" and their train MSE is {ratio:.1f}× below the test MSE"
    elif ratio is not None:
        text += f" and their test MSE is {1 / ratio:.1f}× below the train MSE"
    what = {(True, True): "weak autoencoders on a tiny dataset", (True, False): "autoencoders on a tiny dataset",
            (False, True): "weak autoencoders"}[small, weak]
    why = [f"under {SMALL_TRAIN_SET} training images"] * small + [f"held-out PSNR under {LOW_PSNR_DB:g} dB"] * weak
    scale = "CelebA-scale models" if small else "well-trained models"
    code = {(True, True): "tiny-dataset-weak-endpoints", (True, False): "tiny-dataset",
            (False, True): "weak-endpoints"}[small, weak]
    return Conclusion(code, f"{text}: {what} ({'; '.join(why)}), enough to show the method, not a result about "
                      f"{scale}.", {"train_images": n, "test_images": s.test_set_images, "worst_psnr_db": worst,
                                    "best_psnr_db": best, "test_over_train_mse": ratio})
