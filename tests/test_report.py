"""Tests for aecurves.report: a report made from a study folder's files alone, numbers and conclusions."""

import base64
import errno
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from aecurves import files, plots, report
from aecurves.cli import main
from aecurves.errors import UserError
from aecurves.records import EvalRecord
from aecurves.report import conclusions, model
from aecurves.report import figures as report_figures
from aecurves.report.inputs import Inputs
from aecurves.report.model import Interval
from aecurves.stats import summarize


def _png(path: Path, size=(40, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _series(ts, loss_at_ends, bump, psnr0=20.0, loss_scale=1.0):
    """A path whose loss rises by `bump` above the chord in the middle; the loss is `loss_scale` × the MSE."""
    l0, l1 = loss_at_ends
    mse = (1 - ts) * l0 + ts * l1 + bump * np.sin(np.pi * ts) ** 2
    psnr = psnr0 - 10 * np.log10(mse / l0)
    return {"ts": ts, "dl": np.r_[0.0, np.full(len(ts) - 1, 0.5)], "tr_loss": mse * 0.9 * loss_scale,
            "te_loss": mse * loss_scale, "tr_mse": mse * 0.9, "te_mse": mse, "tr_psnr": psnr + 0.3, "te_psnr": psnr}


# endpoints' reconstructions.png as train.py writes it: make_grid of ENDPOINT_IMAGES held-out images over their
# reconstructions, ENDPOINT_SIZE pixels square, padding 2
ENDPOINT_IMAGES, ENDPOINT_SIZE = 4, 16


def _endpoint_png(path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, ENDPOINT_IMAGES, 3, ENDPOINT_SIZE, ENDPOINT_SIZE), generator=g,
                           dtype=torch.uint8)
    save_image(make_grid(images.flatten(0, 1).float() / 255, nrow=ENDPOINT_IMAGES, padding=2, pad_value=1.0), path)
    return images[0], images[1]


def _endpoint_pt(path: Path, originals: torch.Tensor, recons: torch.Tensor, **changes) -> None:
    """reconstructions.pt as train.py writes it beside reconstructions.png (`changes`: entries replaced)."""
    torch.save({"format": 1, "images": originals, "reconstructions": recons, **changes}, path)


ENDS = {1: 0.010, 2: 0.012, 3: 0.011}  # make_study's endpoints' held-out loss


def _write_eval(folder: Path, loss: str, ends, seg_bump, cur_bump, psnr=20.0, n_train=86, n_test=14, device="cpu"):
    """eval-curve's files for a curve and its segment between endpoints of held-out loss `ends`."""
    scale = 10.0 if loss == "vgg" else 1.0  # a perceptual loss is not the MSE
    ts = np.linspace(0, 1, 7)
    curve = _series(ts, ends, cur_bump, psnr, scale)
    segment = _series(ts, ends, seg_bump, psnr, scale)
    summary = {**summarize(curve), **{"segment_" + k: v for k, v in summarize(segment).items()}}
    results = {**curve, **{"segment_" + k: v for k, v in segment.items()}}
    folder.mkdir(parents=True)
    with open(folder / "curve.npz", "wb") as f:
        np.savez(f, **results, **summary)
    used = min(8192, n_train)
    (folder / "eval.json").write_text(json.dumps({
        "kind": "curve", "path": {"curve": "Bezier", "num_bends": 3}, "segment_evaluated": True,
        "num_points": 7, "notes": ["a note"], "loss": loss, "perceptual": loss == "vgg",
        "loss_description": "VGG perceptual loss" if loss == "vgg" else "mean squared error",
        "summary": summary, "series": {k: np.asarray(v).tolist() for k, v in results.items()},
        "device": device, "bn": {"recomputed": True, "images": used, "subset": "a subset"},
        "train_metric_images": used, "test_metric_images": n_test,
        "data": {"train_images": n_train, "test_images": n_test}, "config": {}, "files": {}}))
    _png(folder / "reconstructions.png", (120, 40))
    _png(folder / "reconstructions_segment.png", (120, 40))


def make_study(root: Path, bumps=((0.02, 0.001), (0.03, 0.002), (0.025, 0.0005)), vgg_skipped=True,
               losses=("mse",), n_train=86, n_test=14, psnr=20.0, device="cpu", precision="bf16",
               provenance=None, tensors=False) -> Path:
    """A study folder as `aecurves study` leaves it (a group per loss in `losses`, seeds 1-3; the vgg group skipped
    unless it is in `losses`), made by hand. The stages' files record what ran: eval-curve on `device` with
    n_train training / n_test held-out images, training in `precision`; the request was auto / 8192 images.
    `tensors`: the endpoints also hold reconstructions.pt (train.py since it writes one), else only the PNG."""
    seeds = [1, 2, 3]
    pairs = [(1, 2), (1, 3), (2, 3)]
    groups = {loss: {"status": "run", "seeds": seeds,
                     "endpoints": {str(s): f"endpoints/{loss}_seed{s}" for s in seeds},
                     "pairs": [{"seeds": [a, b], "curve": f"curves/{loss}_seed{a}-seed{b}",
                                "eval": f"curves/{loss}_seed{a}-seed{b}/eval"} for a, b in pairs]} for loss in losses}
    if vgg_skipped and "vgg" not in losses:
        groups["vgg"] = {"status": "skipped", "reason": "The VGG16 ImageNet weights for the perceptual loss are not "
                         "available (offline). Copy the file somewhere.", "remedy": "Re-run with --vgg-weights PATH."}
    config = {"preset": "demo", "dataset": "lfw", "image_size": 32, "losses": list(groups), "seeds": seeds,
              "curve": "Bezier", "num_bends": 3, "num_points": 7, "epochs": 30, "out": str(root),
              "bn_images": 8192, "train_images": 8192, "device": "auto", "precision": "auto"}
    root.mkdir(parents=True, exist_ok=True)
    study = {"config": config, "groups": groups, "stages": []}
    if provenance is not None:
        study["provenance"] = provenance
    (root / "study.json").write_text(json.dumps(study))
    for loss in losses:
        for s in seeds:
            folder = root / f"endpoints/{loss}_seed{s}"
            folder.mkdir(parents=True)
            rows = [{"epoch": e, "train_loss": 0.02, "test_loss": ENDS[s] + 0.001 * (30 - e), "test_mse": ENDS[s],
                     "test_psnr": 19.0, "precision": precision} for e in (29, 30)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            images, recons = _endpoint_png(folder / "reconstructions.png", s)
            if tensors:
                _endpoint_pt(folder / "reconstructions.pt", images, recons)
        for (a, b), (seg_bump, cur_bump) in zip(pairs, bumps):
            folder = root / f"curves/{loss}_seed{a}-seed{b}/eval"
            _write_eval(folder, loss, (ENDS[a], ENDS[b]), seg_bump, cur_bump, psnr, n_train, n_test, device)
            (folder.parent / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "precision": precision}) + "\n")
    return root


ALIGNED_BUMPS = ((0.004, 0.0002), (0.006, 0.0004), (0.005, 0.0001))  # the aligned segments' and curves' barriers


def add_alignment(root: Path) -> None:
    """B aligned to A for each pair of make_study's mse group, and the curve to it, evaluated as the study does."""
    study = json.loads((root / "study.json").read_text())
    study["config"]["align"] = True
    for pair, (seg_bump, cur_bump) in zip(study["groups"]["mse"]["pairs"], ALIGNED_BUMPS):
        a, b = pair["seeds"]
        pair.update(aligned_eval=f"curves/mse_seed{a}-seed{b}_aligned/eval",
                    aligned_endpoint=f"aligned/mse_seed{b}-to-seed{a}")
        _write_eval(root / pair["aligned_eval"], "mse", (ENDS[a], ENDS[b]), seg_bump, cur_bump)
        (root / pair["aligned_endpoint"]).mkdir(parents=True)
        (root / pair["aligned_endpoint"] / "study_stage.json").write_text(json.dumps(  # as study.py wrote it in 0.1
            {"stage": f"align mse seed {b} to {a}", "status": "done", "inputs": {}, "result": {"seconds": 2.5}}))
    (root / "study.json").write_text(json.dumps(study))


def _md_plain(text: str) -> str:
    """Markdown text as a reader sees it: backslash escapes and entities undone."""
    return html.unescape(re.sub(r"\\(.)", r"\1", text))


def _md_table(md: str, after: str) -> list[list[str]]:
    """The cells of the first markdown table after the text `after` (header row first), as a reader sees them."""
    lines = md[md.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])  # an escaped pipe is part of its cell
            rows.append([_md_plain(c.strip()) for c in cells])
    return rows


def _setting(md: str, name: str) -> str:
    return dict(_md_table(md, "### Configuration")[1:])[name]


def _codes(record: dict, loss: str = "mse") -> list[str]:
    return [c["code"] for c in record["groups"][loss]["conclusions"]]


def _conclusion(record: dict, *codes: str, loss: str = "mse") -> dict:
    return next(c for c in record["groups"][loss]["conclusions"] if c["code"] in codes)


