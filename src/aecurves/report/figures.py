"""Step 3: figures. plan() decides from the collected data which figures the report shows and what each is made
from (no drawing: the document is laid out from the plan); draw() then makes them in report_files/, the only
step that writes a figure."""

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from aecurves.files import atomic_path

from .conclusions import DISTORTION_NAMES, RATE_UNIT, objective_name
from .model import Endpoint, Group, Pair, Study

FILES_DIR = "report_files"
# the path kinds of the first screen's figure: (name, arrays of the pair, key prefix in them, label, style, colour)
KINDS = (("segment", "arrays", "segment_", "straight segment", "--", "C3"),
         ("aligned_segment", "aligned_arrays", "segment_", "aligned segment", ":", "C1"),
         ("curve", "arrays", "", "curve", "-", "C0"),
         ("aligned_curve", "aligned_arrays", "", "aligned curve", "-.", "C2"))
STRIPS = ("curve", "segment", "aligned_segment", "ensemble")  # a pair's reconstruction strips, in the report's order


@dataclass
class Job:
    rel: str                      # where the figure goes, relative to the study folder
    make: Callable[[Path], None]  # writes it at the path given


@dataclass
class EndpointFigure:
    rel: str
    labelled: bool     # redrawn with row labels; else reconstructions.png as it is (a layout train.py does not write)
    width: int | None  # the width to show a copy at (enlarged 2×: its cells are small)


@dataclass
class GroupFigures:
    mean_loss: str | None = None     # the first screen's: each path kind's held-out loss, mean over pairs (for
    mean_terms: bool = False         # VAEs, their objective, and beside it its two terms when measured)
    mean_pairs: int = 0
    every_path: str | None = None    # every pair's paths, train and held-out loss
    plotted: list[Pair] = field(default_factory=list)  # the pairs in it
    endpoints: dict[int, EndpointFigure] = field(default_factory=dict)
    plane: str | None = None
    strips: dict[tuple, dict[str, str]] = field(default_factory=dict)  # seeds: {kind: figure}


@dataclass
class Figures:
    groups: dict[str, GroupFigures]
    jobs: list[Job]

    @property
    def files(self) -> list[str]:
        return [job.rel for job in self.jobs]


def plan(study: Study, study_dir: Path) -> Figures:
    jobs, groups = [], {}
    for loss, g in study.groups.items():
        if g.status == "run":
            groups[loss] = _group_figures(loss, g, study_dir, jobs)
    return Figures(groups=groups, jobs=jobs)


def draw(figures: Figures, study_dir: Path) -> None:
    for job in figures.jobs:
        job.make(study_dir / job.rel)


def _group_figures(loss: str, g: Group, study_dir: Path, jobs: list[Job]) -> GroupFigures:
    out = GroupFigures()
    label = objective_name(loss, g.vae)
    bands = mean_bands(g.evaluated)
    if bands:
        out.mean_loss, out.mean_pairs = f"{FILES_DIR}/{loss}_mean_loss_along_paths.png", max(b["n"] for b in bands)
        title = f"{loss} group: held-out {label} along t, mean over pairs (shaded: range over pairs)"
        panels = term_panels(loss, g, bands, label)
        out.mean_terms = len(panels) > 1
        make = partial(_plot_panels, panels, title=title) if out.mean_terms else \
            partial(_plot_bands, bands, ylabel=f"held-out {label}", title=title)
        jobs.append(Job(out.mean_loss, make))
    series, out.plotted = every_path_series(g.evaluated)
    if series:
        out.every_path = f"{FILES_DIR}/{loss}_loss_along_paths.png"
        styles = "every path" if any(p.aligned_arrays is not None for p in out.plotted) \
            else "the curves (solid) and the segments (dashed)"
        jobs.append(Job(out.every_path, partial(_plot_series, series, ylabel=label, title=(
            f"{loss} group, seeds {pairs_text(out.plotted)}: {label} along {styles}"))))
    for e in g.endpoints:
        if e.picture is not None:
            out.endpoints[e.seed] = _endpoint_figure(loss, e, study_dir, jobs)
    if g.plane is not None and g.plane.picture:
        a, b = g.plane.seeds
        out.plane = f"{FILES_DIR}/{loss}_plane_seed{a}-seed{b}.png"
        jobs.append(Job(out.plane, partial(_copy, study_dir / g.plane.picture)))
    for p in g.evaluated:
        tag = f"{loss}_seed{p.seeds[0]}-seed{p.seeds[1]}"
        out.strips[p.seeds] = {kind: f"{FILES_DIR}/{tag}_{kind}_reconstructions.png" for kind in STRIPS
                               if kind in p.strips}
        jobs += [Job(rel, partial(_copy, study_dir / p.strips[kind])) for kind, rel in out.strips[p.seeds].items()]
    return out


def _endpoint_figure(loss: str, e: Endpoint, study_dir: Path, jobs: list[Job]) -> EndpointFigure:
    """The endpoint's held-out images over their reconstructions, labelled and enlarged like the strips along the
    paths; reconstructions.png as it is when it has a layout train.py does not write (no rows cut out of it)."""
    rel = f"{FILES_DIR}/{loss}_seed{e.seed}_reconstructions.png"
    if e.picture.rows is None:
        jobs.append(Job(rel, partial(_copy, study_dir / f"{e.folder}/reconstructions.png")))
        return EndpointFigure(rel, labelled=False, width=2 * e.picture.width)
    rows = [("original", e.picture.rows[0]), ("reconstruction", e.picture.rows[1])]
    title = f"{loss} seed {e.seed}: held-out images and their reconstructions"
    jobs.append(Job(rel, partial(_labelled_rows, rows, title=title)))
    return EndpointFigure(rel, labelled=True, width=None)


