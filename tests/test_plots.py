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


def _ink_rows(pixels: np.ndarray) -> int:
    """Height in pixels of the dark (text) part of an RGB array."""
    rows = np.flatnonzero((pixels.min(-1) < 128).any(1))
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


def test_labels_are_truetype_and_taller_than_the_bitmap_default():
    from PIL import ImageDraw, ImageFont

    font = plots.label_font()
    assert isinstance(font, ImageFont.FreeTypeFont) and font.size == plots.LABEL_FONT_SIZE
    ascent, descent = font.getmetrics()
    assert ascent + descent <= plots.LINE_HEIGHT - 2  # a line of text fits its header line
    image = plots.reconstruction_grid(torch.ones(1, 3, 32, 32), [("t=0", torch.ones(1, 3, 32, 32))])
    geo = plots.grid_geometry(1, 2, 32)
    label = np.asarray(image)[: geo["header"], : geo["cell"] + geo["padding"]]  # "original", above column 0
    old = Image.new("RGB", (200, 40), "white")
    ImageDraw.Draw(old).text((2, 2), "original", fill="black", font=ImageFont.load_default())
    assert _ink_rows(label) >= 12 and _ink_rows(label) > _ink_rows(np.asarray(old)) * 1.2


def test_label_font_falls_back_to_the_default(monkeypatch):
    from matplotlib import font_manager
    from PIL import ImageFont

    def missing(*args, **kwargs):
        raise ValueError("Failed to find font")

    plots.label_font.cache_clear()
    monkeypatch.setattr(font_manager, "findfont", missing)
    try:
        assert plots.label_font().getbbox("t=0") == ImageFont.load_default().getbbox("t=0")
        image = plots.reconstruction_grid(torch.zeros(2, 1, 32, 32), [("t=0", torch.ones(2, 1, 32, 32))], title="x")
        geo = plots.grid_geometry(2, 2, 32, title=True)
        assert image.size == (geo["width"], geo["height"])
    finally:
        plots.label_font.cache_clear()


def test_labelled_rows_layout_and_pixels(tmp_path):
    g = torch.Generator().manual_seed(1)
    originals = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8, generator=g)
    recons = torch.rand(5, 1, 16, 16, generator=g)
    labels = ["original", "reconstruction"]
    geo = plots.save_labelled_rows(list(zip(labels, (originals, recons))), tmp_path / "rows.png", title="seed 1")
    with Image.open(tmp_path / "rows.png") as im:
        assert im.size == (geo["width"], geo["height"])
        pixels = np.asarray(im.convert("RGB"))
    assert geo["scale"] == 4 and geo["cell"] == 64 and geo["header"] == plots.LINE_HEIGHT
    assert geo["width"] == geo["left"] + 5 * (64 + 2) + 2 and geo["height"] == plots.LINE_HEIGHT + 2 * (64 + 2) + 2
    expected = [originals, recons.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)]
    for r in range(2):
        top = geo["header"] + 2 + r * 66
        for j in range(5):
            x = geo["left"] + 2 + j * 66
            block = pixels[top: top + 64, x: x + 64]
            want = expected[r][j].expand(3, -1, -1).permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1)
            assert np.array_equal(block, want), (r, j)
        label = pixels[top: top + 64, : geo["left"]]
        assert _ink_rows(label) >= 10, r  # its label, beside its row
    assert _ink_rows(pixels[: geo["header"]]) >= 10  # the title
    # the label column fits the longest label
    assert geo["left"] > plots._text_width("reconstruction") and (pixels[:, geo["left"] - 1].min(-1) < 128).sum() == 0


def test_labelled_rows_widen_for_a_long_title():
    rows = [("a", torch.zeros(1, 3, 64, 64))]
    title = "a title much wider than one cell and its label"
    image = plots.labelled_rows(rows, title=title)
    assert image.width == plots.rows_geometry(1, 1, 64, ["a"], title)["width"] > plots._text_width(title)