def _section(md: str, heading: str) -> str:
    """The markdown under `heading` (a line of its own), up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    text = md[md.index(heading + "\n") + len(heading):]
    end = re.search(rf"^#{{1,{level}}} ", text, re.MULTILINE)
    return text[:end.start()] if end else text


def test_report_from_files_alone(tmp_path):
    root = make_study(tmp_path / "study")
    record = report.write_report(root)
    for name in ("report.html", "report.md", "report.json", "report_files/mse_loss_along_paths.png",
                 "report_files/mse_mean_loss_along_paths.png", "report_files/mse_seed1_reconstructions.png",
                 "report_files/mse_seed2-seed3_segment_reconstructions.png"):
        assert (root / name).is_file(), name
    saved = json.loads((root / "report.json").read_text())
    assert saved["inputs_fingerprint"] == record["inputs_fingerprint"] == report.inputs_fingerprint(root)
    assert saved["format_version"] == report.REPORT_VERSION == 5
    g = saved["groups"]["mse"]
    ev = EvalRecord.from_json(json.loads((root / "curves/mse_seed1-seed3/eval/eval.json").read_text()))
    ev = ev.flat_summary()
    p13 = g["pairs"][1]
    assert p13["seeds"] == [1, 3]
    assert p13["curve"]["te_barrier"] == ev["te_barrier"] and p13["segment"]["te_barrier"] == ev["segment_te_barrier"]
    assert p13["barrier_removed"] == pytest.approx(1 - ev["te_barrier"] / ev["segment_te_barrier"])
    assert p13["segment"]["te_barrier"] == pytest.approx(0.03)
    s = g["summary"]
    assert s["segment_te_barrier_mean"] == pytest.approx(0.025) and s["curve_te_barrier_mean"] == pytest.approx(
        (0.001 + 0.002 + 0.0005) / 3)
    # endpoint 3 first appears as the end of pair 1-3
    assert g["endpoints"][2]["eval"]["te_loss"] == ev["te_loss_end"]
    assert g["endpoints"][0]["training"]["test_loss"] == pytest.approx(0.010)
    assert g["endpoints"][0]["training"]["last_epoch_gain"] == pytest.approx(0.001 / 0.011)
    assert s["worst_psnr_endpoints"] == min(e["eval"]["te_psnr"] for e in g["endpoints"])
    # the conclusions: codes and the numbers they state, the answer first
    answer = g["conclusions"][0]
    assert answer["code"] == "barrier-removed"
    removed = [1 - c / sb for sb, c in ((0.02, 0.001), (0.03, 0.002), (0.025, 0.0005))]
    assert answer["numbers"]["segment_barrier"] == pytest.approx(0.025)
    assert answer["numbers"]["removed"] == pytest.approx(np.mean(removed))
    assert answer["numbers"]["removed_worst"] == pytest.approx(min(removed))
    assert _codes(saved, "vgg") == ["group-skipped"] and saved["groups"]["vgg"]["caveat"] is None

    md = (root / "report.md").read_text()
    assert f"| segment | {report.fnum(ev['segment_te_loss_max'])} | {report.fnum(ev['segment_te_barrier'])} |" in md
    skipped = _section(md, "## vgg group (VGG perceptual loss): SKIPPED")  # its reason and remedy, first
    assert "Copy the file somewhere." in skipped and "Re-run with --vgg-weights PATH." in skipped
    assert "![" in md and "(report_files/mse_loss_along_paths.png)" in md
    html = (root / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and "details>summary{" in html  # report.css
    assert html.count("data:image/png;base64,") == 2 + 3 + 6  # group figures, endpoints, strips
    assert 'src="report_files' not in html
    # the closing summary's lines are the conclusions; a skipped group's gives its reason's first sentence only (the
    # study prints the full reason and remedy just above them)
    short = [line for line in saved["summary_lines"] if line.startswith("The vgg group was skipped: ")]
    assert len(short) == 1 and "not available (offline)." in short[0] and "Copy the file" not in short[0]
    for line in set(saved["summary_lines"]) - set(short):
        assert report.md_text(line) in md
    assert sorted(set(saved["summary_lines"]) - set(short)) == sorted(
        c["text"] for loss in ("mse", "vgg") for c in saved["groups"][loss]["conclusions"]
        if c["code"] != "group-skipped")


def test_fingerprint_follows_the_input_files(tmp_path):
    root = make_study(tmp_path / "study")
    before = report.inputs_fingerprint(root)
    assert report.inputs_fingerprint(root) == before
    path = root / "curves/mse_seed1-seed2/eval/eval.json"
    path.write_text(path.read_text().replace('"a note"', '"another note"'))
    after = report.inputs_fingerprint(root)
    assert after != before
    images, recons = _endpoint_png(tmp_path / "again.png", 1)  # the endpoint's tensors are an input too
    _endpoint_pt(root / "endpoints/mse_seed1/reconstructions.pt", images, recons)
    assert report.inputs_fingerprint(root) != after


def test_report_of_an_unfinished_study(tmp_path):
    root = make_study(tmp_path / "study", vgg_skipped=False)
    (root / "curves/mse_seed2-seed3/eval/eval.json").unlink()
    record = report.write_report(root)
    g = record["groups"]["mse"]
    assert [p["available"] for p in g["pairs"]] == [True, True, False]
    assert g["summary"]["pairs_evaluated"] == 2
    assert "Not evaluated yet" in (root / "report.md").read_text()


def test_not_a_study_folder(tmp_path):
    with pytest.raises(UserError, match="study.json"):
        report.write_report(tmp_path)


def test_first_screen_answers_the_question(tmp_path):
    """Per loss group, before anything else: the answer in one sentence with its interval, one figure, and one
    table of the four paths; the details below, folded in HTML."""
    root = make_study(tmp_path / "study")
    add_alignment(root)
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    first = _section(md, "## mse group (MSE loss)")
    assert md.index("## mse group (MSE loss)") < md.index("## vgg group") < md.index("## Caveats") \
        < md.index("## mse group in detail") < md.index("## The study")
    answer = _conclusion(record, "barrier-removed")
    assert first.lstrip().startswith("> " + report.md_text(answer["text"]))
    seg = Interval.of([0.02, 0.03, 0.025])
    assert (answer["numbers"]["segment_barrier_lo"], answer["numbers"]["segment_barrier_hi"]) == pytest.approx(
        (seg.lo, seg.hi))
    assert f"[{report.fnum(seg.lo)}, {report.fnum(seg.hi)}]" in answer["text"]  # the sentence gives its interval
    assert first.count("![") == 1 and "(report_files/mse_mean_loss_along_paths.png)" in first
    table = _md_table(first, "| path |")
    assert [row[0] for row in table] == ["path", "straight segment", "aligned segment", "curve", "aligned curve"]
    paths = record["groups"]["mse"]["summary"]["paths"]
    for row, name in zip(table[1:], ("segment", "aligned_segment", "curve", "aligned_curve")):
        r = {k: Interval(**paths[name][k]) for k in ("barrier", "removed", "best_vs_endpoint")}
        assert row[1] == report.finterval(r["barrier"], report.fnum)
        assert row[2] == ("—" if name == "segment" else report.finterval(r["removed"], report.fpct))
        assert row[3] == report.finterval(r["best_vs_endpoint"], report.fsigned)
    aligned = Interval.of([(sb - ab) / sb for sb, (ab, _) in zip((0.02, 0.03, 0.025), ALIGNED_BUMPS)])
    assert paths["aligned_segment"]["removed"]["mean"] == pytest.approx(aligned.mean)
    assert "Straight segment, aligned segment, curve" not in first and "mse seed 1" not in first
    # HTML: the first screen is open, everything after the caveats folded
    html = (root / "report.html").read_text()
    top = html[:html.index("<h2>Caveats</h2>")]
    assert "<details" not in top and top.count("<img") == 1 and top.count("<table>") == 1
    rest = html[html.index("<h2>mse group in detail</h2>"):]
    assert rest.count("<details") == rest.count("</details>") >= 10
    assert re.search(r"<details><summary><h3>Endpoints</h3></summary>", rest)
    assert all(rest.rindex("<details", 0, m.start()) > rest.rfind("</details>", 0, m.start())
               for m in re.finditer("<img", rest))  # every other figure is inside a folded section
    # but for the explorers: open, to be used at once (and folded by a click)
    assert re.findall(r"<details open><summary><h3>([^<]*)</h3>", rest) == ["Look along the path"]
    assert "<section><h2>Caveats</h2>" in html  # in plain sight, not folded


def test_a_study_without_alignment_says_so_in_the_table(tmp_path):
    root = make_study(tmp_path / "study")
    _edit_json(root / "study.json", lambda s: s["config"].update(align=False))
    report.write_report(root)
    table = _md_table((root / "report.md").read_text(), "| path |")
    assert table[2][:3] == ["aligned segment", "not run (--no-align)", "—"]
    assert table[4][:2] == ["aligned curve", "not run (--no-align)"]


def test_the_report_is_laid_out_before_anything_is_written(tmp_path, monkeypatch):
    """collect, conclusions, the figure plan and the document have no side effect: the folder is as it was until
    the document is complete; then the figures, report.md, report.html and report.json are written."""
    root = make_study(tmp_path / "study")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    drawn = []
    for module, name in ((plots, "plot_bands_along_t"), (plots, "save_labelled_rows"),
                         (report_figures, "_plot_series")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, **kw: drawn.append(a) or _f(*a, **kw))
    built = report.build

    def build(*args, **kwargs):
        doc = built(*args, **kwargs)
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before and not drawn
        return doc

    monkeypatch.setattr(report, "build", build)
    report.write_report(root)
    assert len(drawn) == 2 + 3 and (root / "report.md").is_file()


def _group(seg, cur, psnr_curves=17.0, psnr_ends=17.2, ends_loss=0.02):
    """A run group whose pairs' segments and curves have the test barriers `seg` and `cur`, summarized as collect()
    summarizes one."""
    removed = [(s - c) / s for s, c in zip(seg, cur)]
    none = Interval.of([])  # no extra-trained endpoints
    paths = {"segment": {"barrier": Interval.of(seg), "removed": Interval.of([0.0] * len(seg)),
                         "best_vs_endpoint": none, "best_vs_extra": none},
             "curve": {"barrier": Interval.of(cur), "removed": Interval.of(removed), "best_vs_endpoint": none,
                       "best_vs_extra": none}}
    summary = model.GroupSummary(
        pairs=len(seg), pairs_evaluated=len(seg), pairs_damaged=0, endpoint_te_loss_mean=ends_loss,
        segment_te_barrier_mean=float(np.mean(seg)), segment_te_barrier_min=min(seg),
        segment_te_barrier_max=max(seg), curve_te_barrier_mean=float(np.mean(cur)), curve_te_barrier_min=min(cur),
        curve_te_barrier_max=max(cur), barrier_removed_mean=float(np.mean(removed)),
        barrier_removed_min=min(removed), worst_psnr_curves=psnr_curves, worst_psnr_endpoints=psnr_ends,
        worst_psnr_segments=13.0, segment_barrier_relative=float(np.mean(seg)) / ends_loss, paths=paths)
    return model.Group(status="run", loss="mse", summary=summary, equal_budget=model.EqualBudget(0, None),
                       convergence=report.convergence([], False, None))


@pytest.mark.parametrize("seg, cur, code", [
    ([0.02, 0.02], [0.001, 0.002], "barrier-removed"),
    ([0.02, 0.02], [0.0, 0.008], "barrier-mostly-removed"),
    ([0.02, 0.02], [0.01, 0.01], "barrier-reduced"),
    ([0.02, 0.02], [0.019, 0.018], "barrier-not-removed"),
    ([0.0005, 0.0005], [0.0, 0.0], "no-clear-barrier"),
])
def test_conclusions_follow_the_numbers(seg, cur, code):
    found = report.findings(_group(seg, cur))
    answer = found.answer
    assert answer.code == code
    removed = [(s - c) / s for s, c in zip(seg, cur)]
    assert answer.numbers["segment_barrier"] == pytest.approx(np.mean(seg))
    assert answer.numbers["curve_barrier"] == pytest.approx(np.mean(cur))
    assert answer.numbers["removed"] == pytest.approx(np.mean(removed))
    assert answer.numbers["removed_worst"] == pytest.approx(min(removed))
    assert answer.numbers["barrier_relative"] == pytest.approx(np.mean(seg) / 0.02)
    assert report.fnum(float(np.mean(seg))) in answer.text  # the sentence states the numbers it was chosen by
    ranges = found.find("barrier-ranges")
    assert ranges.numbers["segment_te_barrier_mean"] == pytest.approx(np.mean(seg))
    assert ranges.numbers["curve_te_barrier_max"] == max(cur)
    assert found.codes()[:2] == [code, "barrier-ranges"] and found.caveat is None


def test_psnr_conclusion_follows_the_numbers():
    def psnr(**kw):
        return report.findings(_group([0.02], [0.001], **kw)).find("psnr-as-good", "psnr-worse")

    good, bad = psnr(psnr_curves=17.0, psnr_ends=17.2), psnr(psnr_curves=15.0, psnr_ends=17.2)
    assert good.code == "psnr-as-good" and bad.code == "psnr-worse"
    assert bad.numbers == {"curves_db": 15.0, "endpoints_db": 17.2, "segments_db": 13.0, "tolerance_db": 0.5}
    assert "by up to 2.20 dB" in bad.text  # the gap it states
    # at the tolerance exactly, still as good
    assert psnr(psnr_curves=16.7, psnr_ends=17.2).code == "psnr-as-good"


def test_conclusions_say_which_path_kinds_have_intervals_too_wide_to_conclude():
    seg, cur = [0.02, 0.021, 0.019], [0.001, -0.002, 0.0015]
    g = _group(seg, cur)
    g.summary.bootstrap = {"segment": model.Bootstrap(pairs=3, above_zero=3),
                           "curve": model.Bootstrap(pairs=3, above_zero=1)}
    found = report.findings(g)
    r = Interval.of(cur)
    assert r.lo < 0 < r.hi  # the curves' barrier interval includes 0, the segments' does not
    intervals = found.find("interval-includes-zero")
    assert intervals.numbers["includes_zero"] == ["curve"]
    assert intervals.numbers["curve"] == {"mean": r.mean, "lo": r.lo, "hi": r.hi}
    assert f"curve {report.fnum(r.mean)} [{report.fnum(r.lo)}, {report.fnum(r.hi)}]" in intervals.text
    boot = found.find("bootstrap-some-include-zero")
    assert boot.numbers == {"segment": {"pairs": 3, "above_zero": 3}, "curve": {"pairs": 3, "above_zero": 1}}
    share = Interval.of([(s - c) / s for s, c in zip(seg, cur)])
    assert (found.answer.numbers["removed_lo"], found.answer.numbers["removed_hi"]) == (share.lo, share.hi)
    assert f"{report.fpct(share.mean)} [{report.fpct(share.lo)}, {report.fpct(share.hi)}]" in found.answer.text
    # every pair's bootstrap above 0: nothing to caution about
    g.summary.bootstrap["curve"].above_zero = 3
    assert "bootstrap-all-above-zero" in report.findings(g).codes()
    # every interval clear of 0
    g = _group(seg, [0.001, 0.0012, 0.0011])
    assert report.findings(g).find("intervals-exclude-zero").numbers["includes_zero"] == []


def test_report_states_the_schedules_the_protocol_and_convergence(tmp_path):
    root = make_study(tmp_path / "study")
    study = json.loads((root / "study.json").read_text())
    study["config"].update(lr=3e-3, lr_schedule="paper", curve_lr=1e-3, curve_lr_schedule="constant",
                           curve_epochs=5)
    (root / "study.json").write_text(json.dumps(study))
    for i, folder in enumerate(sorted((root / "curves").glob("*/eval"))):
        record = json.loads((folder / "eval.json").read_text())
        record.update(bn={"images": 500}, train_metric_images=500 if i else 400, data={"train_images": 500})
        (folder / "eval.json").write_text(json.dumps(record))
    report.write_report(root)
    md = (root / "report.md").read_text()
    assert "Adam at lr 0.003 with the paper schedule for 30 epochs" in md
    assert "curves: Adam at lr 0.001 with the constant schedule and uniform t for 5 epochs" in md
    assert "lowers it linearly to 1% of it at 90%" in md
    # one pair measured train metrics on 400 of 500 images: the report does not claim --full
    assert ("BatchNorm statistics from 500 and train metrics from 400 of the 500 training images (fixed subsets) at "
            "every point. These subsets are smaller than the defaults") in md
    assert "last-epoch gain" in md and report.fpct(0.001 / 0.011) in md
    for folder in (root / "curves").glob("*/eval"):
        record = json.loads((folder / "eval.json").read_text())
        record["train_metric_images"] = 500
        (folder / "eval.json").write_text(json.dumps(record))
    report.write_report(root)
    assert "from all 500 training images at every point, which is eval-curve --full" in (root / "report.md").read_text()


def test_configuration_shows_what_ran(tmp_path):
    root = make_study(tmp_path / "study")
    metrics = root / "endpoints/mse_seed2/metrics.jsonl"  # one endpoint ran (resumed) in fp32
    metrics.write_text(metrics.read_text().replace('"bf16"', '"fp32"'))
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    assert _setting(md, "device") == "cpu (requested auto)"
    assert _setting(md, "training precision") == "bf16, fp32 (requested auto)"
    assert _setting(md, "BN statistics per point, from") == "86 (all training images; requested 8192)"
    assert _setting(md, "train metrics per point, from") == "86 (all training images; requested 8192)"
    assert _setting(md, "held-out metrics per point, from") == "14 (all held-out images)"
    assert _setting(md, "images (training / held out)") == "86 training / 14 held-out images"
    assert record["ran"]["device"] == ["cpu"] and record["ran"]["training_precision"] == ["bf16", "fp32"]
    assert "| device | auto |" not in md and "| BN images per point | 8192 |" not in md


def test_configuration_of_a_large_dataset_and_of_an_unfinished_study(tmp_path):
    # a subset of the requested size, on a GPU: no "(requested ...)" where the request is what ran
    big = make_study(tmp_path / "big", n_train=20000, n_test=2000, device="cuda", precision="fp32")
    study = json.loads((big / "study.json").read_text())
    study["config"]["device"] = "cuda"
    (big / "study.json").write_text(json.dumps(study))
    report.write_report(big)
    md = (big / "report.md").read_text()
    assert _setting(md, "BN statistics per point, from") == "8192 of 20000 training images"
    assert _setting(md, "device") == "cuda" and _setting(md, "training precision") == "fp32 (requested auto)"

    # nothing ran yet: no eval.json, no training log
    root = make_study(tmp_path / "study")
    for path in [*root.glob("curves/*/eval/eval.json"), *root.glob("**/metrics.jsonl")]:
        path.unlink()
    report.write_report(root)
    md = (root / "report.md").read_text()
    assert _setting(md, "device") == "not run yet (requested auto)"
    assert _setting(md, "training precision") == "not run yet (requested auto)"
    assert _setting(md, "BN statistics per point, from") == "not run yet (requested 8192)"


PROVENANCE = {"aecurves": "0.1.0", "git_commit": "0123456789abcdef0123456789abcdef01234567", "torch": "2.14.1+cu130",
              "python": "3.11.7", "host": "node-7", "device": "NVIDIA H200", "started": "2026-11-29T19:40:00",
              "finished": "2026-11-29T19:41:00", "wall_seconds": 58.2,
              "stage_seconds": {"endpoint:mse:1": 3.1, "curve:mse:1-2": 125.0, "report": 0.8}}


def test_provenance_is_shown_and_copied(tmp_path):
    root = make_study(tmp_path / "study", provenance=PROVENANCE)
    report.write_report(root)
    assert json.loads((root / "report.json").read_text())["provenance"] == PROVENANCE
    md = (root / "report.md").read_text()
    rows = dict(_md_table(md, "### Provenance")[1:])
    assert rows["aecurves version"] == "0.1.0" and rows["git commit"] == PROVENANCE["git_commit"]
    assert rows["torch"] == "2.14.1+cu130" and rows["Python"] == "3.11.7" and rows["host"] == "node-7"
    assert rows["device"] == "NVIDIA H200" and rows["started"] == "2026-11-29 19:40:00"
    assert rows["wall time, whole study"] == "58.2 s"
    stages = _md_table(md, "| stage | wall time |")
    assert stages[1:] == [["endpoint:mse:1", "3.1 s"], ["curve:mse:1-2", "2 min 05 s"], ["report", "0.8 s"]]
    assert "Made with aecurves 0.1.0 (commit 0123456789ab), torch 2.14.1+cu130" in md


def test_provenance_not_recorded(tmp_path):
    root = make_study(tmp_path / "study", provenance={**PROVENANCE, "finished": None, "wall_seconds": None,
                                                      "git_commit": None, "stage_seconds": {}})
    report.write_report(root)
    rows = dict(_md_table((root / "report.md").read_text(), "### Provenance")[1:])
    assert rows["git commit"] == rows["finished"] == rows["wall time, whole study"] == "not recorded"

    nan = make_study(tmp_path / "nan", provenance={**PROVENANCE, "wall_seconds": float("nan")})
    report.write_report(nan)
    assert dict(_md_table((nan / "report.md").read_text(), "### Provenance")[1:])["wall time, whole study"] == \
        "not recorded"

    old = make_study(tmp_path / "old")  # study.json without provenance
    record = report.write_report(old)
    md = (old / "report.md").read_text()
    assert record["provenance"] is None and json.loads((old / "report.json").read_text())["provenance"] is None
    assert "Provenance (versions, host, dates, wall times): not recorded" in _section(md, "### Provenance")


def test_fingerprint_ignores_provenance(tmp_path):
    # a re-run that skips every stage rewrites study.json's provenance: the report must stay up to date
    root = make_study(tmp_path / "study", provenance=PROVENANCE)
    before = report.inputs_fingerprint(root)
    study = json.loads((root / "study.json").read_text())
    study["provenance"] = {**PROVENANCE, "started": "2026-12-01T08:00:00", "wall_seconds": 4.3, "host": "other"}
    (root / "study.json").write_text(json.dumps(study))
    assert report.inputs_fingerprint(root) == before
    del study["provenance"]
    (root / "study.json").write_text(json.dumps(study))
    assert report.inputs_fingerprint(root) == before
    study["config"]["epochs"] = 31  # while the configuration does count
    (root / "study.json").write_text(json.dumps(study))
    assert report.inputs_fingerprint(root) != before


def test_endpoint_table_has_one_figure_per_quantity(tmp_path):
    root = make_study(tmp_path / "study", losses=("mse", "vgg"))
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    mse = _md_table(md, "## mse group in detail")
    assert mse[0] == ["autoencoder", "train MSE", "test MSE", "train PSNR (dB)", "test PSNR (dB)", "epochs",
                      "last-epoch gain", "gain from extra training"]
    ev = record["groups"]["mse"]["endpoints"][0]["eval"]
    assert mse[1][:5] == ["mse seed 1", report.fnum(ev["tr_loss"]), report.fnum(ev["te_loss"]),
                          report.fdb(ev["tr_psnr"]), report.fdb(ev["te_psnr"])]
    vgg = _md_table(md, "## vgg group in detail")
    assert vgg[0][:7] == ["autoencoder", "train loss (perceptual)", "test loss (perceptual)", "train MSE", "test MSE",
                          "train PSNR (dB)", "test PSNR (dB)"]
    ev = record["groups"]["vgg"]["endpoints"][0]["eval"]
    assert ev["te_loss"] == pytest.approx(10 * ev["te_mse"])
    assert vgg[1][2] == report.fnum(ev["te_loss"]) and vgg[1][4] == report.fnum(ev["te_mse"])
    # the training log's held-out figure only in the footnote, named as such
    assert not any("training log" in h for h in mse[0] + vgg[0])
    footnote = _section(md, "## mse group in detail")
    assert "The training log (metrics.jsonl) gives another held-out MSE, 0.01 (seed 1), 0.012 (seed 2)" in footnote
    # the paths' table names the quantity once too
    assert _md_table(md, "### Seeds 1 and 2")[0][1] == "max test MSE"


@pytest.mark.parametrize("n_train, psnr, code", [(86, 20.0, "tiny-dataset-weak-endpoints"), (86, 30.0, "tiny-dataset"),
                                                 (50000, 20.0, "weak-endpoints"), (50000, 30.0, None)])
def test_caveat_states_the_data_and_the_endpoints(tmp_path, n_train, psnr, code):
    root = make_study(tmp_path / "study", n_train=n_train, n_test=14, psnr=psnr)
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    html = (root / "report.html").read_text()
    g = record["groups"]["mse"]
    if code is None:
        assert g["caveat"] is None and "These mse endpoints were trained on" not in md
        assert not {"tiny-dataset-weak-endpoints", "tiny-dataset", "weak-endpoints"} & set(_codes(record))
        return
    psnrs = [e["eval"]["te_psnr"] for e in g["endpoints"]]
    ratio = np.mean([e["eval"]["te_mse"] / e["eval"]["tr_mse"] for e in g["endpoints"]])
    caveat = g["conclusions"][-1]
    assert caveat["code"] == code and caveat["text"] == g["caveat"]
    assert caveat["numbers"] == {"train_images": n_train, "test_images": 14, "worst_psnr_db": min(psnrs),
                                 "best_psnr_db": max(psnrs), "test_over_train_mse": pytest.approx(ratio)}
    assert g["caveat"] in record["summary_lines"]
    assert f"<p class=\"box warn\">{g['caveat']}</p>" in _section_html(html, "Caveats")


def _section_html(html_text: str, title: str) -> str:
    start = html_text.index(f"<h2>{title}</h2>")
    return html_text[start:html_text.index("</section>", start)]


def test_html_tables_scroll_inside_their_box(tmp_path):
    root = make_study(tmp_path / "study", provenance=PROVENANCE)
    report.write_report(root)
    html = (root / "report.html").read_text()
    assert html.count("<table>") >= 8
    assert html.count('<div class="scroll"><table') == html.count("<table") == html.count("</table></div>")
    assert ".scroll{overflow-x:auto" in html


def test_endpoint_grid_is_labelled_and_enlarged(tmp_path):
    root = make_study(tmp_path / "study")
    report.write_report(root)
    originals, recons = _endpoint_png(tmp_path / "again.png", 2)  # what seed 2's reconstructions.png holds
    with Image.open(root / "report_files/mse_seed2_reconstructions.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    cell = plots.MIN_CELL  # 16-pixel images enlarged 4 times, like the strips along the paths
    header = pixels.shape[0] - 2 * (cell + 2) - 2
    left = pixels.shape[1] - ENDPOINT_IMAGES * (cell + 2) - 2
    assert header == plots.LINE_HEIGHT and left > 60  # a title line; a label column
    for r, row in enumerate((originals, recons)):
        top = header + 2 + r * (cell + 2)
        for j in range(ENDPOINT_IMAGES):
            x = left + 2 + j * (cell + 2)
            block = pixels[top: top + cell, x: x + cell]
            assert np.array_equal(block, row[j].permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1)), (r, j)
        label = pixels[top: top + cell, :left]
        assert (label.min(-1) < 128).sum() > 30, r  # "original" / "reconstruction" written left of each row
    md = (root / "report.md").read_text()
    assert "*mse group, seed 2: held-out images and their reconstructions after the last epoch*" in md


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_endpoint_picture_from_reconstructions_pt_equals_the_pngs(tmp_path):
    """train.py writes reconstructions.pt beside reconstructions.png, the same pixels: the report reads the tensors,
    and for a folder written before (no .pt) cuts them out of the PNG. Both give the same picture."""
    old, new = make_study(tmp_path / "old"), make_study(tmp_path / "new", tensors=True)
    report.write_report(old)
    record = report.write_report(new)
    assert not record["damaged"]
    for s in (1, 2, 3):
        rel = f"report_files/mse_seed{s}_reconstructions.png"
        assert np.array_equal(_pixels(old / rel), _pixels(new / rel)), s
    assert "endpoints/mse_seed1/reconstructions.pt" in report.input_files(new)
    # the tensors are what is drawn: other pixels in the .pt, and the picture shows them, PNG or not
    images, recons = _endpoint_png(tmp_path / "again.png", 2)
    _endpoint_pt(new / "endpoints/mse_seed2/reconstructions.pt", 255 - images, recons)
    (new / "endpoints/mse_seed2/reconstructions.png").write_text("not a png")
    record = report.write_report(new)
    assert not record["damaged"]  # the PNG is not read when the tensors are there
    inverted = make_study(tmp_path / "inverted")
    _endpoint_png(tmp_path / "again.png", 2)
    picture = inverted / "endpoints/mse_seed2/reconstructions.png"
    save_image(make_grid(torch.cat([255 - images, recons]).float() / 255, nrow=ENDPOINT_IMAGES, padding=2,
                         pad_value=1.0), picture)
    report.write_report(inverted)
    rel = "report_files/mse_seed2_reconstructions.png"
    assert np.array_equal(_pixels(new / rel), _pixels(inverted / rel))
    assert not np.array_equal(_pixels(new / rel), _pixels(old / rel))


class NotATensor:  # a pickled object of this test module: torch.load(weights_only=True) must refuse to build it
    pass


HUGE_VIEW = torch.zeros(1, dtype=torch.uint8).expand(200000, 3, 1024, 1024)


def test_a_tiny_reconstructions_pt_of_terabytes_is_damaged_not_materialised(tmp_path, capsys):
    """N11: a 1 KB file holding a stride-0 view of 200000 x 3 x 1024 x 1024 pixels: the report finishes, names it
    damaged, and never allocates what the view claims (its peak memory grows by far less than 1 GB)."""
    import resource

    root = make_study(tmp_path / "study", tensors=True)
    rel = "endpoints/mse_seed1/reconstructions.pt"
    torch.save({"format": 1, "images": HUGE_VIEW, "reconstructions": HUGE_VIEW}, root / rel)
    assert (root / rel).stat().st_size < 2048
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert main(["report", str(root)]) == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20
    assert f"{root / rel} is damaged (images is a view of 629,145,600,000 pixels" in capsys.readouterr().err
    assert list(json.loads((root / "report.json").read_text())["damaged"]) == [rel]
    assert (root / "report_files/mse_seed1_reconstructions.png").is_file()  # from the PNG, as for an old folder


@pytest.mark.parametrize("content, reason", [
    ({"format": 2}, "not a record of format 1"),
    ({"images": "pixels"}, "images is not uint8 pixels"),
    ({"reconstructions": torch.zeros(4, 3, 16, 16)}, "reconstructions is not uint8 pixels"),  # floats
    ({"reconstructions": torch.zeros(3, 3, 16, 16, dtype=torch.uint8)}, "differ in shape"),
    ({"images": torch.zeros(3, 16, 16, dtype=torch.uint8)}, "images is not uint8 pixels"),  # 3-D
    ("a list", "not a record of format 1"),
    ("not torch", "not readable"),
    (NotATensor, "not readable (UnpicklingError"),
    # views: a stride-0 one repeats 1 stored byte as 2.5 TB of pixels (issue 27, N11); a transposed one is not what
    # train.py writes either
    ({"images": HUGE_VIEW, "reconstructions": HUGE_VIEW},
     "images is a view of 629,145,600,000 pixels (200000, 3, 1024, 1024) over 1 stored bytes"),
    ({"reconstructions": torch.zeros(4, 3, 16, 16, dtype=torch.uint8).transpose(2, 3)}, "reconstructions is a view"),
])
def test_a_damaged_reconstructions_pt_is_named_and_the_png_shown(tmp_path, capsys, content, reason):
    root = make_study(tmp_path / "study", tensors=True)
    rel = "endpoints/mse_seed3/reconstructions.pt"
    if content == "a list":
        torch.save([1, 2], root / rel)
    elif content == "not torch":
        (root / rel).write_text("not torch")
    elif content is NotATensor:
        torch.save({"format": 1, "images": NotATensor(), "reconstructions": NotATensor()}, root / rel)
    else:
        images, recons = _endpoint_png(tmp_path / "again.png", 3)
        _endpoint_pt(root / rel, images, recons, **content)
    assert main(["report", str(root)]) == 0
    err = capsys.readouterr().err
    assert f"{root / rel} is damaged" in err and reason in err and "Traceback" not in err
    record = json.loads((root / "report.json").read_text())
    assert list(record["damaged"]) == [rel] and reason in record["damaged"][rel]
    assert report.md_text(rel) in _section((root / "report.md").read_text(), "## Caveats")
    # the picture comes from the PNG, as for a folder written before the tensors
    old = make_study(tmp_path / "old")
    report.write_report(old)
    picture = "report_files/mse_seed3_reconstructions.png"
    assert np.array_equal(_pixels(root / picture), _pixels(old / picture))


def test_first_figure_is_each_path_kinds_mean_over_pairs_with_its_range(tmp_path, monkeypatch):
    drawn = []
    original = plots.plot_bands_along_t
    monkeypatch.setattr(plots, "plot_bands_along_t",
                        lambda bands, path, **kw: drawn.append((bands, kw)) or original(bands, path, **kw))
    root = make_study(tmp_path / "study")
    add_alignment(root)
    report.write_report(root)
    (bands, kw), = drawn
    assert [b["label"] for b in bands] == ["straight segment", "aligned segment", "curve", "aligned curve"]
    study = json.loads((root / "study.json").read_text())
    for band in bands:
        aligned = band["name"].startswith("aligned")
        key = "segment_te_loss" if band["name"].endswith("segment") else "te_loss"
        runs = []
        for pair in study["groups"]["mse"]["pairs"]:
            with np.load(root / pair["aligned_eval" if aligned else "eval"] / "curve.npz") as npz:
                runs.append(npz[key])
        assert np.allclose(band["mean"], np.mean(runs, axis=0)), band["name"]
        assert np.array_equal(band["lo"], np.min(runs, axis=0)) and np.array_equal(band["hi"], np.max(runs, axis=0))
        assert band["n"] == 3 and np.array_equal(band["ts"], np.linspace(0, 1, 7))
    assert kw["ylabel"] == "held-out MSE loss"
    md = (root / "report.md").read_text()
    assert "*mse group: held-out MSE loss along t for each kind of path, the mean over the pairs (1-2, 1-3, 2-3)" in md
    # pairs measured at other points t are compared on the union of their points
    pairs = [model.Pair(seeds=(1, 2), eval="e", curve_folder="c", available=True, eval_status="found",
                        curve_precision=[], arrays={"ts": ts, "te_loss": ts ** 2, "segment_ts": ts,
                                                    "segment_te_loss": 1 + ts})
             for ts in (np.linspace(0, 1, 3), np.linspace(0, 1, 5))]
    segment, curve = report.figures.mean_bands(pairs)
    assert np.array_equal(segment["ts"], np.linspace(0, 1, 5)) and np.allclose(segment["mean"], 1 + segment["ts"])
    assert np.allclose(curve["hi"], np.interp(curve["ts"], [0, 0.5, 1], [0, 0.25, 1]))


def test_alignment_conclusion_with_its_intervals(tmp_path):
    root = make_study(tmp_path / "study")
    add_alignment(root)
    record = report.write_report(root)
    found = _conclusion(record, "alignment-removes")
    seg = Interval.of([(sb - ab) / sb for sb, (ab, _) in zip((0.02, 0.03, 0.025), ALIGNED_BUMPS)])
    cur = Interval.of([(sb - ac) / sb for sb, (_, ac) in zip((0.02, 0.03, 0.025), ALIGNED_BUMPS)])
    assert found["numbers"]["aligned_segment_removed"] == pytest.approx(seg.mean)
    assert (found["numbers"]["aligned_curve_lo"], found["numbers"]["aligned_curve_hi"]) == pytest.approx(
        (cur.lo, cur.hi))
    pair = record["groups"]["mse"]["pairs"][0]
    assert pair["align_seconds"] == 2.5 and pair["aligned_eval"] == "curves/mse_seed1-seed2_aligned/eval"
    md = (root / "report.md").read_text()
    barriers = _md_table(md, "Test barrier:")
    assert barriers[0] == ["pair", "straight segment", "aligned segment", "curve", "aligned curve"]
    assert barriers[1][2] == report.fnum(pair["paths"]["aligned_segment"]["barrier"])
    assert "report_files/mse_seed1-seed2_aligned_segment_reconstructions.png" in md


def test_figures_name_their_pairs(tmp_path, monkeypatch):
    drawn = []
    original = report_figures._plot_series
    monkeypatch.setattr(report_figures, "_plot_series",
                        lambda series, path, **kw: drawn.append((series, kw)) or original(series, path, **kw))
    root = make_study(tmp_path / "study")
    report.write_report(root)
    (series, kw), = drawn
    assert kw["title"].startswith("mse group, seeds 1-2, 1-3, 2-3: MSE loss along the curves")
    assert [s["label"] for s in series][:2] == ["curve, seeds 1-2", "segment, seeds 1-2"]
    md = (root / "report.md").read_text()
    assert "*mse group, seeds 1-2, 1-3, 2-3: MSE loss along t for every curve" in md
    assert "*mse group, seeds 1-3: held-out images reconstructed along the Bezier curve (3 bends) at" in md
    assert "*mse group, seeds 2-3: held-out images reconstructed along the straight segment at" in md


# ----------------------------------------------------------------------------------------------------------
# strings from the study's files are text in report.md, never markup

HOSTILE = "x<script>alert(1)</script> *b* _i_ `c` [l](javascript:x) a|b &amp; ~s~ $m$ end\\\n# not a heading"
RAW_MARKUP = ("<script>", "*b*", "_i_", "`c`", "[l]", "a|b", " &amp; ", "~s~", "$m$", "end\\ ")


def _outside_code_spans(line: str) -> str:
    """A markdown line without its code spans (whose content Markdown shows verbatim)."""
    return re.sub(r"(?<![`\\])(`+)(?!`).*?(?<!`)\1(?!`)", "", line)  # a backslash-escaped backtick opens none


def _edit_json(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def test_markdown_shows_the_study_strings_as_text(tmp_path):
    root = make_study(tmp_path / "st`dy <x>", provenance={**PROVENANCE, "host": HOSTILE, "git_commit": HOSTILE})

    def study(s):
        s["config"].update(data_dir=HOSTILE, model=HOSTILE)
        s["groups"]["mse"]["warning"] = "1) " + HOSTILE

    def evaluation(r):
        r.update(notes=[HOSTILE, "1. not a list", "- not an item", "+ not an item"], path={"curve": HOSTILE})

    _edit_json(root / "study.json", study)
    _edit_json(root / "curves/mse_seed1-seed2/eval/eval.json", evaluation)
    report.write_report(root)
    md = (root / "report.md").read_text()
    text = "\n".join(_outside_code_spans(line.removeprefix("> ")) for line in md.splitlines())
    for raw in RAW_MARKUP:
        assert raw not in md, raw
    assert "<" not in text and ">" not in text and not re.search(r"&(?!lt;|gt;|amp;)", text)
    assert not re.search(r"^(> )?(- )?#+ not a heading", md, re.MULTILINE)
    assert md.count(report.md_text(HOSTILE)) >= 6  # folder, factory, host, commit, warning, note, strip captions
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "\\[l\\](javascript:x)" in md
    assert "- 1\\. not a list" in md and "- \\- not an item" in md and "- \\+ not an item" in md
    assert "> 1\\) " + report.md_text(HOSTILE) in md
    # the report's own formatting still renders: headings, tables, figures, captions, and commands as code
    assert md.startswith("# Mode connectivity") and "\n## mse group (MSE loss)\n" in md
    assert "\n| setting | value |\n" in md
    assert "![" in md and "(report_files/mse_loss_along_paths.png)" in md
    assert _setting(md, "data folder") == " ".join(HOSTILE.split()) and _setting(md, "model factory") == " ".join(
        HOSTILE.split())
    assert f"``aecurves report '{root}'``" in md  # the command as code, the folder quoted for the shell
    html_text = (root / "report.html").read_text()
    assert "<script>alert" not in html_text and html_text.count("<script") == html_text.count(
        '<script type="application/json" class="explorer-data">') + 1  # the explorers' data, and their script
    assert f"<code>aecurves report &#x27;{html.escape(str(root))[:-4]}" in html_text


# ----------------------------------------------------------------------------------------------------------
# the model factory in the configuration


def test_configuration_names_the_model_factory_and_its_kwargs(tmp_path):
    builtin = make_study(tmp_path / "builtin")
    _edit_json(builtin / "study.json", lambda s: s["config"].update(width=32))
    report.write_report(builtin)
    md = (builtin / "report.md").read_text()
    assert _setting(md, "model factory") == "aecurves.models:ConvAutoencoder (built-in)"
    assert _setting(md, "model kwargs") == "none" and _setting(md, "width") == "32"

    custom = make_study(tmp_path / "custom")
    _edit_json(custom / "study.json", lambda s: s["config"].update(
        model="my_models.py:make_ae", model_kwargs={"hidden": 512, "depth": 3}, width=None, latent_dim=64))
    report.write_report(custom)
    md = (custom / "report.md").read_text()
    rows = dict(_md_table(md, "## Configuration")[1:])
    assert rows["model factory"] == "my_models.py:make_ae" and rows["model kwargs"] == '{"depth": 3, "hidden": 512}'
    assert rows["width"] == "does not apply (a setting of the built-in convolutional models)"
    assert rows["bottleneck"] == "64"
    assert "None" not in rows.values()


# ----------------------------------------------------------------------------------------------------------
# damaged input files: named, left out, never a traceback

EVAL = "curves/mse_seed1-seed2/eval/eval.json"


def _set(key, value):
    return lambda r: r.update({key: value})


def _set_summary(key, value):
    return lambda r: r["summary"].update({key: value})


def _drop_summary(key):
    return lambda r: r["summary"].pop(key)


@pytest.mark.parametrize("damage, reason", [
    (_set_summary("te_barrier", "0.02"), 'paths.curve.te_barrier is "0.02", not a number'),
    (_set_summary("te_psnr_min", True), "paths.curve.te_psnr_min is true, not a number"),
    (_drop_summary("te_psnr_start"), "paths.curve has no te_psnr_start"),
    (_set("summary", [1, 2]), "summary is [1, 2], not an object"),
    (_set("summary", None), "summary is null, not an object"),
    (_set("notes", "a note"), 'notes is "a note", not a list'),
    (_set("bn", [500]), "bn is [500], not an object"),
    (_set("path", {"curve": "Bezier", "num_bends": "3"}), 'path.num_bends is "3", not an integer'),
    (_set("ensemble", {"k": 3, "entries": [1]}), "ensemble.entries is [1], not an object"),
    ("{not json", "not JSON"),
    ("null", "the file is null, not an object"),
])
def test_a_damaged_eval_json_is_named_and_left_out(tmp_path, capsys, damage, reason):
    root = make_study(tmp_path / "study")
    if callable(damage):
        _edit_json(root / EVAL, damage)
    else:
        (root / EVAL).write_text(damage)
    assert main(["report", str(root)]) == 0  # the report is written, the damage stated
    err = capsys.readouterr().err
    assert f"{root / EVAL} is damaged" in err and reason in err and "Traceback" not in err
    record = json.loads((root / "report.json").read_text())
    assert reason in record["damaged"][EVAL]
    g = record["groups"]["mse"]
    assert [p["eval_status"] for p in g["pairs"]] == ["damaged", "found", "found"]
    assert g["summary"]["pairs_evaluated"] == 2
    md = (root / "report.md").read_text()
    pair = md[md.index("### Seeds 1 and 2"):md.index("### Seeds 1 and 3")]
    assert f"{report.md_text(EVAL)} is damaged" in pair and "missing" not in pair
    assert report.md_text(f"{EVAL}: {record['damaged'][EVAL]}") in md  # the list of damaged files
    assert _conclusion(record, "barrier-removed")["numbers"]["pairs"] == 2  # the other two pairs are reported
    assert "1 of 3 pairs are not in these numbers" in _section(md, "## mse group (MSE loss)")


@pytest.mark.parametrize("path, content, reason", [
    ("endpoints/mse_seed2/metrics.jsonl", '{"epoch": 30, "test_loss": "low"}\n', 'line 1: test_loss is "low"'),
    ("endpoints/mse_seed2/metrics.jsonl", '[30, 0.01]\n', "line 1: the row is [30, 0.01], not an object"),
    ("endpoints/mse_seed2/metrics.jsonl", '{"epoch": 29}\n{"epo', "not JSON"),
    ("curves/mse_seed1-seed3/eval/curve.npz", "not a zip", "not readable"),
    ("endpoints/mse_seed3/reconstructions.png", "not a png", "not readable"),
    ("study.json", None, "config is [], not an object"),
])
def test_other_damaged_inputs_are_named_and_left_out(tmp_path, capsys, path, content, reason):
    root = make_study(tmp_path / "study")
    if content is None:
        _edit_json(root / path, lambda s: s.update(config=[]))
    else:
        (root / path).write_text(content)
    assert main(["report", str(root)]) == 0
    err = capsys.readouterr().err
    assert f"{root / path} is damaged" in err and reason in err and "Traceback" not in err
    record = json.loads((root / "report.json").read_text())
    assert reason in record["damaged"][path]
    assert report.md_text(path) in (root / "report.md").read_text()


def _rename_group(s):
    s["groups"]["../../x"] = s["groups"].pop("mse")


@pytest.mark.parametrize("damage, reason", [
    (lambda s: s["groups"]["mse"]["pairs"][0].update(seeds="1-2"), 'groups.mse.pairs[0].seeds is "1-2", not a list'),
    (lambda s: s["groups"]["mse"].update(endpoints={"one": "endpoints/mse_seed1"}), '"one" is not a seed'),
    (_rename_group, 'groups.../../x: "../../x" is not a loss'),  # it would name files outside report_files/
])
def test_a_study_json_without_its_groups_shape_is_a_user_error(tmp_path, capsys, damage, reason):
    root = make_study(tmp_path / "study")
    _edit_json(root / "study.json", damage)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'study.json'} is damaged" in err and reason in err
    assert "Traceback" not in err and not (root / "report.md").exists()


def test_missing_and_damaged_are_told_apart(tmp_path):
    root = make_study(tmp_path / "study")
    (root / "curves/mse_seed2-seed3/eval/eval.json").unlink()
    (root / EVAL).write_text("{")
    record = report.write_report(root)
    assert [p["eval_status"] for p in record["groups"]["mse"]["pairs"]] == ["damaged", "found", "missing"]
    assert list(record["damaged"]) == [EVAL]
    md = (root / "report.md").read_text()
    assert "Not evaluated yet (curves/mse\\_seed2-seed3/eval/eval.json is missing)." in md
    assert "curves/mse\\_seed2-seed3/eval/eval.json is damaged" not in md


# ----------------------------------------------------------------------------------------------------------
# every write through aecurves.files


def test_every_report_file_is_written_through_aecurves_files(tmp_path, monkeypatch):
    root = make_study(tmp_path / "study")
    before = set(root.rglob("*"))
    targets = []
    original = files.new_temp_file  # atomic_path (and so write_json) takes every temporary from it

    def spy(folder, prefix, suffix=".tmp"):
        targets.append(Path(folder) / prefix)
        return original(folder, prefix, suffix)

    monkeypatch.setattr(files, "new_temp_file", spy)
    report.write_report(root)
    written = {p for p in set(root.rglob("*")) - before if p.is_file()}
    assert written == set(targets) and root / "report.md" in written and len(written) > 10
    assert {p for p in set(root.rglob("*")) - before if p.is_dir()} == {root / report.FILES_DIR}


def test_a_full_disk_stops_the_report_with_a_message_naming_the_file(tmp_path, monkeypatch, capsys):
    root = make_study(tmp_path / "study")

    def full(self, *args, **kwargs):  # the disk fills up as report.md is written: an OSError naming no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"could not write {root / 'report.md'}: No space left on device. The disk is full" in err
    assert "Traceback" not in err and "damaged" not in err
    assert not [p for p in root.rglob("*") if p.name.startswith(("report.", "."))]  # no partial file, no temporary


def test_paths_out_of_the_study_folder_are_not_read(tmp_path, capsys):
    """study.json names the stage folders; a folder someone sent must not make the report read, or embed, files
    from elsewhere: neither through '..' in study.json nor through a link inside the folder (refused as a whole
    before anything is read, issue 27; a link made after that check is still not read: inputs.inside)."""
    root = make_study(tmp_path / "study")
    secret = tmp_path / "secret"
    (secret / "eval").mkdir(parents=True)
    shutil.copytree(root / "curves/mse_seed1-seed2/eval", secret / "eval", dirs_exist_ok=True)
    _edit_json(secret / "eval/eval.json", lambda r: r.update(notes=["SECRET NOTE"]))

    def point_out(s):
        s["groups"]["mse"]["pairs"][0]["eval"] = "../secret/eval"

    _edit_json(root / "study.json", point_out)
    assert main(["report", str(root)]) == 0
    err = capsys.readouterr().err
    assert "outside the study folder" in err and "Traceback" not in err
    record = json.loads((root / "report.json").read_text())
    assert "../secret/eval/eval.json" in record["damaged"]
    for name in ("report.md", "report.html"):
        assert "SECRET NOTE" not in (root / name).read_text()

    picture = root / "endpoints/mse_seed2/reconstructions.png"
    picture.unlink()
    picture.symlink_to(tmp_path / "private.png")
    _png(tmp_path / "private.png")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{picture} -> {tmp_path / 'private.png'}" in err and "nothing was changed" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()} == before
    inputs = Inputs(root)  # the same link, made after that check: named, never read
    assert inputs.status("endpoints/mse_seed2/reconstructions.png") == "damaged"
    assert inputs.load("endpoints/mse_seed2/reconstructions.png", lambda p: p.read_bytes()) is None
    assert "outside the study folder" in inputs.damaged["endpoints/mse_seed2/reconstructions.png"]


# ----------------------------------------------------------------------------------------------------------
# convergence from the extra training, and the equal-budget ensembles (issue 20)

def add_extra_training(root: Path, gains: dict, curve_epochs: int = 5) -> None:
    """The baselines of a study made by make_study: each endpoint trained on as long as a curve, its held-out loss
    `gains[seed]` lower (relative), evaluated at t = 0, 1 as the study's baseline stage writes it."""
    study = json.loads((root / "study.json").read_text())
    study["config"].update(curve_epochs=curve_epochs, extra_training=True)
    for pair in study["groups"]["mse"]["pairs"]:
        a, b = pair["seeds"]
        pair["baseline_eval"] = f"baselines/mse_seed{a}-seed{b}"
        loss = {s: ENDS[s] * (1 - gains[s]) for s in (a, b)}
        summary = {"te_loss_start": loss[a], "te_loss_end": loss[b], "te_mse_start": loss[a], "te_mse_end": loss[b],
                   "te_psnr_start": 20.0 + a, "te_psnr_end": 20.0 + b, "te_psnr_min": 20.0, "te_barrier": 0.001,
                   "te_ssim_start": 0.5 + a / 100, "te_ssim_end": 0.5 + b / 100}
        folder = root / pair["baseline_eval"]
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({"kind": "segment", "summary": summary, "config": {},
                                                      "files": {}}))
    (root / "study.json").write_text(json.dumps(study))


