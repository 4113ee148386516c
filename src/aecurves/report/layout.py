"""Step 4: the document, laid out from the collected data, the conclusions and the figure plan.

First, per loss group, the answer: one sentence with its interval, one figure, the table of the four paths. Then the
caveats, in plain sight. Then everything else, each part folded in HTML (<details>), a plain section in Markdown:
every conclusion, the endpoints, every path's loss, the per-pair tables, the ensembles, each pair, how the numbers
were measured, the configuration, the provenance and the files.
"""

import shlex
from pathlib import Path

from aecurves.config import BN_IMAGES, TRAIN_IMAGES

from . import tables
from .conclusions import DISTORTION_NAMES, LOSS_NAMES, RATE_UNIT, Findings, objective_name
from .document import Code, Doc, Text
from .explorer import pair_explorer, plane_explorer
from .figures import STRIPS, Figures, GroupFigures, pairs_text
from .fmt import fnum, fpct, fseconds, fwhen
from .model import Group, Pair, Provenance, Settings, Study
from .numbers import CONVERGED_GAIN

TITLE = "Mode connectivity of autoencoders: study report"
# Measured by benchmarks/eval_protocol.py (docs/performance.md gives the command and the table).
PROTOCOL_DEVIATION = ("The train-metric subset is stratified by the start endpoint's per-image MSE. Measured on "
                      "real CelebA images (benchmarks/eval_protocol.py), subsets of the default size keep every "
                      "measured point within 1% of --full at three standard deviations; docs/performance.md "
                      "('Evaluation subsets against --full') gives the table.")
BARRIER = ("Barrier: max over t of L(t) − ((1 − t)·L(0) + t·L(1)), the rise of the held-out loss above the chord "
           "between the two ends of a path; share removed: 1 − path barrier / straight segment barrier; best point: "
           "the path's lowest held-out loss relative to the better endpoint (negative: below it).")
VAE_OBJECTIVE = ("The networks are VAEs: every loss along a path is their objective, distortion + β·rate/D, measured "
                 "like an autoencoder's loss (the posterior mean decoded, BatchNorm statistics recomputed at each "
                 "t). Distortion: the reconstruction loss; rate: the KL of the posterior from the prior, in nats per "
                 "image; D: the values per image (channels × height × width). A barrier of each term is measured "
                 "like the objective's, each against its own chord, so the two do not add up to the objective's.")


def build(study: Study, findings: dict[str, Findings], figures: Figures, study_dir: Path, written: str) -> Doc:
    """The report of `study`; `written`: when (it goes into the Files section)."""
    doc = Doc()
    doc.h(1, TITLE)
    doc.p(intro(study.settings))
    if any(g.vae is not None for g in study.groups.values()):
        doc.p(VAE_OBJECTIVE)
    for loss, g in study.groups.items():
        answer(doc, g, findings[loss], figures.groups.get(loss), study.settings)
    caveats(doc, study, findings)
    for loss, g in study.groups.items():
        if g.status == "run":
            group_details(doc, g, findings[loss], figures.groups[loss], study)
    study_sections(doc, study, study_dir, written)
    return doc


def intro(s: Settings) -> str:
    size = s.image_size or "?"
    return ("Does the held-out loss rise on the straight segment between two autoencoders trained from different "
            "seeds (a barrier), and does a low-loss curve trained between them remove it? Autoencoders trained from "
            f"seeds {tables.setting_text(s.seeds or [])} for each loss, every pair within a loss group connected by "
            f"a {s.curve or ''} curve with {s.num_bends or '?'} bends (ends fixed), and every curve and the straight "
            f"segment between the same endpoints evaluated at {s.num_points or '?'} points t in [0, 1] on "
            f"{s.dataset or '?'} {size}x{size} images.")


