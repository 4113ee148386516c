"""The explorers of report.html: per pair, a cursor over t (a slider, the arrow keys, or the pointer over the loss
figure) showing each path's held-out loss, PSNR and SSIM and the reconstructions of the same held-out images at that
t; per group, the loss plane's grid, whose points pick a network and show its reconstructions.

Made from the evaluations' files alone: eval.json's series (the numbers, preformatted here so that the page shows
the strings Python wrote), eval-curve's reconstructions.npz and plane.npz's recon (the pixels, as PNG data URIs).
The blocks are laid out like any other (document.Explorer, document.PlaneExplorer); render.py writes their markup
and the one script that moves them. report.md has none: it keeps the static strips.
"""

import base64
import io
import math

import numpy as np

from .document import Explorer, PlaneExplorer
from .model import Pair, Plane

METRICS = ("te_loss", "te_psnr", "te_ssim")
MISSING = "–"  # a value not measured (SSIM of images smaller than its window, eval.json written before SSIM)
# (path, which evaluation, prefix in its series, key in its reconstructions.npz, label, SVG dash, colour): the
# first figure's kinds (figures.KINDS), in its colours (matplotlib's C3, C1, C0, C2)
PATHS = (("segment", "naive", "segment_", "segment", "straight segment", "6 4", "#d62728"),
         ("curve", "naive", "", "curve", "curve", "", "#1f77b4"),
         ("aligned_segment", "aligned", "segment_", "segment", "aligned segment", "2 3", "#ff7f0e"),
         ("aligned_curve", "aligned", "", "curve", "aligned curve", "8 3 2 3", "#2ca02c"))
# report.html embeds the reconstructions of at most this many t per path, spread evenly (and the t nearest 0.5),
# and of the nodes on at most this many grid lines per axis of a plane: the numbers are there at every t and node,
# the pictures at the nearest pictured one (report.html's size: docs/performance.md)
PATH_PICTURES = 21
PLANE_PICTURES = 11
# the loss figure's geometry, in SVG units: the plot area, and the legend right of it (never over the lines)
PLOT = {"width": 640, "height": 220, "left": 56, "top": 12, "plot_width": 400, "plot_height": 170}


def fvalue(v) -> str:
    """A value as the explorer shows it: 4 significant digits, "–" when not measured."""
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return MISSING
    return f"{v:.4g}"


def png_uri(pixels: np.ndarray) -> str:
    """uint8 pixels [C, H, W] (C = 1 or 3) as a PNG data URI."""
    from PIL import Image

    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pictured(n: int, limit: int, *keep: int) -> list[int]:
    """For each of `n` indices, the index whose pictures show there: at most `limit` indices spread evenly over
    0 ... n - 1, and those in `keep`, have pictures; every other shows the nearest of them (the lower on a tie)."""
    chosen = sorted({*np.linspace(0, n - 1, min(n, limit)).round().astype(int).tolist(), *keep})
    return [min(chosen, key=lambda c: (abs(c - k), c)) for k in range(n)]


def nearest(ts, t: float = 0.5) -> int:
    return int(np.argmin(np.abs(np.asarray(ts, dtype=float) - t)))


def pair_explorer(loss: str, p: Pair) -> Explorer | None:
    """The explorer of pair `p`, or None when its evaluation has no series (written before eval.json held them)."""
    sources = {"naive": (p.series, p.recons), "aligned": (p.aligned_series, p.aligned_recons)}
    ts = _ts(p.series)
    if ts is None:
        return None
    paths, originals = {}, None
    picture = pictured(len(ts), PATH_PICTURES, nearest(ts))
    for name, which, prefix, key, label, dash, color in PATHS:
        series, recons = sources[which]
        if not series or _ts(series, prefix) != ts or not isinstance(series.get(prefix + "te_loss"), list):
            continue
        values = {m: [fvalue(v) for v in series.get(prefix + m) or [None] * len(ts)] for m in METRICS}
        frames = _frames(recons, key, ts)
        if frames is not None and originals is None:
            originals = [png_uri(image) for image in recons["images"]]
        paths[name] = {"label": label, "dash": dash, "color": color, "loss": series[prefix + "te_loss"],
                       **values, "images": [] if frames is None else
                       [[png_uri(x) for x in f] if picture[k] == k else None for k, f in enumerate(frames)]}
    if not paths:
        return None
    return Explorer(group=loss, pair=f"{p.seeds[0]}-{p.seeds[1]}", ts=ts, ts_text=[f"{t:.3f}" for t in ts],
                    paths=paths, originals=originals or [], initial=nearest(ts), plot=dict(PLOT), picture=picture)