@pytest.mark.parametrize("gains, converged", [({1: 0.15, 2: 0.01, 3: 0.005}, False),
                                              ({1: 0.019, 2: 0.01, 3: -0.003}, True)])
def test_convergence_is_judged_from_the_extra_training(tmp_path, gains, converged):
    root = make_study(tmp_path / "study")
    add_extra_training(root, gains)
    record = report.write_report(root)
    c = record["groups"]["mse"]["convergence"]
    assert c["gains"] == {str(s): pytest.approx(g) for s, g in gains.items()}  # (endpoint - extra) / endpoint
    assert c["threshold"] == report.CONVERGED_GAIN == record["thresholds"]["converged_gain"] == 0.02
    assert c["converged"] is converged
    md = (root / "report.md").read_text()
    found = _conclusion(record, "converged", "not-converged")
    assert found["code"] == ("converged" if converged else "not-converged")
    assert found["numbers"] == {"min": pytest.approx(min(gains.values())), "max": pytest.approx(max(gains.values())),
                                "threshold": 0.02, "above": [] if converged else ["1"], "measured": 3}
    assert report.fpct(max(gains.values())) in found["text"]  # the sentence states the gain it judged by
    caveats = _section(md, "## Caveats")
    if converged:
        assert report.md_text(found["text"]) not in caveats
    else:  # among the conclusions and, as a caveat, in plain sight
        assert md.count(report.md_text(found["text"])) == 2 and report.md_text(found["text"]) in caveats
    rows = _md_table(md, "### Endpoints")
    assert rows[0][-1] == "gain from extra training" and rows[1][-1] == report.fpct(gains[1])
    # the last-epoch gain is shown, but never taken for convergence
    assert "near 0 by construction" in md


