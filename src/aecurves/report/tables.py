"""The report's tables as (headers, rows) of text, from the collected data: pure functions, laid out by layout.py."""

import json

from aecurves.config import BUILTIN_MODEL, BUILTIN_MODELS, takes_width

from .collect import removed
from .conclusions import DISTORTION_NAMES, RATE_UNIT
from .fmt import fbootstrap, fdb, finterval, fnum, fpct, fseconds, fsigned, fwhen
from .model import (
    EQUAL_BUDGET_ROWS,
    EQUAL_BUDGET_SHORT,
    PATHS,
    BudgetRow,
    Group,
    Pair,
    PathStats,
    Provenance,
    Settings,
    Study,
)

Rows = tuple[list[str], list[list[str]]]


def four_paths(g: Group, settings: Settings) -> Rows:
    """The first screen's table: each path kind over pairs (mean [95% t-interval]); a kind the study did not run,
    or has not measured yet, says so."""
    s = g.summary
    fair = any(r["best_vs_extra"].mean is not None for r in s.paths.values())
    terms = term_headers(g)
    what = "test objective barrier" if terms else "test barrier"
    headers = ["path", f"{what} ({_over(s.pairs_evaluated)})", "share of the segment's barrier removed",
               "best point vs the better endpoint"] + ["best point vs the endpoint trained as long (fair)"] * fair \
        + [f"{h} ({_over(s.pairs_evaluated)})" for _, h in terms]
    rows = []
    for name, label in PATHS:
        r = s.paths.get(name)
        if r is None:
            why = "not run (--no-align)" if settings.align is False and name.startswith("aligned") else \
                "not measured yet"
            rows.append([label, why] + ["—"] * (len(headers) - 2))
            continue
        rows.append([label, finterval(r["barrier"], fnum), "—" if name == "segment" else finterval(r["removed"], fpct),
                     finterval(r["best_vs_endpoint"], fsigned)] + [finterval(r["best_vs_extra"], fsigned)] * fair
                    + [finterval(r[key], fnum) for key, _ in terms])
    return headers, rows


def term_headers(g: Group) -> list[tuple[str, str]]:
    """A VAE group's columns of its objective's terms, (PathRow field, header); none for autoencoders."""
    if g.vae is None:
        return []
    return [("distortion_barrier", f"test distortion barrier ({DISTORTION_NAMES.get(g.loss, g.loss)})"),
            ("rate_barrier", f"test rate barrier ({RATE_UNIT})")]


def _over(n: int) -> str:
    return f"mean [95% interval] over {n} pairs" if n > 1 else "one pair"


def groups_side_by_side(study: Study) -> Rows:
    """Every loss group's barriers, the share removed and the worst PSNR, one row each."""
    aligned = any(g.summary and "aligned_segment" in g.summary.paths for g in study.groups.values())
    headers = ["loss group", "pairs", "segment test barrier (mean)", "curve test barrier (mean)",
               "barrier removed (mean)", "barrier removed (worst pair)"] \
        + ["aligned segment removes (mean)", "aligned curve removes (mean)"] * aligned \
        + ["worst test PSNR: curves (dB)", "endpoints (dB)", "segments (dB)"]
    rows = []
    for loss, g in study.groups.items():
        s = g.summary
        if g.status != "run":
            rows.append([loss, "skipped"] + ["—"] * (len(headers) - 2))
        elif not s.evaluated:
            rows.append([group_label(loss, g), f"{s.pairs_evaluated} of {s.pairs} evaluated"]
                        + ["n/a"] * (len(headers) - 2))
        else:
            shares = [fpct(s.paths[k]["removed"].mean) if k in s.paths else "n/a"
                      for k in ("aligned_segment", "aligned_curve")] * aligned
            rows.append([group_label(loss, g), str(s.pairs_evaluated), fnum(s.segment_te_barrier_mean),
                         fnum(s.curve_te_barrier_mean),
                         fpct(s.barrier_removed_mean), fpct(s.barrier_removed_min), *shares,
                         fdb(s.worst_psnr_curves), fdb(s.worst_psnr_endpoints), fdb(s.worst_psnr_segments)])
    return headers, rows


def group_label(loss: str, g: Group) -> str:
    """A group's name in a table: its loss, and for VAEs that its barriers are their objective's."""
    return loss if g.vae is None else f"{loss} (VAE objective)"


