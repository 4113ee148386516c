"""Step 1: collect. Every input file of the report read once, checked, and turned into the typed records of
model.py; the numbers over pairs computed from them (numbers.py). Nothing is drawn or written here: a damaged file
goes into Study.damaged and the report is made without it."""

from dataclasses import fields, replace
from pathlib import Path

from aecurves.config import CONV_VAE, KL_AUTOENCODER
from aecurves.records import EvalRecord, PlaneRecord, StageRecord

from .inputs import (
    Inputs,
    curve_arrays,
    endpoint_png,
    held_out_tensors,
    plane_arrays,
    read_study,
    reconstruction_arrays,
)
from .model import (
    BUDGET_FACTOR,
    EQUAL_BUDGET_METRICS,
    BudgetRow,
    CurveKind,
    Endpoint,
    EndpointEval,
    Ensemble,
    Extra,
    FgeRun,
    Group,
    Metrics,
    Pair,
    PairBudget,
    PathRow,
    PathStats,
    Plane,
    Protocol,
    Provenance,
    Settings,
    Study,
    Training,
    Vae,
    WhatRan,
)
from .numbers import convergence, equal_budget_summary, group_summary
from .specs import (
    CURVE_EVAL,
    CURVE_LOG_ROW,
    ENDPOINT_LOG_ROW,
    ENSEMBLES,
    FGE,
    NUMBER,
    PLANE,
    SEGMENT_EVAL,
    STAGE,
    Maybe,
    is_number,
)

VAE_MODELS = (CONV_VAE, KL_AUTOENCODER)  # the built-in models that are VAEs
# the settings of study.json's config the text reads, each checked like an input file's entry
SETTINGS = {"seeds": Maybe([int]), "curve": Maybe(str), "num_bends": Maybe(int), "num_points": Maybe(int),
            "dataset": Maybe(str), "image_size": Maybe(int), "epochs": Maybe(int), "lr": Maybe(NUMBER),
            "lr_schedule": Maybe(str), "curve_epochs": Maybe(NUMBER), "curve_lr": Maybe(NUMBER),
            "curve_lr_schedule": Maybe(str), "t_sampling": Maybe(str), "align": Maybe(bool), "fge": Maybe(bool),
            "model": Maybe(str), "model_kwargs": Maybe(dict), "bn_images": Maybe(int), "train_images": Maybe(int),
            "device": Maybe(str), "precision": Maybe(str), "kl_weight": Maybe(NUMBER)}


def pick(record: dict, *keys) -> list:
    """The entries `keys` of a checked record, None for each one its writer left out (a Maybe of the spec)."""
    return [record.get(k) for k in keys]


def collect(study_dir, inputs: Inputs | None = None) -> Study:
    """Every number of the report, read from the study's files (figures' inputs too, so that the damaged ones are
    known before the report is laid out)."""
    study_dir = Path(study_dir)
    inputs = inputs if inputs is not None else Inputs(study_dir)
    study = read_study(study_dir)
    config, provenance = pick(study, "config", "provenance")
    config = inputs.entry("study.json", "config", config, Maybe(dict)) or {}
    provenance = inputs.entry("study.json", "provenance", provenance, Maybe({"stage_seconds": Maybe(dict)}))
    provenance = _provenance(provenance) if provenance else None
    settings = _settings(inputs, config)
    groups = {loss: _group(inputs, loss, group, settings) for loss, group in study["groups"].items()}
    return Study(config=config, provenance=provenance, groups=groups, ran=what_ran(groups), damaged=inputs.damaged,
                 settings=settings)


def _settings(inputs: Inputs, config: dict) -> Settings:
    """The settings the text reads, each checked: one of another type is named (study.json is damaged there) and
    reads as not recorded, so that the report says "?" rather than failing on it."""
    values = {}
    for f in fields(Settings):
        values[f.name] = inputs.entry("study.json", f"config.{f.name}", config.get(f.name), SETTINGS[f.name])
    return Settings(**values)