def test_convergence_without_extra_training_is_not_measured(tmp_path):
    root = make_study(tmp_path / "study")  # no baselines: --no-extra-training
    record = report.write_report(root)
    c = record["groups"]["mse"]["convergence"]
    assert (c["measured"], c["converged"], c["extra_training"]) == (False, None, False)
    codes = _codes(record)
    assert "convergence-not-measured" in codes and not {"converged", "not-converged"} & set(codes)
    md = (root / "report.md").read_text()
    assert "convergence was not measured" in md  # the endpoints' footnote
    # extra training asked for, but its evaluations not there yet
    c = report.convergence([model.Endpoint(seed=1, folder="endpoints/mse_seed1")], True, 5)
    assert (c.measured, c.converged) == (False, None)
    assert conclusions.convergence_conclusion("mse", c).code == "convergence-pending"


def _eb_pairs(per_pair: list[dict]) -> list[model.Pair]:
    """Evaluated pairs whose equal-budget rows have the held-out MSE `per_pair[i][row]` (budget: E = 5 epochs)."""
    def rows(mse: dict) -> dict:
        return {k: model.BudgetRow(mse=v, psnr=20 - 10 * np.log10(v / 0.01), ssim=0.5, members=2, source="test",
                                   budget_epochs=5 * model.BUDGET_FACTOR[k]) for k, v in mse.items()}

    return [model.Pair(seeds=(1, 2), eval="e", curve_folder="c", available=True, eval_status="found",
                       curve_precision=[], equal_budget=model.PairBudget(rows=rows(m), fge={})) for m in per_pair]