def answer(doc: Doc, g: Group, f: Findings, figs: GroupFigures | None, settings: Settings) -> None:
    """A loss group's first screen: the answer in one sentence, the figure, the table of the four paths."""
    name = LOSS_NAMES.get(g.loss, g.loss)
    if g.status != "run":  # a warning, not an answer: nothing was measured
        doc.section(2, f"{g.loss} group ({name}): SKIPPED").p(f.answer.text, "warn")
        return
    heading = f"{g.loss} group ({name})"
    if g.vae is not None:  # a heading without parentheses in parentheses
        name = objective_name(g.loss, g.vae)
        heading = f"{g.loss} group (VAE objective: {DISTORTION_NAMES.get(g.loss, g.loss)} + {g.vae.kl_weight:g}·KL/D)"
    d = doc.section(2, heading)
    s = g.summary
    d.p(f.answer.text, "summary" if s.evaluated else "warn")
    if not s.evaluated:
        return
    if s.pairs_evaluated < s.pairs:
        d.p(f"{s.pairs - s.pairs_evaluated} of {s.pairs} pairs are not in these numbers (not evaluated yet, or "
            "damaged: see each pair below).", "warn")
    if figs.mean_loss:
        terms = (f" (left), and its two terms: the distortion, {DISTORTION_NAMES.get(g.loss, g.loss)} (middle), and "
                 f"the rate, the {RATE_UNIT} (right)") if figs.mean_terms else ""
        d.img(figs.mean_loss, f"{g.loss} group: held-out {name} along t for each kind of path{terms}, the mean over "
                              f"the pairs ({pairs_text(figs.plotted)}), shaded from the lowest to the highest pair; "
                              "every pair's own paths, train and held-out, are under 'Loss along every path' below")
    d.table(*tables.four_paths(g, settings))
    d.p(BARRIER, "muted")
    if g.vae is not None:
        distortion = DISTORTION_NAMES.get(g.loss, g.loss)
        d.p(f"L is the VAE objective, {distortion} + {g.vae.kl_weight:g}·KL/D; the last two columns give each of its "
            f"terms' own barrier: the distortion's ({distortion}) and the rate's ({RATE_UNIT}).", "muted")


def caveats(doc: Doc, study: Study, findings: dict[str, Findings]) -> None:
    """What limits the answer, in plain sight: the data and the endpoints' quality, unconverged endpoints, a group's
    warning, and the input files left out as damaged."""
    texts = []
    for loss, g in study.groups.items():
        f = findings[loss]
        texts += [c.text for c in (f.caveat, f.find("not-converged")) if c is not None]
        texts += [g.warning] if g.warning else []
    if not texts and not study.damaged:
        return
    d = doc.section(2, "Caveats")
    for text in texts:
        d.p(text, "warn")
    if study.damaged:
        d.p(("Damaged input files, left out of this report (unreadable, or not holding what their stage writes; "
             "forcing that stage, e.g. ", Code("aecurves study --force eval:mse:1-2"), ", writes one again):"), "warn")
        d.ul([f"{rel}: {reason}" for rel, reason in study.damaged.items()], "warn")


# ----------------------------------------------------------------------------------------------------------
# a group in detail


def group_details(doc: Doc, g: Group, f: Findings, figs: GroupFigures, study: Study) -> None:
    d = doc.section(2, f"{g.loss} group in detail")
    if f.details:
        d.section(3, "More conclusions, with their intervals", fold=True).ul([c.text for c in f.details], "summary")
    explorers(d, g)
    endpoints(d, g, figs)
    every_path(d, g, figs, study.damaged)
    paths_per_pair(d, g, study.settings)
    curve_ensembles(d, g)
    equal_budget(d, g, study.settings)
    for p in g.pairs:
        pair(d, g.loss, p, figs, study.damaged)
    notes = sorted({n for p in g.evaluated for n in p.notes})
    if notes:
        d.section(3, "Notes from eval-curve", fold=True).ul(notes)


def explorers(doc: Doc, g: Group) -> None:
    """report.html's explorers: one per pair along t, and the loss plane's (report.md has the static strips)."""
    found = [e for p in g.evaluated if (e := pair_explorer(g.loss, p)) is not None]
    plane = plane_explorer(g.loss, g.plane) if g.plane is not None else None
    if not found and plane is None:
        return
    d = doc.section(3, "Look along the path", fold=True, open=True)
    d.p("In report.html: move t with the slider (or its arrow keys), or point at the figure; the table gives each "
        "path's held-out loss, PSNR and SSIM at that t, beside the reconstructions of the same held-out images by "
        "its network there (BatchNorm statistics recomputed at every t, as measured by eval-curve). report.md shows "
        "the reconstructions at t = 0, 1/8, …, 1 under each pair instead.", "muted")
    for e in found:
        d.add(e)
    if plane is not None:
        d.add(plane)


