"""Figures: losses along paths in weight space, grids of reconstructions along a path, labelled rows of images.

Everything is drawn with matplotlib's object API (Figure + the Agg canvas), never pyplot, so importing this
module changes no global backend and needs no display. Every file is written atomically.
"""

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from aecurves.files import atomic_path

# Reconstruction grids: cells are upscaled (nearest) to at least MIN_CELL pixels so a label fits above each.
MIN_CELL = 64
PADDING = 2
# Labels in DejaVu Sans (shipped with matplotlib) at LABEL_FONT_SIZE px: readable at 100% zoom ("t=0.125" and
# "original" fit a 64-px cell). LINE_HEIGHT holds one line of it (ascent + descent = 17 px) with a small margin.
LABEL_FONT = "DejaVu Sans"
LABEL_FONT_SIZE = 13
LINE_HEIGHT = 20  # pixels per text line in a grid's header
TEXT_MARGIN = 4   # pixels between a row label and the grid's edge or its first cell
MAX_PLANE_STRETCH = 3.0  # plane figures: the most one axis may be drawn longer than the other at equal scales


def save_figure(fig, path, dpi: int = 120) -> None:
    """Writes a matplotlib Figure as PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach an Agg canvas: works whatever backend pyplot would pick
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def series_from_results(results: Mapping, label: str, prefix: str = "", linestyle: str = "-", color=None,
                        keys: Sequence[str] = ("tr_loss", "te_loss")) -> dict:
    """A plotting series from evaluation results (a curve.npz, eval.json's "series", or a dict of arrays).

    prefix="segment_" picks the straight segment evaluated alongside a curve.
    """
    series = {"label": label, "linestyle": linestyle, "color": color, "ts": np.asarray(results[prefix + "ts"])}
    for k in keys:
        if prefix + k in results:
            series[k] = np.asarray(results[prefix + k])
    return series


def plot_metric_along_paths(series: Sequence[Mapping], path, keys: Sequence[str] = ("tr_loss", "te_loss"),
                            panel_titles: Sequence[str] = ("train", "test"), ylabel: str = "loss",
                            title: str | None = None, logy: bool = False) -> None:
    """One panel per key in `keys`; in each, every series as a line against t.

    Each series is a dict: label, ts, one array per key (missing or None: not drawn in that panel),
    and optionally linestyle ("-" by default, e.g. "--" for a segment) and color.
    """
    from matplotlib.figure import Figure

    if not series:
        raise ValueError("nothing to plot: no series")
    fig = Figure(figsize=(5.2 * len(keys), 4.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key, panel in zip(axes, keys, panel_titles):
        for s in series:
            values = s.get(key)
            if values is None:
                continue
            ax.plot(np.asarray(s["ts"]), np.asarray(values), linestyle=s.get("linestyle") or "-",
                    color=s.get("color"), label=s.get("label"), linewidth=1.6)
        ax.set_xlabel("t")
        ax.set_ylabel(f"{panel} {ylabel}")
        ax.set_title(panel)
        ax.set_xlim(0, 1)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize="small")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_loss_along_paths(series: Sequence[Mapping], path, title: str | None = None, ylabel: str = "loss",
                          logy: bool = False) -> None:
    """Train and test loss against t (two panels), like Fig. 2 of Garipov et al. (2018).

    `series`: dicts with label, ts, tr_loss, te_loss, and optionally linestyle and color; e.g. three
    curves (solid) and the segments between the same endpoints (dashed, same colour).
    """
    plot_metric_along_paths(series, path, ("tr_loss", "te_loss"), ("train", "test"), ylabel, title, logy)


def _as_rgb_float(images: torch.Tensor) -> torch.Tensor:
    images = images.detach().cpu()
    images = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0, 1)


@functools.cache
def label_font():
    """The grids' label font: a TrueType font at LABEL_FONT_SIZE px, or Pillow's default where none is found."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont(LABEL_FONT, fallback_to_default=False), LABEL_FONT_SIZE)
    except (ImportError, OSError, ValueError):  # no matplotlib, no such font, or a file FreeType cannot read
        return ImageFont.load_default()


def _text_width(text: str) -> int:
    left, _, right, _ = label_font().getbbox(text)
    return math.ceil(right - left)


def _cell_pixels(cells: torch.Tensor, ncols: int, scale: int) -> np.ndarray:
    """Images [K, C, H, W] (row-major) as one uint8 array [rows, cols] of cells upscaled by `scale` (nearest),
    PADDING white pixels around each cell."""
    from torchvision.utils import make_grid

    cells = _as_rgb_float(cells).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(cells, nrow=ncols, padding=PADDING, pad_value=1.0)
    # the same float -> uint8 rounding as torchvision's save_image
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def grid_geometry(num_rows: int, num_cols: int, image_size: int, title: bool = False) -> dict:
    """Pixel layout of reconstruction_grid: cell side, upscale factor, header height, image width/height."""
    scale = max(1, math.ceil(MIN_CELL / image_size))
    cell = image_size * scale
    header = LINE_HEIGHT * (2 if title else 1)
    return {"scale": scale, "cell": cell, "header": header, "padding": PADDING,
            "width": num_cols * (cell + PADDING) + PADDING,
            "height": header + num_rows * (cell + PADDING) + PADDING}


def reconstruction_grid(originals: torch.Tensor, columns: Sequence[tuple[str, torch.Tensor]],
                        title: str | None = None, first_label: str = "original"):
    """A PIL image: one row per image; the originals in the first column, then one column per entry of
    `columns` ((label, reconstructions [N, C, H, W]) pairs, e.g. one per t), each labelled in a header row.

    Images are floats in [0, 1] or uint8; grayscale is shown as RGB. Pixels are upscaled by an integer
    factor (nearest neighbour), so each cell holds the exact pixels of its image.
    """
    from PIL import Image, ImageDraw

    n, _, size, _ = originals.shape
    blocks = [_as_rgb_float(originals)] + [_as_rgb_float(r) for _, r in columns]
    labels = [first_label] + [label for label, _ in columns]
    geo = grid_geometry(n, len(blocks), size, bool(title))
    cells = torch.stack(blocks, 1).flatten(0, 1)  # row-major: image i, then its columns

    canvas = Image.new("RGB", (geo["width"], geo["height"]), "white")
    canvas.paste(Image.fromarray(_cell_pixels(cells, len(blocks), geo["scale"])), (0, geo["header"]))
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    if title:
        draw.text((PADDING + 2, 2), title, fill="black", font=font)
    y = geo["header"] - LINE_HEIGHT + 2
    for j, label in enumerate(labels):
        x = PADDING + j * (geo["cell"] + PADDING) + (geo["cell"] - _text_width(label)) / 2
        draw.text((max(0, x), y), label, fill="black", font=font)
    return canvas


def save_reconstruction_grid(originals: torch.Tensor, columns: Sequence[tuple[str, torch.Tensor]], path,
                             title: str | None = None, first_label: str = "original") -> dict:
    """Writes reconstruction_grid(...) as a PNG, atomically; returns its grid_geometry."""
    image = reconstruction_grid(originals, columns, title, first_label)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return grid_geometry(originals.shape[0], len(columns) + 1, originals.shape[-1], bool(title))


def rows_geometry(num_rows: int, num_cols: int, image_size: int, labels: Sequence[str],
                  title: str | None = None) -> dict:
    """Pixel layout of labelled_rows: grid_geometry's cells right of a label column `left` pixels wide, under a
    title line; wide enough for the title."""
    geo = grid_geometry(num_rows, num_cols, image_size)
    left = max(_text_width(label) for label in labels) + 2 * TEXT_MARGIN
    header = LINE_HEIGHT if title else 0
    width = max(left + geo["width"], _text_width(title) + 2 * TEXT_MARGIN if title else 0)
    return {**geo, "header": header, "left": left, "width": width,
            "height": header + num_rows * (geo["cell"] + PADDING) + PADDING}


def labelled_rows(rows: Sequence[tuple[str, torch.Tensor]], title: str | None = None):
    """A PIL image: one row of images per entry of `rows` ((label, images [N, C, H, W]) pairs, e.g. held-out
    images and their reconstructions), the label left of its row, cells upscaled like reconstruction_grid's."""
    from PIL import Image, ImageDraw

    labels = [label for label, _ in rows]
    n, _, size, _ = rows[0][1].shape
    geo = rows_geometry(len(rows), n, size, labels, title)
    cells = torch.cat([_as_rgb_float(images) for _, images in rows])

    canvas = Image.new("RGB", (geo["width"], geo["height"]), "white")
    canvas.paste(Image.fromarray(_cell_pixels(cells, n, geo["scale"])), (geo["left"], geo["header"]))
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    if title:
        draw.text((TEXT_MARGIN, 2), title, fill="black", font=font)
    for i, label in enumerate(labels):
        _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
        middle = geo["header"] + PADDING + i * (geo["cell"] + PADDING) + geo["cell"] / 2
        draw.text((TEXT_MARGIN, middle - (top + bottom) / 2), label, fill="black", font=font)
    return canvas


def save_labelled_rows(rows: Sequence[tuple[str, torch.Tensor]], path, title: str | None = None) -> dict:
    """Writes labelled_rows(...) as a PNG, atomically; returns its rows_geometry."""
    image = labelled_rows(rows, title)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    n, _, size, _ = rows[0][1].shape
    return rows_geometry(len(rows), n, size, [label for label, _ in rows], title)


def plot_plane(grid: np.ndarray, panels: Mapping[str, np.ndarray], path, points: Sequence[Mapping] = (),
               lines: Sequence[Mapping] = (), title: str | None = None, value_label: str = "loss",
               xlabel: str = "x", ylabel: str = "y", num_levels: int = 24) -> None:
    """Filled contours over a plane in weight space (Garipov et al., 2018, Fig. 1), one panel per entry of
    `panels` (title -> values [G, G] at grid [G, G, 2]), all on one logarithmic colour scale.

    `points`: dicts with label, xy and optionally marker (e.g. the endpoints and the middle bend); `lines`:
    dicts with xy [K, 2] and optionally linestyle (e.g. the curve, and the segment dashed; say which is which
    in the title). Equal axis scales, so distances on the figure are distances in weight space, unless the
    plane is more than MAX_PLANE_STRETCH times wider than high (or higher than wide): then y is stretched
    (or squeezed) to that ratio, and its label says by how much.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    values = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in panels.values()])
    shown = values[np.isfinite(values) & (values > 0)]
    if not len(shown):
        raise ValueError("nothing to plot: no positive finite value")
    lo, hi = float(shown.min()), float(shown.max())
    if hi <= lo * (1 + 1e-6):  # a flat plane: one band around its value
        lo, hi = lo / 1.001, hi * 1.001
    levels = np.geomspace(lo, hi, num_levels + 1)
    norm = LogNorm(lo, hi)
    x, y = grid[..., 0], grid[..., 1]
    ratio = float(np.ptp(y) / np.ptp(x))
    shown_ratio = float(np.clip(ratio, 1 / MAX_PLANE_STRETCH, MAX_PLANE_STRETCH))
    aspect = shown_ratio / ratio  # 1: equal scales
    if not math.isclose(aspect, 1.0):
        ylabel += f"\n(drawn {'stretched' if aspect > 1 else 'squeezed'} ×{max(aspect, 1 / aspect):.2g})"
    side = 5.5
    fig = Figure(figsize=(side * min(1, 1 / shown_ratio) * len(panels) + 1.4, side * min(1, shown_ratio) + 1.3),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    filled = None
    for ax, (name, v) in zip(axes, panels.items()):
        v = np.ma.masked_invalid(np.clip(np.asarray(v, dtype=np.float64), lo, hi))
        filled = ax.contourf(x, y, v, levels=levels, norm=norm, cmap="viridis")
        ax.contour(x, y, v, levels=levels[::4], norm=norm, colors="black", linewidths=0.4, alpha=0.35)
        for line in lines:
            xy = np.asarray(line["xy"])
            ax.plot(xy[:, 0], xy[:, 1], color="white", linestyle=line.get("linestyle", "-"), linewidth=1.8)
        for p in points:
            px, py = p["xy"]
            ax.plot(px, py, p.get("marker", "o"), color="white", markeredgecolor="black", markersize=8, zorder=3)
            ax.annotate(p["label"], (px, py), textcoords="offset points", xytext=(6, 6), color="white",
                        fontweight="bold", zorder=4)
        ax.set_aspect(aspect, adjustable="box")
        ax.set_xlim(x.min(), x.max())
        ax.set_ylim(y.min(), y.max())
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    bar = fig.colorbar(filled, ax=list(axes), label=value_label + " (log scale)")
    bar.ax.minorticks_off()
    bar.set_ticks(np.geomspace(lo, hi, 6))
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_bands_along_t(bands: Sequence[Mapping], path, ylabel: str = "loss", title: str | None = None) -> None:
    """One panel: each band's `mean` against t as a line and its range (`lo` to `hi`) shaded in the line's colour,
    e.g. each path kind's held-out loss averaged over pairs, with the range over pairs.

    Each band is a dict: label, ts, mean, lo, hi, and optionally linestyle and color.
    """
    from matplotlib.figure import Figure

    if not bands:
        raise ValueError("nothing to plot: no band")
    fig = Figure(figsize=(7.0, 3.9), layout="constrained")
    ax = fig.subplots()
    for band in bands:
        ts = np.asarray(band["ts"])
        line, = ax.plot(ts, np.asarray(band["mean"]), linestyle=band.get("linestyle") or "-", color=band.get("color"),
                        label=band["label"], linewidth=1.8)
        ax.fill_between(ts, np.asarray(band["lo"]), np.asarray(band["hi"]), color=line.get_color(), alpha=0.18,
                        linewidth=0)
    ax.set_xlabel("t")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    save_figure(fig, path)