def test_equal_budget_winner_with_its_interval_over_pairs():
    keys = [k for k, _, _ in report.EQUAL_BUDGET_ROWS]
    per_pair = [dict(zip(keys, v)) for v in ([0.0100, 0.0105, 0.0090, 0.0097, 0.0096, 0.0085, 0.0092],
                                             [0.0110, 0.0116, 0.0101, 0.0106, 0.0108, 0.0094, 0.0103],
                                             [0.0104, 0.0110, 0.0093, 0.0100, 0.0099, 0.0090, 0.0095])]
    eb = report.equal_budget_summary(_eb_pairs(per_pair), 5)
    assert eb.ranked[:3] == ["extra_average", "fge_pooled", "extra_best"]
    assert (eb.winner, eb.runner_up, eb.winner_by_psnr) == ("extra_average", "fge_pooled", "extra_average")
    expected = Interval.of([(m["extra_average"] - m["fge_pooled"]) / m["fge_pooled"] for m in per_pair])
    assert eb.winner_vs_runner_up == expected and expected.hi < 0
    assert eb.rows["fge_pooled"].mse == Interval.of([m["fge_pooled"] for m in per_pair])
    assert eb.rows["fge_pooled"].budget_epochs == 10 and eb.rows["curve_ensemble"].budget_epochs == 5
    # at one curve's budget (5 epochs): the better extra-trained endpoint against the curve ensemble
    assert (eb.best_at_one_curve, eb.one_curve_other) == ("extra_best", "curve_ensemble")
    one = Interval.of([(m["extra_best"] - m["curve_ensemble"]) / m["curve_ensemble"] for m in per_pair])
    assert eb.one_curve_vs_other == one
    first, second = conclusions.equal_budget_conclusions(eb)
    assert first.code == "equal-budget-winner" and first.numbers == {
        "winner": "extra_average", "runner_up": "fge_pooled", "winner_by_psnr": "extra_average",
        "winner_mse": pytest.approx(np.mean([m["extra_average"] for m in per_pair])), "vs_runner_up": expected.mean,
        "lo": expected.lo, "hi": expected.hi}
    assert second.code == "equal-budget-one-curve" and second.numbers == {
        "best": "extra_best", "other": "curve_ensemble", "vs_other": one.mean, "lo": one.lo, "hi": one.hi}
    # the sentences name the rows by their labels, with the budgets and the intervals they state
    assert (f"{report.EQUAL_BUDGET_SHORT['extra_average']} (10 epochs) reconstructs best" in first.text
            and f"(95% interval {report.fpct(expected.lo)} to {report.fpct(expected.hi)})" in first.text)
    # an interval that includes 0 is said to be too wide
    per_pair[1]["extra_average"], per_pair[1]["fge_pooled"] = 0.0102, 0.0100
    first = conclusions.equal_budget_conclusions(report.equal_budget_summary(_eb_pairs(per_pair), 5))[0]
    assert first.numbers["lo"] < 0 < first.numbers["hi"] and "too wide to conclude from 3 pairs" in first.text


