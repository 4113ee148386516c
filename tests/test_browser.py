"""The demo study's report.html in a real browser (headless Chromium through selenium: conftest.py's `browser`).

The path explorer is moved by the keyboard, by script and by the mouse, and what it shows is checked against the
files the evaluations wrote: the t against eval.json's ts, the numbers against its series, every image's pixels
against reconstructions.npz; the plane explorer against plane.npz. No console errors. With JavaScript off every
static figure and table of report.md is there, and no table runs off a 1400 px page. Nothing reaches the network:
the report is a file:// page. Without chromium, chromium-driver or selenium these tests skip, saying which.
"""

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_study import SMALL

from conftest import browser_missing, run_cli, start_chromium

# the demo study and the browser take over 20 s together on a 2-core machine
pytestmark = [pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())), pytest.mark.slow]

PATHS = ("segment", "curve", "aligned_segment", "aligned_curve")
METRICS = ("te_loss", "te_psnr", "te_ssim")
OUTSIDE_EXPLORERS = "!e.closest('.explorer, .plane-explorer')"

# Every <img> of a section (path or plane explorer) once decoded, drawn onto a canvas and read back: [class,
# data-path, data-index, width, height, RGBA bytes as base64], or the error's text.
READ_PIXELS = """
const [section, done] = arguments;
const imgs = Array.from(section.querySelectorAll('img'));
Promise.all(imgs.map(async img => {
  await img.decode();
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const g = canvas.getContext('2d');
  g.drawImage(img, 0, 0);
  const rgba = g.getImageData(0, 0, canvas.width, canvas.height).data;
  let s = '';
  for (const b of rgba) s += String.fromCharCode(b);
  return [img.className, img.dataset.path || '', Number(img.dataset.index), canvas.width, canvas.height, btoa(s)];
})).then(done, e => done(String(e)));
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The demo study (test_study.py's SMALL: aligned paths, on by default) with a 3x3 loss plane."""
    import torch

    flags = [str(a) for a in SMALL]
    flags[flags.index("--plane-grid") + 1] = "3"
    out = tmp_path_factory.mktemp("browser") / "study"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs on a shared 2-core machine: see test_study.py's _one_thread
    try:
        assert run_cli("study", *flags, "--out", out) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def page(browser, study):
    """The report freshly loaded (the explorers in their initial state), the console read empty before."""
    browser.get_log("browser")
    browser.get((study / "report.html").as_uri())
    return browser


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def explorer(driver):
    from selenium.webdriver.common.by import By

    sections = driver.find_elements(By.CSS_SELECTOR, "section.explorer")
    assert len(sections) == 1, "the demo study has one loss group with one pair: one path explorer"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", sections[0])
    return sections[0]


def stored_paths(study: Path, section) -> dict:
    """What each path P of the section's pair should show, from its evaluation folders: {P: (series, npz)}."""
    group, pair = section.get_attribute("data-group"), section.get_attribute("data-pair")
    a, b = re.findall(r"\d+", pair)  # "1-2" or "seed1-seed2"
    stored = {}
    for prefix, suffix in (("", ""), ("aligned_", "_aligned")):
        folder = study / "curves" / f"{group}_seed{a}-seed{b}{suffix}" / "eval"
        series = json.loads((folder / "eval.json").read_text())["series"]
        npz = np.load(folder / "reconstructions.npz")
        stored[prefix + "curve"] = ({m: series.get(m) for m in ("ts", *METRICS)}, npz, "curve")
        stored[prefix + "segment"] = ({m: series.get("segment_" + m) for m in ("ts", *METRICS)}, npz, "segment")
    return stored


def within_rounding(text: str, value) -> bool:
    """`text` shows `value` to 4 significant digits ("–" where there is no value)."""
    if value is None or not math.isfinite(value):
        return text in ("–", "-", "nan", "NaN")
    if value == 0:
        return float(text) == 0
    half_unit = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 3)
    return abs(float(text) - value) <= half_unit * (1 + 1e-9)


def read_pixels(driver, section) -> dict:
    """{(class, path, index): uint8 [H, W, 4]} of every image in the section, as the page draws it."""
    got = driver.execute_async_script(READ_PIXELS, section)
    assert isinstance(got, list), f"an image of the section did not decode: {got}"
    return {(cls, path, index): np.frombuffer(base64.b64decode(data), np.uint8).reshape(h, w, 4)
            for cls, path, index, w, h, data in got}


def same_pixels(shown: np.ndarray, stored: np.ndarray) -> bool:
    """The RGBA pixels the page drew equal a stored uint8 [C, H, W] image (grayscale: channel 0)."""
    channels = stored.shape[0]
    return shown.shape[:2] == stored.shape[1:] and np.array_equal(shown[..., :channels], stored.transpose(1, 2, 0))