def term_panels(loss: str, g: Group, bands: list[dict], label: str) -> list[tuple[str, list[dict]]]:
    """The first figure's panels, (y label, bands): the held-out loss alone for autoencoders; for VAEs their
    objective, then its distortion and its rate (KL, nats per image) along t, when curve.npz has them."""
    panels = [(f"held-out {label}", bands)]
    if g.vae is None:
        return panels
    for key, ylabel in (("te_distortion", f"held-out distortion ({DISTORTION_NAMES.get(loss, loss)})"),
                        ("te_rate", f"held-out rate ({RATE_UNIT})")):
        if terms := mean_bands(g.evaluated, key):
            panels.append((ylabel, terms))
    return panels


def mean_bands(pairs: list[Pair], key: str = "te_loss") -> list[dict]:
    """Per path kind, its held-out loss (or another of curve.npz's series, `key`) along t over the pairs that
    measured it: the mean, and the range (min to max) as the band. Pairs measured at other points t are
    interpolated onto the points of all of them."""
    bands = []
    for name, attr, prefix, label, style, color in KINDS:
        runs = [(a[prefix + "ts"], a[prefix + key]) for p in pairs
                if (a := getattr(p, attr)) is not None and prefix + key in a]
        if not runs:
            continue
        same = all(np.array_equal(ts, runs[0][0]) for ts, _ in runs)
        ts = np.asarray(runs[0][0], dtype=float) if same else np.unique(np.concatenate([ts for ts, _ in runs]))
        values = np.stack([np.interp(ts, t, v) for t, v in runs])
        bands.append({"name": name, "label": label, "n": len(runs), "ts": ts, "mean": values.mean(0),
                      "lo": values.min(0), "hi": values.max(0), "linestyle": style, "color": color})
    return bands


def every_path_series(pairs: list[Pair]) -> tuple[list[dict], list[Pair]]:
    """Loss along t for every curve (solid) and segment (dashed, same colour), and the aligned ones: the series of
    plots.plot_loss_along_paths, and the pairs drawn."""
    from aecurves import plots

    series, plotted = [], []
    for i, p in enumerate(pairs):
        if p.arrays is None:
            continue
        kinds = [(p.arrays, "", "curve", "-"), (p.arrays, "segment_", "segment", "--")]
        if p.aligned_arrays is not None:
            kinds += [(p.aligned_arrays, "", "aligned curve", "-."), (p.aligned_arrays, "segment_", "aligned segment",
                                                                     ":")]
        for arrays, prefix, what, style in kinds:
            series.append(plots.series_from_results(arrays, f"{what}, {p.label}", prefix=prefix, linestyle=style,
                                                    color=f"C{i % 10}"))
        plotted.append(p)
    return series, plotted


def pairs_text(pairs: list[Pair]) -> str:
    return ", ".join(f"{a}-{b}" for a, b in (p.seeds for p in pairs))


# what the jobs run (plots is imported when a figure is made: matplotlib is slow to import)


def _plot_bands(bands, path, **kw):
    from aecurves import plots

    plots.plot_bands_along_t(bands, path, **kw)


def _plot_panels(panels, path, title: str) -> None:
    """plots.plot_bands_along_t's panel, side by side for each (y label, bands): a VAE's objective and its terms."""
    from matplotlib.figure import Figure

    from aecurves import plots

    fig = Figure(figsize=(5.0 * len(panels), 3.9), layout="constrained")
    for ax, (ylabel, bands) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for band in bands:
            ts = np.asarray(band["ts"])
            line, = ax.plot(ts, band["mean"], linestyle=band["linestyle"], color=band["color"], label=band["label"],
                            linewidth=1.8)
            ax.fill_between(ts, band["lo"], band["hi"], color=line.get_color(), alpha=0.18, linewidth=0)
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    plots.save_figure(fig, path)


def _plot_series(series, path, ylabel: str, title: str) -> None:
    """Train and held-out loss against t (two panels), every pair's paths, the legend below the axes: with a dozen
    lines (three pairs, four paths each) a legend inside would cover them."""
    from matplotlib.figure import Figure

    from aecurves import plots

    columns = min(4, len({s.get("color") for s in series}))  # a pair per column (one colour each), up to 4
    fig = Figure(figsize=(10.4, 4.4 + 0.22 * -(-len(series) // columns)), layout="constrained")
    for ax, key, panel in zip(fig.subplots(1, 2), ("tr_loss", "te_loss"), ("train", "held-out")):
        for s in series:
            if s.get(key) is not None:
                ax.plot(np.asarray(s["ts"]), np.asarray(s[key]), linestyle=s.get("linestyle") or "-",
                        color=s.get("color"), label=s.get("label"), linewidth=1.6)
        ax.set_xlabel("t")
        ax.set_ylabel(f"{panel} {ylabel}")
        ax.set_title(panel)
        ax.set_xlim(0, 1)
        ax.grid(True, alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=columns,
               fontsize="small")
    fig.suptitle(title)
    plots.save_figure(fig, path)


def _labelled_rows(rows, path, **kw):
    from aecurves import plots

    plots.save_labelled_rows(rows, path, **kw)


def _copy(src: Path, path: Path) -> None:
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)