def test_equal_budget_table_from_the_files(tmp_path):
    """The table's numbers are the files': (a), (b) from the curves' eval.json, (c), (d) from ensembles.json, (e) from
    the baselines; the budget from --curve-epochs; the over-pairs row the mean and interval of the pairs'."""
    root = make_study(tmp_path / "study")
    add_extra_training(root, {1: 0.1, 2: 0.1, 3: 0.1}, curve_epochs=4)
    study = json.loads((root / "study.json").read_text())
    study["groups"]["mse"]["fge"] = {str(s): f"fge/mse_seed{s}" for s in (1, 2, 3)}
    for s in (1, 2, 3):
        (root / f"fge/mse_seed{s}").mkdir(parents=True)
        (root / f"fge/mse_seed{s}/fge.json").write_text(json.dumps({"budget_epochs": 4, "schedule": {"cycle": 2},
                                                                    "snapshots": [{}, {}]}))
    pooled = {}
    for i, pair in enumerate(study["groups"]["mse"]["pairs"]):
        ev = root / pair["eval"] / "eval.json"
        record = json.loads(ev.read_text())
        record["ensemble"] = {"k": 5, "entries": {"path_average": {"mse": 0.0095 + i / 1e4, "psnr": 20.2, "ssim": 0.6},
                                                  "endpoint_average": {"mse": 0.0098, "psnr": 20.1, "ssim": 0.58}}}
        ev.write_text(json.dumps(record))
        pair["ensembles"] = f"ensembles/mse_seed{pair['seeds'][0]}-seed{pair['seeds'][1]}"
        pooled[i] = 0.0090 + i / 2e4
        averages = {"fge_start": {"members": [0, 1], "mse": 0.0093, "psnr": 20.3, "ssim": 0.61},
                    "fge_end": {"members": [2, 3], "mse": 0.0094, "psnr": 20.3, "ssim": 0.6},
                    "fge_pooled": {"members": [0, 1, 2, 3], "mse": pooled[i], "psnr": 20.5, "ssim": 0.62},
                    "extra_average": {"members": [4, 5], "mse": 0.0088, "psnr": 20.6, "ssim": 0.63}}
        (root / pair["ensembles"]).mkdir(parents=True)
        (root / pair["ensembles"] / "ensembles.json").write_text(json.dumps({"averages": averages}))
    (root / "study.json").write_text(json.dumps(study))
    record = report.write_report(root)
    g = record["groups"]["mse"]
    rows = g["pairs"][1]["equal_budget"]["rows"]
    assert rows["curve_ensemble"]["mse"] == 0.0096 and rows["endpoint_average"]["psnr"] == 20.1
    assert rows["fge_pooled"] == {"mse": pooled[1], "psnr": 20.5, "ssim": 0.62, "members": 4, "budget_epochs": 8,
                                  "source": "ensembles/mse_seed1-seed3/ensembles.json: averages.fge_pooled"}
    assert rows["extra_best"]["mse"] == pytest.approx(min(ENDS[1], ENDS[3]) * 0.9)
    assert rows["extra_best"]["budget_epochs"] == 4 and rows["extra_average"]["budget_epochs"] == 8
    assert g["pairs"][0]["equal_budget"]["fge"] == {"1": {"budget_epochs": 4, "snapshots": 2, "cycle": 2},
                                                    "2": {"budget_epochs": 4, "snapshots": 2, "cycle": 2}}
    means = {k: np.mean([p["equal_budget"]["rows"][k]["mse"] for p in g["pairs"]]) for k in rows}
    assert g["equal_budget"]["winner"] == min(means, key=means.get) == "extra_average"
    md = (root / "report.md").read_text()
    table = _md_table(md, "### Ensembles at equal training budget")
    assert table[0] == ["pair", "ensemble", "training beyond the endpoints (epochs)", "networks", "test MSE",
                        "test PSNR (dB)", "test SSIM"]
    assert table[3] == ["seeds 1-2", "(c) FGE: 2 snapshots from each endpoint's run, pooled", "8 (2 × 4)", "4",
                        report.fnum(pooled[0]), "20.50", "0.62"]
    assert table[4][1:3] == ["(c) FGE from seed 1 alone (2 snapshots)", "4"]
    over = _md_table(md, "Over pairs:")
    row = next(r for r in over if r[0] == "(c) FGE pooled from both endpoints' runs")
    assert row[1:4] == ["8 (2 × 4)", "3", report.finterval(Interval.of(pooled.values()), report.fnum)]
    assert next(r for r in over if r[0].startswith("(b)"))[1] == "0"
    assert _conclusion(record, "equal-budget-winner")["numbers"]["winner"] == "extra_average"
    # the files it read are the report's inputs
    assert "ensembles/mse_seed1-seed3/ensembles.json" in report.input_files(root)
    assert "fge/mse_seed2/fge.json" in report.input_files(root)