def cursor_index(section) -> int:
    from selenium.webdriver.common.by import By

    return int(section.find_element(By.CSS_SELECTOR, "input.explorer-slider").get_attribute("value"))


def check_cursor(driver, section, stored: dict, k: int, pictured: int | None = None):
    """At cursor index k the explorer shows ts[k], each path's held-out numbers at k and its reconstructions at k
    (or at `pictured`, where the page embeds the pictures of another t: the nearest that has them)."""
    from selenium.webdriver.common.by import By

    ts = stored["curve"][0]["ts"]
    assert cursor_index(section) == k
    assert section.find_element(By.CSS_SELECTOR, "span.explorer-t").text == f"{ts[k]:.3f}"
    for path, (series, npz, _) in stored.items():
        assert series["ts"] == ts and np.allclose(npz["ts"], ts), path
        for metric in METRICS:
            cell = section.find_element(By.CSS_SELECTOR,
                                        f'td.explorer-value[data-path="{path}"][data-metric="{metric}"]')
            value = series[metric][k] if series[metric] is not None else None
            assert within_rounding(cell.text.strip(), value), (path, metric, k, cell.text, value)
    shown = read_pixels(driver, section)
    originals = stored["curve"][1]["images"]
    assert len(shown) == len(originals) * (1 + len(stored))
    for index, image in enumerate(originals):
        assert same_pixels(shown["explorer-original", "", index], image), ("original", index)
        for path, (_, npz, key) in stored.items():
            at = k if pictured is None else pictured
            assert same_pixels(shown["explorer-recon", path, index], npz[key][at, index]), (path, index, k)


def test_explorer_starts_at_t_one_half_with_every_path(page, study):
    from selenium.webdriver.common.by import By

    section = explorer(page)
    stored = stored_paths(study, section)
    ts = stored["curve"][0]["ts"]
    slider = section.find_element(By.CSS_SELECTOR, "input.explorer-slider")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", str(len(ts) - 1))
    shown = {td.get_attribute("data-path") for td in section.find_elements(By.CSS_SELECTOR, "td.explorer-value")}
    assert shown == set(PATHS)
    check_cursor(page, section, stored, int(np.argmin(np.abs(np.asarray(ts) - 0.5))))
    assert page.find_elements(By.CSS_SELECTOR, "section.plane-explorer")
    assert console_errors(page) == []


def test_slider_moves_by_arrow_keys_and_by_script(page, study):
    from selenium.webdriver.common.keys import Keys

    section = explorer(page)
    stored = stored_paths(study, section)
    slider = section.find_element("css selector", "input.explorer-slider")
    start = cursor_index(section)
    assert 0 < start < len(stored["curve"][0]["ts"]) - 1, "the demo's t = 0.5 is inside the path"
    slider.send_keys(Keys.ARROW_RIGHT)
    check_cursor(page, section, stored, start + 1)
    slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    check_cursor(page, section, stored, start - 1)
    for k in (0, len(stored["curve"][0]["ts"]) - 1):
        page.execute_script("arguments[0].value = arguments[1];"
                            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))", slider, k)
        check_cursor(page, section, stored, k)
    assert console_errors(page) == []


def test_hover_and_click_on_the_plot_move_the_cursor(page, study):
    from selenium.webdriver.common.action_chains import ActionChains

    section = explorer(page)
    stored = stored_paths(study, section)
    last = len(stored["curve"][0]["ts"]) - 1
    plot = section.find_element("css selector", "svg.explorer-plot")
    width = plot.size["width"]
    seen = []
    for x in np.linspace(-width / 2 + 2, width / 2 - 2, 13):  # offsets from the plot's centre, left to right
        ActionChains(page).move_to_element_with_offset(plot, int(x), 0).perform()
        seen.append(cursor_index(section))
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == last, seen
    assert set(seen) == set(range(last + 1)), f"some t never reached by hovering: {seen}"
    ActionChains(page).move_to_element_with_offset(plot, int(width / 2) - 2, 0).click().perform()
    check_cursor(page, section, stored, last)
    ActionChains(page).move_to_element_with_offset(plot, -int(width / 2) + 2, 0).click().perform()
    check_cursor(page, section, stored, 0)
    assert console_errors(page) == []