def _provenance(record: dict) -> Provenance:
    known = [f.name for f in fields(Provenance) if f.name not in ("others", "record")]
    return Provenance(*pick(record, *known), others={k: v for k, v in record.items() if k not in known},
                      record=record)


def _group(inputs: Inputs, loss: str, group: dict, settings: Settings) -> Group:
    if group["status"] != "run":
        reason, remedy = pick(group, "reason", "remedy")
        return Group(status=group["status"], loss=loss, reason=reason or "", remedy=remedy or "")
    pairs = [_pair(inputs, group, pair, settings.curve_epochs) for pair in group["pairs"]]
    endpoints = [_endpoint(inputs, int(seed), folder, pairs) for seed, folder in group["endpoints"].items()]
    warning, plane = pick(group, "warning", "plane")
    extra_training = any("baseline_eval" in pair for pair in group["pairs"])
    return Group(status="run", loss=loss, warning=warning or None, endpoints=endpoints, pairs=pairs,
                 vae=group_vae(pairs, settings), summary=group_summary(endpoints, pairs),
                 equal_budget=equal_budget_summary(pairs, settings.curve_epochs),
                 convergence=convergence(endpoints, extra_training, settings.curve_epochs),
                 plane=_plane(inputs, plane) if plane else None)


# ----------------------------------------------------------------------------------------------------------
# a pair


def _pair(inputs: Inputs, group: dict, pair: dict, curve_epochs) -> Pair:
    rel = f"{pair['eval']}/eval.json"
    record = inputs.record(rel, EvalRecord, CURVE_EVAL)
    p = Pair(seeds=tuple(pair["seeds"]), eval=pair["eval"], curve_folder=pair["curve"], available=record is not None,
             eval_status=inputs.status(rel),
             curve_precision=precisions(inputs.jsonl(f"{pair['curve']}/metrics.jsonl", CURVE_LOG_ROW) or []))
    base = inputs.record(f"{pair['baseline_eval']}/eval.json", EvalRecord, SEGMENT_EVAL) \
        if "baseline_eval" in pair else None
    if base is not None:  # the extra-trained endpoints, measured like the paths' points
        s = base["paths"]["segment"]
        p.extras = tuple(Extra(te_loss=s[f"te_loss_{which}"], te_mse=s.get(f"te_mse_{which}"),
                               source=f"{pair['baseline_eval']}/eval.json ({which}, t={t})")
                         for t, which in enumerate(("start", "end")))
    if record is None:
        return p
    _evaluation(inputs, p, record)
    aligned = _aligned(inputs, p, pair)
    _compare_paths(p, record["paths"], aligned, base["paths"]["segment"] if base is not None else None)
    p.equal_budget = _pair_budget(inputs, group, pair, p, curve_epochs)
    return p


def _evaluation(inputs: Inputs, p: Pair, record: dict) -> None:
    """What the pair's eval.json says of the curve, its segment and the endpoints at their ends."""
    s = record["paths"]
    notes, bn, data, kind, ensemble = pick(record, "notes", "bn", "data", "path", "ensemble")
    bn, data = bn or {}, data or {}
    p.notes = notes or []
    p.num_points, p.loss_description, p.perceptual = pick(record, "num_points", "loss_description", "perceptual")
    if record.get("vae") is True:  # absent in an autoencoder's eval.json (and in those written before VAEs)
        kl_weight = record.get("kl_weight")
        p.vae = Vae(kl_weight=1.0 if kl_weight is None else kl_weight, distortion=p.loss_description)
    p.path = CurveKind(*pick(kind or {}, "curve", "num_bends"))
    (bn_images, bn_recomputed), (n_train, n_test) = pick(bn, "images", "recomputed"), pick(data, "train_images",
                                                                                          "test_images")
    train_images, test_images, device = pick(record, "train_metric_images", "test_metric_images", "device")
    p.protocol = Protocol(bn_images=bn_images, bn_recomputed=bn_recomputed, train_images=train_images,
                          n_train=n_train, test_images=test_images, n_test=n_test, device=device)
    p.curve, p.segment = PathStats.of(s["curve"]), PathStats.of(s["segment"])
    p.barrier_removed = removed(p.segment.te_barrier, p.curve.te_barrier)
    p.train_barrier_removed = removed(p.segment.tr_barrier, p.curve.tr_barrier)
    p.ends = (EndpointEval.of(s["curve"], "start"), EndpointEval.of(s["curve"], "end"))
    if ensemble:
        p.ensemble = Ensemble(k=ensemble.get("k"), record=ensemble,
                              entries={k: Metrics(*pick(v, *EQUAL_BUDGET_METRICS)) for k, v in
                                       ensemble["entries"].items()})
    p.arrays = inputs.load(f"{p.eval}/curve.npz", curve_arrays)
    found = {"curve": f"{p.eval}/reconstructions.png", "segment": f"{p.eval}/reconstructions_segment.png",
             **({"ensemble": f"{p.eval}/ensemble.png"} if p.ensemble else {})}
    p.strips = {kind: rel for kind, rel in found.items() if inputs.status(rel) == "found"}
    p.series = record.get("series") if isinstance(record.get("series"), dict) else None
    p.recons = inputs.load(f"{p.eval}/reconstructions.npz", reconstruction_arrays)