def _leaves(value, at=""):
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() if key not in ("generated_at", "inputs_fingerprint")
                for k, v in _leaves(sub, f"{at}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, sub in enumerate(value) for k, v in _leaves(sub, f"{at}[{i}]").items()}
    return {at: value}


def test_eval_json_of_the_last_release_and_of_this_one_give_the_same_report(tmp_path):
    """eval.json in the layout the last release wrote ("summary", segment_ prefixes; make_study writes it) and in
    this one's (records.EvalRecord: format_version 2, paths.curve / paths.segment) give the same report."""
    old = make_study(tmp_path / "old")
    shutil.copytree(old, tmp_path / "new")
    new = tmp_path / "new"
    converted = 0
    for path in sorted(new.rglob("eval.json")):
        record = json.loads(path.read_text())
        assert "summary" in record and "format_version" not in record
        path.write_text(json.dumps(EvalRecord.from_json(record).to_json()))
        converted += 1
    assert converted >= 3
    assert main(["report", str(old)]) == 0 and main(["report", str(new)]) == 0
    before, after = (_leaves(json.loads((r / "report.json").read_text())) for r in (old, new))
    assert before == after and not json.loads((new / "report.json").read_text()).get("damaged")


# ----------------------------------------------------------------------------------------------------------
# the explorers of report.html


def add_reconstructions(root: Path, n: int = 2, size: int = 8) -> dict[str, dict]:
    """reconstructions.npz beside every eval.json (eval-curve's, with random pixels at each of its t), and te_ssim in
    the curves' series (the segments' left without it: shown as "–"). Returns {eval folder: arrays}."""
    rng = np.random.default_rng(0)
    found = {}
    for path in sorted(root.glob("curves/*/eval/eval.json")):
        record = json.loads(path.read_text())
        ts = np.asarray(record["series"]["ts"])
        record["series"]["te_ssim"] = [0.5 + 0.01 * k for k in range(len(ts))]
        path.write_text(json.dumps(record))
        arrays = {"ts": ts, "images": rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                  **{key: rng.integers(0, 256, (len(ts), n, 3, size, size), dtype=np.uint8)
                     for key in ("curve", "segment")}}
        with open(path.parent / "reconstructions.npz", "wb") as f:
            np.savez(f, **arrays)
        found[str(path.parent.relative_to(root))] = arrays
    return found


def add_plane(root: Path, grid: int = 3, n: int = 2, size: int = 8) -> dict:
    """The mse group's loss plane through seeds 1-2's curve, as `aecurves plane` writes it (reconstructions too)."""
    folder = root / "curves/mse_seed1-seed2/plane"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    axis = np.linspace(0, 1, grid)
    arrays = {"grid": np.stack(np.meshgrid(axis * 2.0, axis * 0.5, indexing="ij"), -1),
              "te_loss": rng.uniform(0.01, 0.05, (grid, grid)),
              "bend_coordinates": np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 0.0]]),
              "recon": rng.integers(0, 256, (grid, grid, n, 3, size, size), dtype=np.uint8),
              "recon_images": rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)}
    with open(folder / "plane.npz", "wb") as f:
        np.savez(f, **arrays)
    (folder / "plane.json").write_text(json.dumps({"format_version": 2, "kind": "curve", "summary": {},
                                                   "config": {}, "grid": {"points": grid}, "seconds": 1.0}))
    _png(folder / "plane.png")
    _edit_json(root / "study.json", lambda s: s["groups"]["mse"].update(
        plane={"seeds": [1, 2], "folder": "curves/mse_seed1-seed2/plane"}))
    return arrays


def _explorers(html_text: str) -> dict[str, tuple[str, dict]]:
    """Each path explorer of the page: {pair: (its markup, its embedded JSON)}."""
    found = {}
    for m in re.finditer(r'<section class="explorer" data-group="mse" data-pair="([\d-]+)">(.*?)</section>',
                         html_text, re.S):
        data = re.search(r'<script type="application/json" class="explorer-data">(.*?)</script>', m.group(2), re.S)
        found[m.group(1)] = (m.group(2), json.loads(data.group(1)))
    return found