def endpoints(loss: str, g: Group) -> Rows:
    """eval-curve's figures for each endpoint (the ones to quote: measured like every point of the paths)."""
    if g.vae is not None:
        # the loss is the objective; its terms beside it, and the MSE where the distortion is not the MSE
        metrics = [("train objective", "tr_loss"), ("test objective", "te_loss"),
                   (f"test distortion ({DISTORTION_NAMES.get(loss, loss)})", "te_distortion"),
                   (f"test rate ({RATE_UNIT})", "te_rate")]
        metrics += [("train MSE", "tr_mse"), ("test MSE", "te_mse")] * (loss != "mse")
    elif loss == "mse":
        # the loss is the MSE: one pair of columns, not two equal ones; the loss's own values, which the barriers
        # are measured from (eval-curve's separately reduced MSE differs from them by rounding only)
        metrics = [("train MSE", "tr_loss"), ("test MSE", "te_loss")]
    else:
        kind = "perceptual" if any(p.perceptual for p in g.pairs) else loss
        metrics = [(f"train loss ({kind})", "tr_loss"), (f"test loss ({kind})", "te_loss"), ("train MSE", "tr_mse"),
                   ("test MSE", "te_mse")]
    headers = ["autoencoder" if g.vae is None else "VAE"] + [h for h, _ in metrics] \
        + ["train PSNR (dB)", "test PSNR (dB)", "epochs", "last-epoch gain", "gain from extra training"]
    rows = []
    for e in g.endpoints:
        ev, tr = e.eval, e.training
        rows.append([f"{loss} seed {e.seed}"] + [fnum(getattr(ev, k) if ev else None) for _, k in metrics]
                    + [fdb(ev.tr_psnr if ev else None), fdb(ev.te_psnr if ev else None),
                       "n/a" if tr is None or tr.epoch is None else str(tr.epoch),
                       fpct(tr.last_epoch_gain if tr else None), fpct(e.extra.gain if e.extra else None)])
    return headers, rows


