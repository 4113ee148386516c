"""Tests for aecurves.plots: loss-along-path figures and reconstruction grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from aecurves import plots

# matplotlib's default colour cycle: C0, C1, C2
COLOURS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E), "C2": (0x2C, 0xA0, 0x2C)}


def _has_colour(pixels: np.ndarray, rgb, tol=12) -> int:
    return int((np.abs(pixels[..., :3].astype(int) - np.array(rgb)).max(-1) <= tol).sum())


def _series(k, dashed=False, **extra):
    ts = np.linspace(0, 1, 11)
    bump = 0.5 if dashed else 0.1
    return {"label": f"{'segment' if dashed else 'curve'} {k}", "ts": ts, "tr_loss": 1 + k + bump * np.sin(np.pi * ts),
            "te_loss": 1.2 + k + bump * np.sin(np.pi * ts), "linestyle": "--" if dashed else "-",
            "color": f"C{k}", **extra}


def test_loss_plot_with_three_curves_and_their_segments(tmp_path):
    path = tmp_path / "fig" / "loss.png"
    series = [_series(k) for k in range(3)] + [_series(k, dashed=True) for k in range(3)]
    plots.plot_loss_along_paths(series, path, title="MSE: 3 curves and their segments", ylabel="MSE")
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert 600 <= width <= 3000 and 300 <= height <= 2000 and width > height  # two panels side by side
    for name, rgb in COLOURS.items():  # every series' colour was drawn, in both panels
        left, right = pixels[:, : width // 2], pixels[:, width // 2:]
        assert _has_colour(left, rgb) > 50 and _has_colour(right, rgb) > 50, name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_loss_plot_draws_only_what_it_is_given(tmp_path):
    # one series without test values: the right (test) panel has no C1 line
    path = tmp_path / "loss.png"
    plots.plot_loss_along_paths([_series(0), _series(1, te_loss=None)], path)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    width = pixels.shape[1]
    assert _has_colour(pixels[:, : width // 2], COLOURS["C1"]) > 50
    assert _has_colour(pixels[:, width // 2:], COLOURS["C1"]) == 0
    assert _has_colour(pixels[:, width // 2:], COLOURS["C0"]) > 50


def test_failed_plot_leaves_existing_file(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        plots.plot_loss_along_paths([], path)
    bad = _series(0)
    bad["te_loss"] = bad["te_loss"][:-1]  # 11 t values, 10 losses
    with pytest.raises(ValueError):
        plots.plot_loss_along_paths([bad], path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_series_from_results():
    results = {"ts": np.array([0, 1.0]), "tr_loss": np.array([1, 2.0]), "te_loss": np.array([3, 4.0]),
               "segment_ts": np.array([0, 1.0]), "segment_tr_loss": np.array([5, 6.0]),
               "segment_te_loss": np.array([7, 8.0])}
    s = plots.series_from_results(results, "seg", prefix="segment_", linestyle="--", color="C2")
    assert s["label"] == "seg" and s["linestyle"] == "--" and s["color"] == "C2"
    assert s["tr_loss"].tolist() == [5, 6] and s["te_loss"].tolist() == [7, 8]
    c = plots.series_from_results(results, "curve")
    assert c["te_loss"].tolist() == [3, 4] and c["linestyle"] == "-"


@pytest.mark.parametrize("channels, size", [(3, 20), (1, 32), (3, 64)])
def test_reconstruction_grid_layout_and_pixels(tmp_path, channels, size):
    g = torch.Generator().manual_seed(0)
    originals = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8, generator=g)
    columns = [(f"t={t:g}", torch.rand(2, channels, size, size, generator=g)) for t in np.linspace(0, 1, 9)]
    path = tmp_path / "grid.png"
    geo = plots.save_reconstruction_grid(originals, columns, path, title="a title")
    assert geo["cell"] >= plots.MIN_CELL and geo["cell"] == size * geo["scale"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (geo["width"], geo["height"])
        pixels = np.asarray(im.convert("RGB"))
    assert geo["width"] == 10 * (geo["cell"] + 2) + 2 and geo["height"] == geo["header"] + 2 * (geo["cell"] + 2) + 2
    step = geo["cell"] + geo["padding"]

    def cell(row, col):
        top, left = geo["header"] + geo["padding"] + row * step, geo["padding"] + col * step
        block = pixels[top: top + geo["cell"], left: left + geo["cell"]]
        # upscaled by nearest neighbour: every scale x scale block is one pixel
        assert np.array_equal(block, block[:: geo["scale"], :: geo["scale"]].repeat(geo["scale"], 0)
                              .repeat(geo["scale"], 1))
        return block[:: geo["scale"], :: geo["scale"]].transpose(2, 0, 1)

    for row in range(2):
        expected = originals[row].expand(3, -1, -1).numpy()
        assert np.array_equal(cell(row, 0), expected)
        for col, (_, rec) in enumerate(columns, 1):
            want = rec[row].mul(255).add(0.5).clamp(0, 255).to(torch.uint8).expand(3, -1, -1).numpy()
            assert np.array_equal(cell(row, col), want), (row, col)
    # a label above every column, the title above them
    label_band = pixels[geo["header"] - plots.LINE_HEIGHT: geo["header"]]
    for col in range(10):
        band = label_band[:, geo["padding"] + col * step: geo["padding"] + col * step + geo["cell"]]
        assert (band.min(-1) < 128).sum() > 5, col
    assert (pixels[: plots.LINE_HEIGHT].min(-1) < 128).sum() > 20


def test_reconstruction_grid_without_title():
    originals = torch.zeros(3, 3, 32, 32)
    image = plots.reconstruction_grid(originals, [("t=0", torch.ones(3, 3, 32, 32))])
    geo = plots.grid_geometry(3, 2, 32)
    assert image.size == (geo["width"], geo["height"]) and geo["header"] == plots.LINE_HEIGHT