def _aligned(inputs: Inputs, p: Pair, pair: dict) -> dict | None:
    """The summary of the curve and segment to B aligned to A, when the study aligned B and evaluated them."""
    p.aligned_eval, = pick(pair, "aligned_eval")
    record = inputs.record(f"{p.aligned_eval}/eval.json", EvalRecord, CURVE_EVAL) if p.aligned_eval else None
    if record is None:
        return None
    a = record["paths"]
    p.aligned_curve, p.aligned_segment = PathStats.of(a["curve"]), PathStats.of(a["segment"])
    p.aligned_arrays = inputs.load(f"{p.aligned_eval}/curve.npz", curve_arrays)
    p.aligned_series = record.get("series") if isinstance(record.get("series"), dict) else None
    p.aligned_recons = inputs.load(f"{p.aligned_eval}/reconstructions.npz", reconstruction_arrays)
    strip = f"{p.aligned_eval}/reconstructions_segment.png"
    if inputs.status(strip) == "found":
        p.strips["aligned_segment"] = strip
    stage = inputs.record(f"{pair['aligned_endpoint']}/study_stage.json", StageRecord, STAGE) \
        if "aligned_endpoint" in pair else None
    p.align_seconds = ((stage or {}).get("result") or {}).get("seconds")
    return a


def _compare_paths(p: Pair, naive: dict, aligned: dict | None, extra: dict | None) -> None:
    """A pair's four paths side by side: each one's test barrier, the share of the naive segment's barrier it
    removes, its best point's test loss against the better endpoint and, when the endpoints were trained on as
    long as a curve, against the better of those."""
    summaries = {"": naive} if aligned is None else {"": naive, "aligned_": aligned}
    for prefix, s in summaries.items():
        for path in ("segment", "curve"):
            p.paths[prefix + path] = PathRow(*pick(s[path], "te_barrier", "te_loss_min"))
            if p.vae is not None:  # and its objective's two terms
                p.paths[prefix + path].distortion_barrier, p.paths[prefix + path].rate_barrier = \
                    pick(s[path], "te_distortion_barrier", "te_rate_barrier")
    better = min(naive["curve"]["te_loss_start"], naive["curve"]["te_loss_end"])
    extra_best = min(extra["te_loss_start"], extra["te_loss_end"]) if extra is not None else None
    p.better_endpoint_te_loss, p.extra_endpoint_te_loss = better, extra_best
    if extra is not None:  # the better extra-trained endpoint under every metric, as for the ensembles
        p.extra_endpoint = Metrics(mse=_better(min, *pick(extra, "te_mse_start", "te_mse_end")),
                                   psnr=max(extra["te_psnr_start"], extra["te_psnr_end"]),
                                   ssim=_better(max, *pick(extra, "te_ssim_start", "te_ssim_end")))
    naive_barrier = p.paths["segment"].barrier
    for row in p.paths.values():
        row.removed = removed(naive_barrier, row.barrier)
        row.best_vs_endpoint = (row.best - better) / better if row.best is not None and better else None
        row.best_vs_extra = (row.best - extra_best) / extra_best if row.best is not None and extra_best else None