def endpoints(doc: Doc, g: Group, figs: GroupFigures) -> None:
    d = doc.section(3, "Endpoints", fold=True)
    d.table(*tables.endpoints(g.loss, g))
    d.p(endpoint_footnote(g.loss, g), "muted")
    for e in g.endpoints:
        fig = figs.endpoints.get(e.seed)
        if fig is not None:
            top, bottom = ("", "") if fig.labelled else (" (top row)", " (bottom row)")
            d.img(fig.rel, f"{g.loss} group, seed {e.seed}: held-out images{top} and their reconstructions{bottom} "
                           "after the last epoch", pixels=not fig.labelled, width=fig.width)


def endpoint_footnote(loss: str, g: Group) -> str:
    """Where the endpoint table's figures come from, and why the training log's held-out figure differs."""
    what = "objective" if g.vae is not None else "MSE" if loss == "mse" else "loss"
    columns = "objective, distortion, rate and PSNR" if g.vae is not None else "MSE and PSNR" if loss == "mse" \
        else "loss, MSE and PSNR"
    text = (f"The {columns} columns are eval-curve's, at t=0 / t=1 of the first path through each endpoint, with "
            "the BatchNorm statistics recomputed from training images as at every point of the paths: the figures "
            "to quote, comparable with every point of the paths. ")
    logged = [f"{fnum(e.training.test_loss)} (seed {e.seed})" for e in g.endpoints
              if e.training is not None and e.training.test_loss is not None]
    if logged:
        text += (f"The training log (metrics.jsonl) gives another held-out {what}, {', '.join(logged)}, measured "
                 "with the BatchNorm running statistics kept from training. ")
    text += ("Epochs and last-epoch gain come from the training log: how much the held-out loss fell in the final "
             "epoch. Under the paper's schedule the lr ends at 1% of its start, so that gain is near 0 by "
             "construction and says nothing about convergence. ")
    c = g.convergence
    if not c.extra_training:
        return text + ("The study ran without extra training (--no-extra-training), so convergence was not "
                       "measured.")
    return text + (f"The gain from extra training is how much the held-out {what} falls when the endpoint is trained "
                   f"on for {c.extra_epochs} more epochs, as long as a curve (aecurves train --init; measured by "
                   "eval-curve like every point of the paths, baselines/): an endpoint that still gains more than "
                   f"{fpct(CONVERGED_GAIN)} had not converged, and a barrier measured against it is one between "
                   "unconverged networks.")


def every_path(doc: Doc, g: Group, figs: GroupFigures, damaged: dict) -> None:
    """Every pair's paths, train and held-out loss, and the loss plane through a curve."""
    name = objective_name(g.loss, g.vae)
    d = doc.section(3, "Loss along every path", fold=True)
    if figs.every_path:
        aligned = any(p.aligned_arrays is not None for p in figs.plotted)
        d.img(figs.every_path, f"{g.loss} group, seeds {pairs_text(g.evaluated)}: {name} along t for every curve "
                               "(solid) and the straight segment between the same endpoints (dashed, same colour)"
                               + ("; the curve to the aligned B (dash-dot) and the aligned segment (dotted)"
                                  if aligned else "") + "; left: training images, right: held-out images")
    else:
        d.p("No finished evaluation yet.", "warn")
    plane = g.plane
    if plane is None:
        return
    a, b = plane.seeds
    if figs.plane:
        d.img(figs.plane, f"{g.loss} group, seeds {a}-{b}: {name} over the plane through the curve's first, middle "
                          "and last bend (aecurves plane), BatchNorm statistics recomputed at every grid point; the "
                          "curve solid, the straight segment dashed")
    else:
        rel = f"{plane.folder}/plane.{'png' if plane.available else 'json'}"
        d.p(f"The loss plane of seeds {a}-{b} is not there: {absent(rel, damaged)}.", "warn")


def paths_per_pair(doc: Doc, g: Group, settings: Settings) -> None:
    found = tables.paths_per_pair(g)
    if not found:
        return
    d = doc.section(3, "Straight segment, aligned segment, curve, aligned curve", fold=True)
    d.p("The aligned segment and the aligned curve end at B aligned to A (aecurves align: B's hidden units "
        "reordered and its latent code mapped; the same function). Best point: the path's lowest held-out "
        "loss, relative to the better endpoint (negative: below it). A curve's middle bend gets "
        f"{settings.curve_epochs or '?'} epochs of extra training, so the endpoints trained on "
        "for as long (aecurves train --init, same lr schedule) are the fair comparison. Means over pairs "
        "with a 95% t-interval; with few pairs the interval is wide.", "muted")
    for caption, headers, rows in found:
        d.p(caption[0].upper() + caption[1:] + ":")
        d.table(headers, rows)