def test_between_the_pictured_t_the_nearest_pictures_show_and_say_where(browser, study, tmp_path, monkeypatch):
    """Past explorer.PATH_PICTURES t per path the page embeds the pictures of some t only: at every other t it shows
    that t's numbers with the pictures of the nearest pictured t, and says which."""
    import shutil

    from aecurves import report
    from aecurves.report import explorer as explorer_module

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    monkeypatch.setattr(explorer_module, "PATH_PICTURES", 2)  # 5 t: pictures at 0, 2 (nearest 0.5) and 4
    report.write_report(copy)
    browser.get_log("browser")
    browser.get((copy / "report.html").as_uri())
    section = explorer(browser)
    stored = stored_paths(copy, section)
    ts = stored["curve"][0]["ts"]
    assert len(ts) == 5
    slider = section.find_element("css selector", "input.explorer-slider")
    note = section.find_element("css selector", "span.explorer-picture-t")
    for k, at in ((1, 0), (3, 2), (4, 4)):
        browser.execute_script("arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))", slider, k)
        check_cursor(browser, section, stored, k, pictured=at)
        assert note.text == ("" if at == k else f"(pictures at t = {ts[at]:.3f})"), (k, note.text)
    assert console_errors(browser) == []


def test_plane_explorer_picks_the_network_at_a_point(page, study):
    from selenium.webdriver.common.by import By

    section = page.find_element(By.CSS_SELECTOR, "section.plane-explorer")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", section)
    group = section.get_attribute("data-group")
    (folder,) = [p for p in (study / "curves").glob(f"{group}_*/plane") if (p / "plane.npz").is_file()]
    plane = np.load(folder / "plane.npz")
    grid = plane["recon"].shape[0]
    cells = section.find_elements(By.CSS_SELECTOR, "svg.plane-plot rect.plane-cell")
    assert len(cells) == grid * grid
    shown = []
    for i, j in ((0, 0), (grid - 1, grid - 1), (1, 2)):
        section.find_element(By.CSS_SELECTOR, f'rect.plane-cell[data-i="{i}"][data-j="{j}"]').click()
        point = section.find_element(By.CSS_SELECTOR, "span.plane-point").text
        loss = section.find_element(By.CSS_SELECTOR, "span.plane-loss").text
        assert within_rounding(re.findall(r"[-+0-9.e]+", loss)[0], plane["te_loss"][i, j]), (i, j, loss)
        pixels = read_pixels(page, section)
        recons = sorted(key for key in pixels if key[0] == "plane-recon")
        assert len(recons) == plane["recon"].shape[2]
        for key in recons:
            assert same_pixels(pixels[key], plane["recon"][i, j, key[2]]), (i, j, key)
        shown.append(point)
    assert len(set(shown)) == 3, f"three points picked, three coordinates shown: {shown}"
    assert console_errors(page) == []


def markdown_counts(study: Path) -> tuple[int, int]:
    """report.md's figures and tables (a table: its header's separator row)."""
    md = (study / "report.md").read_text()
    figures = len(re.findall(r"!\[[^\]]*\]\([^)]+\)", md))
    tables = len(re.findall(r"^\|(?:\s*:?-+:?\s*\|)+\s*$", md, re.M))
    return figures, tables


OVERFLOWING_TABLES = f"""
const page = document.documentElement.clientWidth;
const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX) && e.scrollWidth > e.clientWidth;
return Array.from(document.querySelectorAll('table')).filter(e => {OUTSIDE_EXPLORERS}).filter(table => {{
  if (table.getBoundingClientRect().right <= page) return false;
  for (let box = table.parentElement; box; box = box.parentElement)
    if (scrolls(box)) return box.getBoundingClientRect().right > page;
  return true;
}}).map(t => t.outerHTML.slice(0, 200));
"""


def test_without_javascript_every_static_figure_and_table_is_there_and_fits(study, tmp_path):
    from selenium.webdriver.common.by import By

    driver = start_chromium(javascript=False)
    try:
        probe = tmp_path / "probe.html"
        probe.write_text("<title>off</title><script>document.title = 'on'</script>")
        driver.get(probe.as_uri())
        assert driver.title == "off", "the second browser runs JavaScript: this test would check nothing"
        driver.get((study / "report.html").as_uri())
        for summary in driver.find_elements(By.CSS_SELECTOR, "details:not([open]) > summary"):
            summary.click()  # unfold every section, as a reader does (no script needed)
        figures, tables = markdown_counts(study)
        images = driver.execute_script(
            "return Array.from(document.images).filter(e => " + OUTSIDE_EXPLORERS + ")"
            ".filter(e => /^(data:image\\/|report_files\\/)/.test(e.getAttribute('src')))"
            ".map(e => [e.naturalWidth, e.getBoundingClientRect().width])")
        assert len(images) == figures and all(natural > 0 and shown > 0 for natural, shown in images), images
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).filter(e => " + OUTSIDE_EXPLORERS + ")"
            ".filter(e => e.getBoundingClientRect().height > 0).length")
        assert shown == tables
        assert driver.execute_script(OVERFLOWING_TABLES) == []
        driver.set_window_size(900, 1000)  # narrower than the widest tables: each must scroll in its box
        assert driver.execute_script(OVERFLOWING_TABLES) == []
        assert console_errors(driver) == []
    finally:
        driver.quit()
