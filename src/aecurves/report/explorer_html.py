"""The markup of report.html's explorers (document.Explorer, document.PlaneExplorer) and the one script that moves
them. The page is complete without the script: each explorer is written in its initial state (t nearest 0.5, the
plane's middle point), and the script only changes text, image sources and the cursor. Its data travel in a
<script type="application/json"> inside each explorer: no network, no server, works from file://.
"""

import html
import json

from .document import Explorer, PlaneExplorer

COLUMNS = (("te_loss", "held-out loss"), ("te_psnr", "PSNR (dB)"), ("te_ssim", "SSIM"))
IMAGE_WIDTH = 64  # CSS pixels per reconstruction (small images enlarged, pixelated)


def json_script(cls: str, data) -> str:
    """`data` as JSON in a script element that no string inside can close."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/").replace("<!--", "<\\!--")
    return f"<script type=\"application/json\" class=\"{cls}\">{text}</script>"


def _img(cls: str, src: str, index: int, path: str | None = None, alt: str = "") -> str:
    data_path = f" data-path=\"{path}\"" if path else ""
    return (f"<img class=\"{cls}\"{data_path} data-index=\"{index}\" src=\"{src}\" width=\"{IMAGE_WIDTH}\" "
            f"height=\"{IMAGE_WIDTH}\" alt=\"{html.escape(alt)}\">")


def explorer_html(e: Explorer) -> str:
    i = e.initial
    last = len(e.ts) - 1
    rows = []
    if e.originals:
        images = "".join(_img("explorer-original", src, k, alt=f"held-out image {k}") for k, src in
                         enumerate(e.originals))
        rows.append(f"<tr><td>held-out images</td>{'<td></td>' * len(COLUMNS)}<td class=\"explorer-images\">"
                    f"{images}</td></tr>")
    for name, p in e.paths.items():
        cells = "".join(f"<td class=\"explorer-value\" data-path=\"{name}\" data-metric=\"{m}\">"
                        f"{html.escape(p[m][i])}</td>" for m, _ in COLUMNS)
        images = "".join(_img("explorer-recon", src, k, name, f"{p['label']}: reconstruction of image {k}")
                         for k, src in enumerate(p["images"][i])) if p["images"] else \
            "<span class=\"muted\">not stored (evaluated before eval-curve wrote reconstructions.npz)</span>"
        rows.append(f"<tr><td><span class=\"swatch\" style=\"border-color:{p['color']}\"></span>"
                    f"{html.escape(p['label'])}</td>{cells}<td class=\"explorer-images\">{images}</td></tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    data = {"ts": e.ts, "ts_text": e.ts_text, "initial": i, "plot": e.plot, "picture": e.picture,
            "paths": {n: {k: p[k] for k in ("te_loss", "te_psnr", "te_ssim", "images")} for n, p in e.paths.items()}}
    return (f"<section class=\"explorer\" data-group=\"{html.escape(e.group)}\" data-pair=\"{html.escape(e.pair)}\">"
            f"<h4>Seeds {html.escape(e.pair.replace('-', ' and '))}</h4>"
            f"<div class=\"explorer-controls\"><label>t = <span class=\"explorer-t\">{e.ts_text[i]}</span> "
            f"<input type=\"range\" class=\"explorer-slider\" min=\"0\" max=\"{last}\" step=\"1\" value=\"{i}\" "
            f"aria-label=\"t along the paths, seeds {html.escape(e.pair)}\"></label> "
            "<span class=\"explorer-picture-t muted\"></span></div>"
            f"{_plot_svg(e)}"
            f"<div class=\"scroll\"><table class=\"explorer-table\"><thead><tr><th>path</th>{head}"
            f"<th>reconstructions at t</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f"{json_script('explorer-data', data)}</section>")


def _plot_svg(e: Explorer) -> str:
    """Each path's held-out loss against t, the legend right of the axes, and the cursor (a vertical line)."""
    g = e.plot
    left, top, w, h = g["left"], g["top"], g["plot_width"], g["plot_height"]
    values = [v for p in e.paths.values() for v in p["loss"] if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0

    def x(t):
        return left + t * w

    def y(v):
        return top + (1 - (v - lo) / (hi - lo)) * h

    parts = [f"<rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"#fff\" stroke=\"#bbb\"/>"]
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        parts.append(f"<text x=\"{left - 4}\" y=\"{y(v) + 4:.1f}\" text-anchor=\"end\">{v:.3g}</text>")
        parts.append(f"<text x=\"{x(frac):.1f}\" y=\"{top + h + 16}\" text-anchor=\"middle\">{frac:g}</text>")
    parts.append(f"<text x=\"{left + w / 2}\" y=\"{top + h + 30}\" text-anchor=\"middle\">t</text>")
    for k, (name, p) in enumerate(e.paths.items()):
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(e.ts, p["loss"]) if v is not None)
        dash = f" stroke-dasharray=\"{p['dash']}\"" if p["dash"] else ""
        parts.append(f"<polyline class=\"explorer-line\" data-path=\"{name}\" points=\"{points}\" fill=\"none\" "
                     f"stroke=\"{p['color']}\" stroke-width=\"1.8\"{dash}/>")
        ly = top + 14 + 18 * k
        parts.append(f"<line x1=\"{left + w + 16}\" x2=\"{left + w + 46}\" y1=\"{ly - 4}\" y2=\"{ly - 4}\" "
                     f"stroke=\"{p['color']}\" stroke-width=\"1.8\"{dash}/><text x=\"{left + w + 52}\" y=\"{ly}\">"
                     f"{html.escape(p['label'])}</text>")
    cx = x(e.ts[e.initial])
    parts.append(f"<line class=\"explorer-cursor\" x1=\"{cx:.1f}\" x2=\"{cx:.1f}\" y1=\"{top}\" y2=\"{top + h}\" "
                 "stroke=\"#333\" stroke-width=\"1\"/>")
    parts.append(f"<text x=\"{left + w + 16}\" y=\"{top + h}\">held-out loss against t</text>")
    return (f"<svg class=\"explorer-plot\" viewBox=\"0 0 {g['width']} {g['height']}\" role=\"img\" "
            f"aria-label=\"held-out loss along t of each path; point to move the cursor\">{''.join(parts)}</svg>")


def plane_explorer_html(e: PlaneExplorer) -> str:
    n, cell = e.size, 14
    i0, j0 = e.initial
    rects = "".join(f"<rect class=\"plane-cell{' picked' if (i, j) == (i0, j0) else ''}\" data-i=\"{i}\" "
                    f"data-j=\"{j}\" x=\"{i * cell}\" y=\"{(n - 1 - j) * cell}\" width=\"{cell}\" height=\"{cell}\" "
                    f"fill=\"{e.colors[i][j]}\"><title>{e.points[i][j]}: {e.loss[i][j]}</title></rect>"
                    for i in range(n) for j in range(n))
    marks = "".join(f"<circle cx=\"{(x + 0.5) * cell:.1f}\" cy=\"{(n - 0.5 - y) * cell:.1f}\" r=\"4\" fill=\"#fff\" "
                    "stroke=\"#000\" pointer-events=\"none\"/>" for x, y in e.bends)
    images = "".join(_img("plane-recon", src, k, alt=f"reconstruction of image {k} at the picked point")
                     for k, src in enumerate(e.images[i0][j0])) if e.images else \
        "<span class=\"muted\">not stored (plane.npz written before it held reconstructions)</span>"
    originals = "".join(_img("plane-original", src, k, alt=f"held-out image {k}") for k, src in
                        enumerate(e.originals))
    data = {"size": n, "points": e.points, "loss": e.loss, "images": e.images, "initial": list(e.initial),
            "picture": e.picture}
    return (f"<section class=\"plane-explorer\" data-group=\"{html.escape(e.group)}\">"
            f"<h4>The loss plane of seeds {html.escape(e.seeds.replace('-', ' and '))}</h4>"
            f"<div class=\"plane-layout\"><svg class=\"plane-plot\" viewBox=\"0 0 {n * cell} {n * cell}\" "
            f"width=\"{n * cell * 2}\" role=\"img\" aria-label=\"held-out loss over the plane; point to pick a "
            "network\">"
            f"{rects}{marks}</svg><div><p>point <span class=\"plane-point\">{e.points[i0][j0]}</span>, held-out "
            f"loss <span class=\"plane-loss\">{e.loss[i0][j0]}</span> <span class=\"plane-picture muted\"></span></p>"
            f"<p class=\"explorer-images\">{originals}</p><p class=\"explorer-images\">{images}</p>"
            "<p class=\"muted\">Top: held-out images; below: their reconstructions by the network at the picked point "
            "(colour: held-out loss, log scale, dark low; circles: the three points).</p></div></div>"
            f"{json_script('plane-data', data)}</section>")


# Moves every explorer; written once, at the end of the page. Plain ES5 over the DOM: no library, no network.
SCRIPT = """<script>
(function () {
  "use strict";
  function each(list, f) { Array.prototype.forEach.call(list, f); }
  each(document.querySelectorAll("section.explorer"), function (sec) {
    var data = JSON.parse(sec.querySelector("script.explorer-data").textContent);
    var slider = sec.querySelector("input.explorer-slider");
    var shownT = sec.querySelector(".explorer-t");
    var svg = sec.querySelector("svg.explorer-plot");
    var cursor = svg.querySelector(".explorer-cursor");
    var pictureT = sec.querySelector(".explorer-picture-t");
    function show(i) {
      i = Math.max(0, Math.min(data.ts.length - 1, i));
      slider.value = String(i);
      shownT.textContent = data.ts_text[i];
      var x = data.plot.left + data.ts[i] * data.plot.plot_width;
      cursor.setAttribute("x1", x.toFixed(1));
      cursor.setAttribute("x2", x.toFixed(1));
      var k = data.picture[i];  // pictures are embedded at some t only: the nearest of them
      pictureT.textContent = k === i ? "" : "(pictures at t = " + data.ts_text[k] + ")";
      Object.keys(data.paths).forEach(function (name) {
        var p = data.paths[name];
        each(sec.querySelectorAll('td.explorer-value[data-path="' + name + '"]'), function (td) {
          td.textContent = p[td.getAttribute("data-metric")][i];
        });
        if (p.images.length) {
          each(sec.querySelectorAll('img.explorer-recon[data-path="' + name + '"]'), function (img) {
            img.src = p.images[data.picture[i]][Number(img.getAttribute("data-index"))];
          });
        }
      });
    }
    function fromPointer(ev) {
      var box = svg.getBoundingClientRect();
      if (!box.width) { return; }
      var x = (ev.clientX - box.left) / box.width * data.plot.width;
      var t = (x - data.plot.left) / data.plot.plot_width, best = 0;
      data.ts.forEach(function (u, k) { if (Math.abs(u - t) < Math.abs(data.ts[best] - t)) { best = k; } });
      show(best);
    }
    slider.addEventListener("input", function () { show(Number(slider.value)); });
    svg.addEventListener("mousemove", fromPointer);
    svg.addEventListener("click", fromPointer);
    show(Number(slider.value));
  });
  each(document.querySelectorAll("section.plane-explorer"), function (sec) {
    var data = JSON.parse(sec.querySelector("script.plane-data").textContent);
    function pick(cell) {
      var i = Number(cell.getAttribute("data-i")), j = Number(cell.getAttribute("data-j"));
      each(sec.querySelectorAll("rect.plane-cell.picked"), function (r) { r.classList.remove("picked"); });
      cell.classList.add("picked");
      sec.querySelector(".plane-point").textContent = data.points[i][j];
      sec.querySelector(".plane-loss").textContent = data.loss[i][j];
      var pi = data.picture[i], pj = data.picture[j];  // pictures at the nodes of some grid lines only
      sec.querySelector(".plane-picture").textContent =
        pi === i && pj === j ? "" : "(pictures at the nearest pictured point " + data.points[pi][pj] + ")";
      if (data.images.length) {
        each(sec.querySelectorAll("img.plane-recon"), function (img) {
          img.src = data.images[data.picture[i]][data.picture[j]][Number(img.getAttribute("data-index"))];
        });
      }
    }
    each(sec.querySelectorAll("rect.plane-cell"), function (cell) {
      cell.addEventListener("click", function () { pick(cell); });
      cell.addEventListener("mouseover", function () { pick(cell); });
    });
  });
})();
</script>"""
