"""Tests for aecurves.report: a report made from a study folder's files alone, numbers and conclusions."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aecurves import report
from aecurves.errors import UserError
from aecurves.metrics import summarize


def _png(path: Path, size=(40, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _series(ts, loss_at_ends, bump, psnr0=20.0):
    """A path whose loss rises by `bump` above the chord in the middle."""
    l0, l1 = loss_at_ends
    loss = (1 - ts) * l0 + ts * l1 + bump * np.sin(np.pi * ts) ** 2
    psnr = psnr0 - 10 * np.log10(loss / l0)
    return {"ts": ts, "dl": np.r_[0.0, np.full(len(ts) - 1, 0.5)], "tr_loss": loss * 0.9, "te_loss": loss,
            "tr_mse": loss * 0.9, "te_mse": loss, "tr_psnr": psnr + 0.3, "te_psnr": psnr}


def make_study(root: Path, bumps=((0.02, 0.001), (0.03, 0.002), (0.025, 0.0005)), vgg_skipped=True) -> Path:
    """A study folder as `aecurves study` leaves it (mse group, seeds 1-3), made by hand."""
    seeds = [1, 2, 3]
    pairs = [(1, 2), (1, 3), (2, 3)]
    groups = {"mse": {"status": "run", "seeds": seeds,
                      "endpoints": {str(s): f"endpoints/mse_seed{s}" for s in seeds},
                      "pairs": [{"seeds": [a, b], "curve": f"curves/mse_seed{a}-seed{b}",
                                 "eval": f"curves/mse_seed{a}-seed{b}/eval"} for a, b in pairs]}}
    if vgg_skipped:
        groups["vgg"] = {"status": "skipped", "reason": "The VGG16 ImageNet weights for the perceptual loss are not "
                         "available (offline). Copy the file somewhere.", "remedy": "Re-run with --vgg-weights PATH."}
    config = {"preset": "demo", "dataset": "lfw", "image_size": 32, "losses": list(groups), "seeds": seeds,
              "curve": "Bezier", "num_bends": 3, "num_points": 7, "epochs": 30, "out": str(root)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"config": config, "groups": groups, "stages": []}))
    ends = {1: 0.010, 2: 0.012, 3: 0.011}
    for s in seeds:
        folder = root / f"endpoints/mse_seed{s}"
        folder.mkdir(parents=True)
        rows = [{"epoch": e, "train_loss": 0.02, "test_loss": ends[s] + 0.001 * (30 - e), "test_mse": ends[s],
                 "test_psnr": 19.0} for e in (29, 30)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _png(folder / "reconstructions.png")
    ts = np.linspace(0, 1, 7)
    for (a, b), (seg_bump, cur_bump) in zip(pairs, bumps):
        folder = root / f"curves/mse_seed{a}-seed{b}/eval"
        curve = _series(ts, (ends[a], ends[b]), cur_bump)
        segment = _series(ts, (ends[a], ends[b]), seg_bump)
        summary = {**summarize(curve), **{"segment_" + k: v for k, v in summarize(segment).items()}}
        results = {**curve, **{"segment_" + k: v for k, v in segment.items()}}
        folder.mkdir(parents=True)
        with open(folder / "curve.npz", "wb") as f:
            np.savez(f, **results, **summary)
        (folder / "eval.json").write_text(json.dumps({
            "kind": "curve", "path": {"curve": "Bezier", "num_bends": 3}, "segment_evaluated": True,
            "num_points": 7, "notes": ["a note"], "loss_description": "mean squared error", "perceptual": False,
            "summary": summary, "series": {k: np.asarray(v).tolist() for k, v in results.items()},
            "config": {}, "files": {}}))
        _png(folder / "reconstructions.png", (120, 40))
        _png(folder / "reconstructions_segment.png", (120, 40))
    return root


def test_report_from_files_alone(tmp_path):
    root = make_study(tmp_path / "study")
    record = report.write_report(root)
    for name in ("report.html", "report.md", "report.json", "report_files/mse_loss_along_paths.png",
                 "report_files/mse_seed1_reconstructions.png",
                 "report_files/mse_seed2-seed3_segment_reconstructions.png"):
        assert (root / name).is_file(), name
    saved = json.loads((root / "report.json").read_text())
    assert saved["inputs_fingerprint"] == record["inputs_fingerprint"] == report.inputs_fingerprint(root)
    g = saved["groups"]["mse"]
    ev = json.loads((root / "curves/mse_seed1-seed3/eval/eval.json").read_text())["summary"]
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

    md = (root / "report.md").read_text()
    assert f"| segment | {report.fnum(ev['segment_te_loss_max'])} | {report.fnum(ev['segment_te_barrier'])} |" in md
    assert "The curves remove most of the barrier for every pair" in md
    assert "The vgg group was skipped" in md and "Re-run with --vgg-weights PATH." in md
    assert "![" in md and "(report_files/mse_loss_along_paths.png)" in md
    html = (root / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert html.count("data:image/png;base64,") == 1 + 3 + 6  # group figure, endpoints, strips
    assert 'src="report_files' not in html
    for line in saved["summary_lines"]:
        assert line in md


def test_fingerprint_follows_the_input_files(tmp_path):
    root = make_study(tmp_path / "study")
    before = report.inputs_fingerprint(root)
    assert report.inputs_fingerprint(root) == before
    path = root / "curves/mse_seed1-seed2/eval/eval.json"
    path.write_text(path.read_text().replace('"a note"', '"another note"'))
    assert report.inputs_fingerprint(root) != before


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


def _group(seg, cur, psnr_curves=17.0, psnr_ends=17.2, ends_loss=0.02):
    removed = [(s - c) / s for s, c in zip(seg, cur)]
    return {"status": "run", "summary": {
        "pairs": len(seg), "pairs_evaluated": len(seg), "endpoint_te_loss_mean": ends_loss,
        "segment_te_barrier_mean": float(np.mean(seg)), "segment_te_barrier_min": min(seg),
        "segment_te_barrier_max": max(seg), "curve_te_barrier_mean": float(np.mean(cur)),
        "curve_te_barrier_min": min(cur), "curve_te_barrier_max": max(cur),
        "barrier_removed_mean": float(np.mean(removed)), "barrier_removed_min": min(removed),
        "worst_psnr_curves": psnr_curves, "worst_psnr_endpoints": psnr_ends, "worst_psnr_segments": 13.0,
        "segment_barrier_relative": float(np.mean(seg)) / ends_loss}}


@pytest.mark.parametrize("seg, cur, expected", [
    ([0.02, 0.02], [0.001, 0.002], "remove most of the barrier for every pair"),
    ([0.02, 0.02], [0.0, 0.008], "On average the curves remove most of the barrier"),
    ([0.02, 0.02], [0.01, 0.01], "reduce the barrier by 50.0% on average"),
    ([0.02, 0.02], [0.019, 0.018], "The curves do not remove the barrier"),
    ([0.0005, 0.0005], [0.0, 0.0], "The segments show no clear barrier"),
])
def test_conclusions_follow_the_numbers(seg, cur, expected):
    lines = report.summary_sentences("mse", _group(seg, cur))
    assert any(expected in line for line in lines), lines
    assert report.fnum(float(np.mean(seg))) in lines[0] and report.fnum(float(np.mean(cur))) in lines[0]


def test_psnr_conclusion_follows_the_numbers():
    good = report.summary_sentences("mse", _group([0.02], [0.001], psnr_curves=17.0, psnr_ends=17.2))[-1]
    bad = report.summary_sentences("mse", _group([0.02], [0.001], psnr_curves=15.0, psnr_ends=17.2))[-1]
    assert "about as well as the endpoints" in good and "15.00 dB" in bad and "by up to 2.20 dB" in bad


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
    assert "BatchNorm statistics from 500 and train metrics from 400 of the 500 training images (fixed subsets) at every point. These subsets are smaller than the defaults" in md
    assert "last-epoch gain" in md and report.fpct(0.001 / 0.011) in md
    for folder in (root / "curves").glob("*/eval"):
        record = json.loads((folder / "eval.json").read_text())
        record["train_metric_images"] = 500
        (folder / "eval.json").write_text(json.dumps(record))
    report.write_report(root)
    assert "from all 500 training images at every point, which is eval-curve --full" in (root / "report.md").read_text()