def _pair_budget(inputs: Inputs, group: dict, pair: dict, p: Pair, epochs) -> PairBudget:
    """A pair's equal-budget ensembles on the held-out images: (a) and (b) from the curve's eval.json ("ensemble"),
    (c) and (d) from the pair's ensembles.json, (e) from the baseline's eval.json (the better extra-trained
    endpoint, per metric), each only when measured; and what each endpoint's FGE run recorded."""
    rows = {}

    def add(key, values: Metrics, members, source):
        if is_number(values.mse) and is_number(values.psnr):
            rows[key] = BudgetRow(mse=values.mse, psnr=values.psnr, ssim=values.ssim, members=members, source=source,
                                  budget_epochs=BUDGET_FACTOR[key] * epochs if is_number(epochs) else None)

    if p.ensemble:
        for key, entry in (("curve_ensemble", "path_average"), ("endpoint_average", "endpoint_average")):
            add(key, p.ensemble.entries.get(entry) or Metrics(None, None), p.ensemble.k if entry == "path_average"
                else 2, f"{pair['eval']}/eval.json: ensemble.entries.{entry}")
    rel = f"{pair['ensembles']}/ensembles.json" if "ensembles" in pair else None
    record = inputs.json(rel, ENSEMBLES) if rel else None
    for key in ("fge_pooled", "fge_start", "fge_end", "extra_average"):
        if record is not None and key in record["averages"]:
            values = record["averages"][key]
            add(key, Metrics(*pick(values, *EQUAL_BUDGET_METRICS)), len(values["members"]), f"{rel}: averages.{key}")
    if p.extra_endpoint:
        add("extra_best", p.extra_endpoint, 1, f"{pair['baseline_eval']}/eval.json: the better of t=0 and t=1")
    return PairBudget(rows=rows, fge=_fge_runs(inputs, group, p.seeds))


def _fge_runs(inputs: Inputs, group: dict, seeds) -> dict[str, FgeRun]:
    """The FGE runs' own record: how long they trained, how many snapshots, the cycle."""
    runs = {}
    for seed in seeds:
        folder = group.get("fge", {}).get(str(seed))
        fge = inputs.json(f"{folder}/fge.json", FGE) if folder else None
        if fge is not None:
            runs[str(seed)] = FgeRun(budget_epochs=fge["budget_epochs"], snapshots=len(fge["snapshots"]),
                                     cycle=(fge.get("schedule") or {}).get("cycle"))
    return runs


def group_vae(pairs: list[Pair], settings: Settings) -> Vae | None:
    """A group's VAE objective: its evaluations' (the first one's β and distortion); before any is there, the
    study's when its model is a built-in VAE (a custom one is known to be a VAE from its evaluations only)."""
    found = [p.vae for p in pairs if p.vae is not None]
    if found:
        return found[0]
    if settings.model in VAE_MODELS and not any(p.available for p in pairs):
        return Vae(kl_weight=1.0 if settings.kl_weight is None else settings.kl_weight, distortion=None)
    return None


# ----------------------------------------------------------------------------------------------------------
# an endpoint, the loss plane, what ran


def _endpoint(inputs: Inputs, seed: int, folder: str, pairs: list[Pair]) -> Endpoint:
    e = Endpoint(seed=seed, folder=folder)
    rows = inputs.jsonl(f"{folder}/metrics.jsonl", ENDPOINT_LOG_ROW)
    if rows:
        e.training = Training(*pick(rows[-1], "epoch", "train_loss", "test_loss", "test_mse", "test_psnr", "lr"),
                              last_epoch_gain=last_epoch_gain(rows), precision=precisions(rows))
    # eval-curve's figures: at t = 0 of the first path starting at it, else at t = 1 of the first ending at it
    found = [(p, t) for t in (0, 1) for p in pairs if p.ends is not None and p.seeds[t] == seed]
    if found:
        p, t = found[0]
        e.eval = p.ends[t]
        e.eval_source = f"{p.eval}/eval.json ({('start', 'end')[t]} of the path, t={t})"
    extra = next((p.extras[t] for p in pairs if p.extras for t in (0, 1) if p.seeds[t] == seed), None)
    if extra is not None and e.eval is not None:
        before = e.eval.te_loss
        e.extra = replace(extra, gain=(before - extra.te_loss) / before if is_number(before) and before > 0 else None)
    # the held-out images and their reconstructions as train.py saved them; for folders written before it saved
    # the tensors (or when they are damaged), the pixels cut out of the PNG
    e.picture = inputs.load(f"{folder}/reconstructions.pt", held_out_tensors) \
        or inputs.load(f"{folder}/reconstructions.png", endpoint_png)
    return e