def paths_per_pair(g: Group) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, headers, rows) of the four paths compared per pair, with a last row of means and 95% intervals."""
    done = [p for p in g.evaluated if p.paths]
    names = [(k, label) for k, label in PATHS if k in g.summary.paths]
    if not done or not names:
        return []
    tables = []
    terms = [(key, f"{header} of each path, the objective's term", fnum, ()) for key, header in term_headers(g)]
    for key, caption, fmt, skip in (
            ("barrier", "test barrier" if g.vae is None else "test barrier of the VAE objective", fnum, ()),
            ("removed", "share of the straight segment's test barrier removed", fpct, ("segment",)),
            ("best_vs_endpoint", "best point of each path (lowest test loss) against the better endpoint", fsigned,
             ()),
            ("best_vs_extra", "best point of each path against the better endpoint trained on as long as a curve "
                              "(the fair comparison)", fsigned, ()), *terms):
        cols = [(k, label) for k, label in names if k not in skip]
        values = [[getattr(p.paths[k], key) if k in p.paths else None for k, _ in cols] for p in done]
        if all(v is None for row in values for v in row):
            continue
        rows = [[p.label] + [fmt(v) for v in row] for p, row in zip(done, values)]
        rows.append(["mean [95% interval]"] + [finterval(g.summary.paths[k][key], fmt) for k, _ in cols])
        tables.append((caption, ["pair"] + [label for _, label in cols], rows))
    return tables


def pair_paths(loss: str, p: Pair) -> Rows:
    """One pair's curve, segment and the aligned ones: eval-curve's figures of each path (a VAE's: of its objective,
    and each term's test barrier)."""
    what = "objective" if p.vae is not None else "MSE" if loss == "mse" else "loss"
    headers = ["path", f"max test {what}", "test barrier", "barrier removed", "train barrier", "train barrier removed",
               "path length", "min test PSNR (dB)", "min test SSIM", "test barrier: 95% bootstrap over images"]
    if p.vae is not None:
        headers += [f"test distortion barrier ({DISTORTION_NAMES.get(loss, loss)})", f"test rate barrier ({RATE_UNIT})"]
    seg = p.segment

    def row(label: str, x: PathStats, share, train_share) -> list[str]:
        terms = [fnum(x.te_distortion_barrier), fnum(x.te_rate_barrier)] if p.vae is not None else []
        return [label, fnum(x.te_loss_max), fnum(x.te_barrier), share, fnum(x.tr_barrier), train_share,
                fnum(x.length), fdb(x.te_psnr_min), fnum(x.te_ssim_min), fbootstrap(x), *terms]

    rows = [row(f"{p.path.curve or 'curve'} curve ({p.path.num_bends or '?'} bends)", p.curve,
                fpct(p.barrier_removed), fpct(p.train_barrier_removed)), row("segment", seg, "—", "—")]
    for kind, x in (("curve", p.aligned_curve), ("segment", p.aligned_segment)):
        if x is not None:
            rows.append(row(f"aligned {kind}", x, fpct(p.paths[f"aligned_{kind}"].removed),
                            fpct(removed(seg.tr_barrier, x.tr_barrier))))
    return headers, rows


ENSEMBLE_ROWS = (("path_average", "(a) output average of {k} points of the curve"),
                 ("endpoint_average", "(b) output average of the two endpoints"),
                 ("weight_average", "(c) one network at the mean of the {k} points' weights"),
                 ("best_endpoint", "the better endpoint"))


def curve_ensembles(g: Group) -> Rows | None:
    """Per pair: the averages of eval-curve --ensemble against the better endpoint and the better endpoint trained
    on as long as a curve (the fair one), on the held-out images."""
    rows = []
    for p in g.evaluated:
        if not p.ensemble:
            continue
        for key, label in ENSEMBLE_ROWS:
            e = p.ensemble.entries.get(key)
            rows.append([p.label, label.format(k=p.ensemble.k)] + ([fnum(e.mse), fdb(e.psnr), fnum(e.ssim)] if e
                                                                  else ["n/a"] * 3))
        if p.extra_endpoint:
            x = p.extra_endpoint
            rows.append([p.label, "the better endpoint trained on as long as a curve (fair)", fnum(x.mse), fdb(x.psnr),
                         fnum(x.ssim)])
    if not rows:
        return None
    return ["pair", "network or average", "test MSE", "test PSNR (dB)", "test SSIM"], rows


def _row_text(key: str, label: str, row: BudgetRow, seeds) -> str:
    members = row.members or 0
    n = members // 2 if key == "fge_pooled" else members
    return label.format(k=members, n=f"{n} snapshot{'s' if n != 1 else ''}", a=seeds[0], b=seeds[1])


def _budget_text(epochs, factor: int) -> str:
    if epochs is None:
        return "n/a"
    return f"{epochs:g} (2 × {epochs / 2:g})" if factor == 2 else f"{epochs:g}"


def equal_budget(g: Group) -> tuple[Rows, Rows] | None:
    """(per pair, over pairs) tables of the equal-budget ensembles: each row's training budget beyond the endpoints
    in epochs, its networks, and held-out MSE, PSNR, SSIM; None when no pair measured them."""
    per_pair = []
    for p in g.evaluated:
        rows = p.equal_budget.rows if p.equal_budget else {}
        for key, label, factor in EQUAL_BUDGET_ROWS:
            if key in rows:
                r = rows[key]
                per_pair.append([p.label, _row_text(key, label, r, p.seeds), _budget_text(r.budget_epochs, factor),
                                 "n/a" if r.members is None else str(r.members), fnum(r.mse), fdb(r.psnr),
                                 fnum(r.ssim)])
    if not per_pair:
        return None
    eb, over = g.equal_budget, []
    for key, _, factor in EQUAL_BUDGET_ROWS:
        if key in eb.rows:
            r = eb.rows[key]
            name = EQUAL_BUDGET_SHORT[key] + (" (the winner)" if key == eb.winner else "")
            over.append([name, _budget_text(r.budget_epochs, factor), str(r.pairs), finterval(r.mse, fnum),
                         finterval(r.psnr, fdb), finterval(r.ssim, fnum)])
    headers = ["pair", "ensemble", "training beyond the endpoints (epochs)", "networks", "test MSE",
               "test PSNR (dB)", "test SSIM"]
    return (headers, per_pair), (["ensemble", "training beyond the endpoints (epochs)", "pairs",
                                  "test MSE, mean [95% interval]", "test PSNR (dB)", "test SSIM"], over)


# ----------------------------------------------------------------------------------------------------------
# configuration and provenance

CONFIG_KEYS = (("preset", "preset"), ("dataset", "dataset"), ("data_dir", "data folder"), ("image_size", "image size"),
               ("limit", "image limit"), ("losses", "losses"), ("seeds", "seeds"), ("model", "model factory"),
               ("model_kwargs", "model kwargs"), ("kl_weight", "KL weight β (VAE)"), ("latent_dim", "bottleneck"),
               ("width", "width"),
               ("epochs", "endpoint epochs"), ("lr", "endpoint lr (Adam)"), ("lr_schedule", "endpoint lr schedule"),
               ("batch_size", "batch size"), ("curve", "curve"), ("num_bends", "bends (ends fixed)"),
               ("curve_epochs", "curve epochs"), ("curve_lr", "curve lr (Adam)"),
               ("curve_lr_schedule", "curve lr schedule"), ("wd", "curve wd"), ("fge_cycle", "FGE cycle (epochs)"),
               ("num_points", "points per path"), ("vgg_weights", "VGG weights"))


def configuration(study: Study) -> list[list[str]]:
    """The configuration as it ran: study.json's settings, and for those the study resolves at run time (device,
    precision, subset sizes capped by the data) the values the stages recorded, beside the request."""
    cfg, ran, settings = study.config, study.ran, study.settings
    model = settings.model or BUILTIN_MODEL  # a study.json from before --model: the built-in was the only one
    shown = {**cfg, "model": f"{model} (built-in)" if model in BUILTIN_MODELS else model,
             "model_kwargs": settings.model_kwargs or "none"}
    if not takes_width(model):  # a custom factory takes its own settings, in its kwargs
        shown["width"] = "does not apply (a setting of the built-in convolutional models)"
    vae = [g.vae for g in study.groups.values() if g.vae is not None]
    if vae:  # an autoencoder has no KL: β is shown for VAEs only, as their evaluations measured it
        weights = sorted({v.kl_weight for v in vae})
        shown["kl_weight"] = ", ".join(f"{w:g}" for w in weights) + " (objective: distortion + β·KL/D, D the values " \
            "per image)"
    rows = [[label, setting_text(shown[k])] for k, label in CONFIG_KEYS
            if k in shown and not (shown[k] is None and k in ("data_dir", "limit"))
            and not (k == "fge_cycle" and not settings.fge) and not (k == "kl_weight" and not vae)]
    return rows + [["images (training / held out)", _ran(ran.data)],
                   ["BN statistics per point, from", _ran(ran.bn_images, settings.bn_images)],
                   ["train metrics per point, from", _ran(ran.train_metric_images, settings.train_images)],
                   ["held-out metrics per point, from", _ran(ran.test_metric_images)],
                   ["device", _ran(ran.device, settings.device)],
                   ["training precision", _ran(ran.training_precision, settings.precision)]]


def _ran(values: list, requested=None) -> str:
    """What ran, with the request beside it where it differs: 'cpu (requested auto)'; 'not run yet' when none ran."""
    text = ", ".join(map(str, values)) or "not run yet"
    if requested is None or (len(values) == 1 and str(values[0]).split(" ")[0] == str(requested)):
        return text
    # '86 (all training images)' and request 8192 -> '86 (all training images; requested 8192)'
    return f"{text[:-1]}; requested {requested})" if text.endswith(")") else f"{text} (requested {requested})"


def setting_text(value) -> str:
    """A setting of study.json as text: a list's items joined, an object as JSON."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


PROVENANCE_KEYS = (("aecurves", "aecurves version"), ("git_commit", "git commit"), ("torch", "torch"),
                   ("python", "Python"), ("host", "host"), ("device", "device"), ("started", "started"),
                   ("finished", "finished"))


def provenance(prov: Provenance) -> list[list[str]]:
    """study.json's provenance as table rows; a missing entry reads "not recorded"."""
    rows = []
    for k, label in PROVENANCE_KEYS:
        value = getattr(prov, k)
        if k in ("started", "finished"):
            rows.append([label, fwhen(value)])
        else:
            rows.append([label, "not recorded" if value is None else str(value)])
    rows.append(["wall time, whole study", fseconds(prov.wall_seconds)])
    return rows + [[k, str(v)] for k, v in prov.others.items()]