def curve_ensembles(doc: Doc, g: Group) -> None:
    table = tables.curve_ensembles(g)
    if table:
        d = doc.section(3, "Averaging along the curve (curve ensembles)", fold=True)
        d.p("The reconstruction analogue of the paper's fast ensembling, on the held-out images, BatchNorm "
            "statistics recomputed for every network. The better endpoint is taken per metric. A curve's "
            "middle bend gets extra training, so the endpoint trained on for as long is the fair comparison.",
            "muted")
        d.table(*table, numeric_from=2)


def equal_budget(doc: Doc, g: Group, settings: Settings) -> None:
    found = tables.equal_budget(g)
    if not found:
        return
    e = settings.curve_epochs or "?"
    d = doc.section(3, "Ensembles at equal training budget", fold=True)
    d.p(f"Every ensemble of a pair at the same training beyond the endpoints: one curve's {e} epochs (its "
        f"--curve-epochs) per run. (a) and (b): the curve's evaluation (eval-curve --ensemble); (c): fast "
        f"geometric ensembling (aecurves fge) from each endpoint for {e} epochs, its snapshots' outputs "
        "averaged, each run alone and both runs pooled; (d) and (e): the endpoints trained on for "
        f"{e} epochs each (aecurves train --init). A row made of two runs is 2 × {e} epochs; (e) is one "
        "run, chosen as the better of two. Output averages of reconstructions on the held-out images, "
        "BatchNorm statistics recomputed for every network on the same training images; (e) per metric.",
        "muted")
    per_pair, over = found
    d.table(*per_pair, numeric_from=2)
    d.p("Over pairs:")
    d.table(*over, numeric_from=1)


def pair(doc: Doc, loss: str, p: Pair, figs: GroupFigures, damaged: dict) -> None:
    """One pair: its paths' figures and the reconstructions along them."""
    a, b = p.seeds
    d = doc.section(3, f"Seeds {a} and {b}", fold=True)
    if not p.available:
        lead = "Left out" if p.eval_status == "damaged" else "Not evaluated yet"
        d.p(f"{lead} ({absent(p.eval + '/eval.json', damaged)}).", "warn")
        return
    d.table(*tables.pair_paths(loss, p))
    label = f"{p.path.curve or 'curve'} curve ({p.path.num_bends or '?'} bends)"
    along = f"{loss} group, seeds {a}-{b}: held-out images reconstructed along"
    captions = {"curve": f"{along} the {label} at t = 0, 1/8, …, 1",
                "segment": f"{along} the straight segment at t = 0, 1/8, …, 1",
                "aligned_segment": f"{along} the straight segment to seed {b} aligned to seed {a} at t = 0, 1/8, …, 1",
                "ensemble": f"{loss} group, seeds {a}-{b}: held-out images, then the two endpoints' reconstructions, "
                            "(a) the output average along the curve, (b) that of the endpoints and (c) the weight "
                            "average: what averaging costs in sharpness"}
    for kind in STRIPS:
        if kind in figs.strips.get(p.seeds, {}):
            d.img(figs.strips[p.seeds][kind], captions[kind], pixels=True)


def absent(rel: str, damaged: dict) -> str:
    """Why the input file `rel` is not in the report: not written yet, or damaged (and how)."""
    reason = damaged.get(rel)
    return f"{rel} is damaged: {reason}" if reason else f"{rel} is missing"


# ----------------------------------------------------------------------------------------------------------
# the whole study: measurement, configuration, provenance, files


def study_sections(doc: Doc, study: Study, study_dir: Path, written: str) -> None:
    doc = doc.section(2, "The study")
    if len(study.groups) > 1:
        doc.section(3, "All loss groups side by side", fold=True).table(*tables.groups_side_by_side(study))
    d = doc.section(3, "How the numbers are measured", fold=True)
    d.p("Barrier: max over t of L(t) − ((1 − t)·L(0) + t·L(1)), the rise of the held-out loss above the chord "
        "between the two ends of a path; barrier removed: 1 − curve barrier / segment barrier. Losses, MSE and "
        "PSNR are measured by eval-curve in fp32 after recomputing the BatchNorm statistics at each t.", "muted")
    d.p(training_and_protocol(study), "muted")
    d = doc.section(3, "Configuration", fold=True)
    d.p("study.json's settings; where the study resolves a setting at run time (device, precision, subsets capped "
        "by the data), the value the stages recorded in their own files, with the request beside it where they "
        "differ.", "muted")
    d.table(["setting", "value"], tables.configuration(study), numeric_from=2)
    provenance(doc.section(3, "Provenance", fold=True), study.provenance)
    doc.section(3, "Files", fold=True).p(files_text(study_dir, written), "muted")