def _plane(inputs: Inputs, plane: dict) -> Plane:
    rel = f"{plane['folder']}/plane.json"
    record = inputs.record(rel, PlaneRecord, PLANE)
    out = Plane(seeds=tuple(plane["seeds"]), folder=plane["folder"], available=record is not None,
                status=inputs.status(rel))
    if record is not None:
        out.summary, out.grid, out.seconds = pick(record, "summary", "grid", "seconds")
        picture = f"{plane['folder']}/plane.png"
        out.picture = picture if inputs.status(picture) == "found" else None
        out.arrays = inputs.load(f"{plane['folder']}/plane.npz", plane_arrays)
    return out


def what_ran(groups: dict[str, Group]) -> WhatRan:
    """What the stages really used, read from their own files (eval.json, metrics.jsonl): for each setting the
    distinct values over all stages, empty when none has run yet."""
    pairs = [p for g in groups.values() for p in g.pairs]
    protocols = [p.protocol for p in pairs if p.available]
    precision = [x for g in groups.values() for e in g.endpoints if e.training for x in e.training.precision]
    precision += [x for p in pairs for x in p.curve_precision]

    def bn(p: Protocol):
        if p.bn_recomputed is False:
            return "none: the running statistics from training are kept"
        return count(p.bn_images, p.n_train, "training images")

    def distinct(values) -> list:
        return sorted({v for v in values if v is not None}, key=str)

    return WhatRan(device=distinct(p.device for p in protocols), training_precision=distinct(precision),
                   data=distinct(f"{p.n_train} training / {p.n_test} held-out images" for p in protocols
                                 if p.n_train is not None),
                   bn_images=distinct(bn(p) for p in protocols),
                   train_metric_images=distinct(count(p.train_images, p.n_train, "training images") for p in protocols),
                   test_metric_images=distinct(count(p.test_images, p.n_test, "held-out images") for p in protocols))


# ----------------------------------------------------------------------------------------------------------
# small computations


def count(used, available, what: str) -> str | None:
    """'86 (all training images)', '500 of 2000 training images', or None when not recorded."""
    if used is None:
        return None
    if available is None:
        return str(used)
    return f"{used} (all {what})" if used >= available else f"{used} of {available} {what}"


def removed(naive, barrier) -> float | None:
    """The share of the naive segment's barrier a path removes: 1 − barrier / naive (when there is one to remove)."""
    return (naive - barrier) / naive if naive and naive > 0 and barrier is not None else None


def _better(which, a, b):
    """which(a, b) (min or max), None when either was not measured."""
    return None if a is None or b is None else which(a, b)


def precisions(rows: list[dict]) -> list[str]:
    """The precisions a training log's epochs ran in (a resumed run may have changed it)."""
    return sorted({str(r["precision"]) for r in rows if r.get("precision")})


def last_epoch_gain(rows: list[dict]) -> float | None:
    """Relative fall of the held-out loss over the last epoch. Shown, but no measure of convergence: under the
    paper's schedule the lr ends at 1% of its start, so it is near 0 by construction (convergence() judges it)."""
    if len(rows) < 2:
        return None
    before, after = rows[-2].get("test_loss"), rows[-1].get("test_loss")
    if not is_number(before) or not is_number(after) or not before > 0:
        return None
    return (before - after) / before