def _png_pixels(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def _attrs(markup: str, tag: str, cls: str) -> list[dict]:
    """The attributes of each <tag> whose class matches the pattern `cls`, in the page's order."""
    found = [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(rf"<{tag}\b([^>]*)>", markup)]
    return [a for a in found if re.fullmatch(cls, a.get("class", ""))]


def test_the_explorer_shows_eval_jsons_series_and_the_stored_reconstructions(tmp_path):
    """Per pair, the explorer's JSON holds eval.json's ts and each path's held-out loss, PSNR and SSIM as the page
    shows them (4 significant digits; "–" where not measured), and the pixels of reconstructions.npz at every t;
    the page is written at the t nearest 0.5 with those values and images; report.md has no explorer."""
    root = make_study(tmp_path / "study")
    add_alignment(root)
    stored = add_reconstructions(root)
    report.write_report(root)
    html_text = (root / "report.html").read_text()
    explorers = _explorers(html_text)
    assert sorted(explorers) == ["1-2", "1-3", "2-3"]
    for pair, (markup, data) in explorers.items():
        a, b = pair.split("-")
        sources = {"": f"curves/mse_seed{a}-seed{b}/eval", "aligned_": f"curves/mse_seed{a}-seed{b}_aligned/eval"}
        series = {w: json.loads((root / folder / "eval.json").read_text())["series"] for w, folder in sources.items()}
        assert data["ts"] == series[""]["ts"] and len(data["ts"]) == 7
        assert list(data["paths"]) == ["segment", "curve", "aligned_segment", "aligned_curve"]
        i = data["initial"]
        assert i == 3 and data["ts_text"][i] == "0.500" and '<span class="explorer-t">0.500</span>' in markup
        slider, = _attrs(markup, "input", "explorer-slider")
        assert (slider["type"], slider["min"], slider["max"], slider["step"], slider["value"]) == \
            ("range", "0", "6", "1", "3")
        assert markup.count('<svg class="explorer-plot"') == 1
        values = re.findall(r'<td class="explorer-value"[^>]*>([^<]*)</td>', markup)
        cells = {(c["data-path"], c["data-metric"]): v for c, v in zip(_attrs(markup, "td", "explorer-value"), values)}
        for name, p in data["paths"].items():
            which, prefix = ("aligned_" if name.startswith("aligned") else ""), \
                ("segment_" if name.endswith("segment") else "")
            s = series[which]
            assert p["te_loss"] == [f"{v:.4g}" for v in s[prefix + "te_loss"]]
            assert p["te_psnr"] == [f"{v:.4g}" for v in s[prefix + "te_psnr"]]
            assert p["te_ssim"] == ([f"{v:.4g}" for v in s["te_ssim"]] if not prefix else ["–"] * 7)
            for m in ("te_loss", "te_psnr", "te_ssim"):
                assert cells[(name, m)] == p[m][i], (pair, name, m)
            pixels = stored[sources[which]][prefix[:-1] or "curve"]
            assert [[_png_pixels(u).tolist() for u in row] for row in p["images"]] == pixels.tolist()
            shown = [x for x in _attrs(markup, "img", "explorer-recon") if x["data-path"] == name]
            assert [x["data-index"] for x in shown] == ["0", "1"]
            assert [_png_pixels(x["src"]).tolist() for x in shown] == pixels[i].tolist()
        originals = _attrs(markup, "img", "explorer-original")
        assert [_png_pixels(x["src"]).tolist() for x in originals] == stored[sources[""]]["images"].tolist()
    assert html_text.count("<script>") == 1  # the one script that moves them all, at the end
    md = (root / "report.md").read_text()
    assert 'class="explorer' not in md and "data:image" not in md and "curve_reconstructions.png" in md


def test_an_evaluation_without_reconstructions_npz_is_still_reported(tmp_path, capsys):
    """An evaluation folder written before eval-curve stored reconstructions.npz: the explorer shows the numbers,
    says the pictures are not stored, and the static strips are all there; nothing is named damaged."""
    root = make_study(tmp_path / "study")
    record = report.write_report(root)
    assert record["damaged"] == {} and "damaged" not in capsys.readouterr().err
    html_text = (root / "report.html").read_text()
    explorers = _explorers(html_text)
    assert len(explorers) == 3
    for markup, data in explorers.values():
        assert list(data["paths"]) == ["segment", "curve"]
        assert all(p["images"] == [] for p in data["paths"].values())
        assert "explorer-recon" not in markup and "explorer-original" not in markup and "not stored" in markup
    assert html_text.count("_reconstructions.png") == 0  # figures embedded, not linked
    # each pair's curve and segment strips
    assert len(re.findall(r"<figcaption>[^<]*held-out images reconstructed along", html_text)) == 6


def test_a_damaged_reconstructions_npz_is_named_and_the_rest_reported(tmp_path, capsys):
    root = make_study(tmp_path / "study")
    add_reconstructions(root)
    rel = "curves/mse_seed1-seed3/eval/reconstructions.npz"
    with np.load(root / rel) as npz:
        arrays = dict(npz)
    with open(root / rel, "wb") as f:
        np.savez(f, **{**arrays, "curve": arrays["curve"][:3]})  # fewer t than ts
    record = report.write_report(root)
    assert "curve (3, 2, 3, 8, 8) is not one reconstruction" in record["damaged"][rel]
    assert rel in capsys.readouterr().err
    explorers = _explorers((root / "report.html").read_text())
    assert explorers["1-3"][1]["paths"]["curve"]["images"] == [] and explorers["1-2"][1]["paths"]["curve"]["images"]


def test_the_plane_explorer_picks_each_grid_points_network(tmp_path):
    root = make_study(tmp_path / "study")
    arrays = add_plane(root)
    report.write_report(root)
    html_text = (root / "report.html").read_text()
    markup = re.search(r'<section class="plane-explorer" data-group="mse">(.*?)</section>', html_text, re.S).group(1)
    cells = _attrs(markup, "rect", "plane-cell(?: picked)?")
    assert sorted((int(c["data-i"]), int(c["data-j"])) for c in cells) == [(i, j) for i in range(3) for j in range(3)]
    data = json.loads(re.search(r'class="plane-data">(.*?)</script>', markup, re.S).group(1))
    assert data["loss"] == [[f"{v:.4g}" for v in row] for row in arrays["te_loss"]]
    assert data["points"][2][1] == "(2.000, 0.250)"
    assert [[[_png_pixels(u).tolist() for u in node] for node in row] for row in data["images"]] == \
        arrays["recon"].tolist()
    i, j = data["initial"]
    assert (i, j) == (1, 2)  # the node nearest the middle point, (1.0, 0.5)
    assert f'<span class="plane-point">{data["points"][i][j]}</span>' in markup
    assert f'<span class="plane-loss">{data["loss"][i][j]}</span>' in markup
    shown = _attrs(markup, "img", "plane-recon")
    assert [_png_pixels(x["src"]).tolist() for x in shown] == arrays["recon"][i, j].tolist()


def test_a_linked_reconstructions_npz_is_never_read_into_the_page(tmp_path, capsys):
    """The explorers' pictures come from the study folder only: a reconstructions.npz that is a link (to another
    study's pixels) stops the report before anything is written, and one linked in after that check, or named
    through '..', is named damaged and never embedded."""
    from aecurves.cli import main
    from aecurves.report.inputs import Inputs, reconstruction_arrays

    root = make_study(tmp_path / "study")
    add_reconstructions(root)
    rel = "curves/mse_seed1-seed2/eval/reconstructions.npz"
    elsewhere = tmp_path / "elsewhere.npz"
    (root / rel).rename(elsewhere)
    (root / rel).symlink_to(elsewhere)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert "nothing was changed" in err and "Traceback" not in err and not (root / "report.html").exists()
    inputs = Inputs(root)
    for spelling in (rel, "curves/mse_seed1-seed2/eval/../eval/reconstructions.npz", "../elsewhere.npz"):
        assert inputs.load(spelling, reconstruction_arrays) is None, spelling
        assert "outside the study folder" in inputs.damaged[spelling], spelling


def test_pictures_are_embedded_at_some_t_and_every_other_shows_the_nearest():
    from aecurves.report.explorer import pictured

    assert pictured(7, 21, 3) == list(range(7))  # few enough: every t has its own
    picture = pictured(61, 21, 30)
    assert sorted(set(picture)) == list(range(0, 61, 3)) and 30 in picture  # 21 spread evenly, the ends included
    assert all(abs(picture[k] - k) == min(abs(c - k) for c in set(picture)) for k in range(61))
    assert pictured(7, 3, 2) == [0, 0, 2, 3, 3, 6, 6]  # 0, 3, 6 and the kept 2; ties go to the lower
    assert pictured(21, 11, 10, 13)[13] == 13 and len(set(pictured(21, 11, 10, 13))) == 12


def test_past_the_limit_the_page_embeds_pictures_at_some_t_only(tmp_path, monkeypatch):
    """With more t than explorer.PATH_PICTURES, the JSON holds the pictures of the chosen t only (null elsewhere),
    each equal to reconstructions.npz's at that t, and `picture` maps every t to the chosen one nearest it."""
    from aecurves.report import explorer

    monkeypatch.setattr(explorer, "PATH_PICTURES", 3)
    root = make_study(tmp_path / "study")
    stored = add_reconstructions(root)
    report.write_report(root)
    for pair, (markup, data) in _explorers((root / "report.html").read_text()).items():
        a, b = pair.split("-")
        pixels = stored[f"curves/mse_seed{a}-seed{b}/eval"]
        assert data["picture"] == [0, 0, 3, 3, 3, 6, 6]  # 0, 3, 6 (3: the t nearest 0.5)
        for name, p in data["paths"].items():
            assert [k for k, row in enumerate(p["images"]) if row is not None] == [0, 3, 6]
            for k in (0, 3, 6):
                assert [_png_pixels(u).tolist() for u in p["images"][k]] == pixels[name][k].tolist()
        assert '<span class="explorer-picture-t muted"></span>' in markup  # the initial t has its own


def test_report_html_grows_by_about_the_pictures_it_embeds(tmp_path):
    """Sanity bound on report.html's size: the explorers add each stored picture about once (in their JSON; the
    initial t's also in the page), not more."""
    plain = make_study(tmp_path / "plain")
    report.write_report(plain)
    root = make_study(tmp_path / "study")
    add_reconstructions(root, n=4, size=32)
    report.write_report(root)
    html_text = (root / "report.html").read_text()
    uris = [u for _, data in _explorers(html_text).values() for p in data["paths"].values() for row in p["images"]
            for u in row]
    assert len(uris) == 3 * 2 * 7 * 4
    grown = len(html_text) - len((plain / "report.html").read_text())
    assert sum(map(len, uris)) < grown < 1.4 * sum(map(len, uris)) + 60_000