def training_and_protocol(study: Study) -> str:
    """What schedule trained the networks, and how far the evaluation protocol can be from --full."""
    s = study.settings
    text = (f"Endpoints: Adam at lr {s.lr} with the {s.lr_schedule or 'constant'} schedule for {s.epochs} epochs; "
            f"curves: Adam at lr {s.curve_lr} with the {s.curve_lr_schedule or 'constant'} schedule and "
            f"{s.t_sampling or 'uniform'} t for {s.curve_epochs} epochs. ")
    if "paper" in (s.lr_schedule, s.curve_lr_schedule):
        text += ("The paper's schedule (Garipov et al., 2018) keeps the lr for the first half of training, lowers it "
                 "linearly to 1% of it at 90%, and keeps 1% to the end. ")
    protocols = [p.protocol for g in study.groups.values() for p in g.evaluated
                 if p.protocol.bn_images and p.protocol.train_images and p.protocol.n_train]
    if not protocols:
        return text
    if all(p.bn_images >= p.n_train and p.train_images >= p.n_train for p in protocols):
        return text + (f"Evaluation protocol: BatchNorm statistics and train metrics from all "
                       f"{min(p.n_train for p in protocols)} training images at every point, which is eval-curve "
                       "--full.")
    bn, tr, n = (min(getattr(p, k) for p in protocols) for k in ("bn_images", "train_images", "n_train"))
    text += (f"Evaluation protocol: BatchNorm statistics from {bn} and train metrics from {tr} of the {n} "
             f"training images (fixed subsets) at every point. ")
    return text + (PROTOCOL_DEVIATION if bn >= BN_IMAGES and tr >= TRAIN_IMAGES else (
        f"These subsets are smaller than the defaults ({BN_IMAGES}), whose distance from --full was "
        "measured; benchmarks/eval_protocol.py measures it for other sizes."))


def provenance(d: Doc, prov: Provenance | None) -> None:
    d.p(provenance_line(prov), "muted")
    if prov is None:
        return
    d.table(["", "as recorded in study.json"], tables.provenance(prov), numeric_from=2)
    if prov.stage_seconds:
        d.table(["stage", "wall time"], [[k, fseconds(v)] for k, v in prov.stage_seconds.items()])
    else:
        d.p("Wall time per stage: not recorded.", "muted")


def provenance_line(prov: Provenance | None) -> Text:
    if prov is None:
        return ("Provenance (versions, host, dates, wall times): not recorded (study.json predates it or was not "
                "written by ", Code("aecurves study"), ").")
    commit = f" (commit {str(prov.git_commit)[:12]})" if prov.git_commit else ""
    return (f"Made with aecurves {_or(prov.aecurves)}{commit}, torch {_or(prov.torch)}, Python {_or(prov.python)} "
            f"on {_or(prov.host)} ({_or(prov.device)}); started {fwhen(prov.started)}; wall time "
            f"{fseconds(prov.wall_seconds)}.")


def _or(value, missing: str = "?") -> str:
    return missing if value is None else str(value)


def files_text(study_dir: Path, written: str) -> Text:
    return ("endpoints/{loss}_seed{s}/: aecurves train runs (…_extra: trained on as long as a curve); "
            "aligned/{loss}_seed{b}-to-seed{a}/: aecurves align; curves/{loss}_seed{a}-seed{b}/ (…_aligned: to the "
            "aligned B): aecurves train-curve runs; …/eval/: aecurves eval-curve of each curve and of its segment "
            "(eval.json, curve.npz with segment_* arrays); baselines/: the extra-trained endpoints measured like the "
            "paths; fge/{loss}_seed{s}/: aecurves fge from each endpoint (snapshot_K.pt, fge.json); "
            "ensembles/{loss}_seed{a}-seed{b}/: the pair's FGE and extra-trained ensembles (ensembles.json); "
            "study.json: the resolved configuration; report.json: every number above. Written "
            f"{written} from the files of {study_dir.resolve()}; regenerate with ",
            Code(f"aecurves report {shlex.quote(str(study_dir))}"), ".")