def _ts(series, prefix: str = "") -> list | None:
    ts = (series or {}).get(prefix + "ts")
    return [float(t) for t in ts] if isinstance(ts, list) and ts else None


def _frames(recons: dict | None, key: str, ts: list):
    """The reconstructions [T, N, C, H, W] of reconstructions.npz's path `key` when it was taken at the same t as
    the series (else None: the explorer shows the numbers only)."""
    if not recons or key not in recons or len(recons["ts"]) != len(ts) \
            or not np.allclose(recons["ts"], ts, rtol=0, atol=1e-9):
        return None
    return recons[key]


def plane_explorer(loss: str, plane: Plane) -> PlaneExplorer | None:
    """The loss plane's explorer: every grid node's held-out loss and, when plane.npz has them, its
    reconstructions."""
    arrays = plane.arrays
    if not arrays:
        return None
    grid, te_loss = arrays["grid"], arrays["te_loss"]
    size = grid.shape[0]
    recon = arrays.get("recon")
    bends = arrays.get("bend_coordinates")
    start = (size // 2, size // 2) if bends is None else _nearest_node(grid, bends[1])
    picture = pictured(size, PLANE_PICTURES, *start)  # the same lines on both axes, the start's among them
    images = [[[png_uri(x) for x in recon[i, j]] if picture[i] == i and picture[j] == j else None
               for j in range(size)] for i in range(size)] if recon is not None else []
    originals = [png_uri(x) for x in arrays["recon_images"]] if recon is not None else []
    return PlaneExplorer(group=loss, seeds=f"{plane.seeds[0]}-{plane.seeds[1]}", size=size,
                         points=[[f"({x:.3f}, {y:.3f})" for x, y in row] for row in grid],
                         loss=[[fvalue(float(v)) for v in row] for row in te_loss],
                         colors=_colors(te_loss), images=images, originals=originals, initial=start,
                         bends=_bend_cells(grid, bends), picture=picture)


def _nearest_node(grid: np.ndarray, xy) -> tuple[int, int]:
    d = ((grid - np.asarray(xy)) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(i), int(j)


def _bend_cells(grid: np.ndarray, bends) -> list:
    """The three points, in cells of the grid (fractional): where the figure marks them."""
    if bends is None:
        return []
    xs, ys = grid[:, 0, 0], grid[0, :, 1]
    return [[float(np.interp(x, xs, np.arange(len(xs)))), float(np.interp(y, ys, np.arange(len(ys))))]
            for x, y in bends]


# viridis at 5 stops: the loss on a log scale, low dark, high light
STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _colors(values: np.ndarray) -> list:
    v = np.log(np.maximum(np.asarray(values, dtype=float), 1e-12))
    finite = v[np.isfinite(v)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    frac = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    out = []
    for row in frac:
        cells = []
        for f in row:
            k = min(int(f * (len(STOPS) - 1)), len(STOPS) - 2) if np.isfinite(f) else 0
            w = f * (len(STOPS) - 1) - k if np.isfinite(f) else 0.0
            rgb = [round(a + (b - a) * w) for a, b in zip(STOPS[k], STOPS[k + 1])]
            cells.append("#" + "".join(f"{c:02x}" for c in rgb))
        out.append(cells)
    return out
