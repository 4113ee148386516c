"""Tests for aecurves.report: a report made from a study folder's files alone, numbers and conclusions."""

import errno
import html
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
from aecurves.metrics import summarize


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


def make_study(root: Path, bumps=((0.02, 0.001), (0.03, 0.002), (0.025, 0.0005)), vgg_skipped=True,
               losses=("mse",), n_train=86, n_test=14, psnr=20.0, device="cpu", precision="bf16",
               provenance=None) -> Path:
    """A study folder as `aecurves study` leaves it (a group per loss in `losses`, seeds 1-3; the vgg group skipped
    unless it is in `losses`), made by hand. The stages' files record what ran: eval-curve on `device` with
    n_train training / n_test held-out images, training in `precision`; the request was auto / 8192 images."""
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
    ends = {1: 0.010, 2: 0.012, 3: 0.011}
    for loss in losses:
        scale = 10.0 if loss == "vgg" else 1.0  # a perceptual loss is not the MSE
        for s in seeds:
            folder = root / f"endpoints/{loss}_seed{s}"
            folder.mkdir(parents=True)
            rows = [{"epoch": e, "train_loss": 0.02, "test_loss": ends[s] + 0.001 * (30 - e), "test_mse": ends[s],
                     "test_psnr": 19.0, "precision": precision} for e in (29, 30)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            _endpoint_png(folder / "reconstructions.png", s)
        ts = np.linspace(0, 1, 7)
        for (a, b), (seg_bump, cur_bump) in zip(pairs, bumps):
            folder = root / f"curves/{loss}_seed{a}-seed{b}/eval"
            curve = _series(ts, (ends[a], ends[b]), cur_bump, psnr, scale)
            segment = _series(ts, (ends[a], ends[b]), seg_bump, psnr, scale)
            summary = {**summarize(curve), **{"segment_" + k: v for k, v in summarize(segment).items()}}
            results = {**curve, **{"segment_" + k: v for k, v in segment.items()}}
            folder.mkdir(parents=True)
            (folder.parent / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "precision": precision}) + "\n")
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
    return root


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
    return dict(_md_table(md, "## Configuration")[1:])[name]


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
        assert report.md_text(line) in md


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
    def psnr_line(**kw):
        return next(line for line in report.summary_sentences("mse", _group([0.02], [0.001], **kw))
                    if "worst held-out PSNR" in line)

    good, bad = psnr_line(psnr_curves=17.0, psnr_ends=17.2), psnr_line(psnr_curves=15.0, psnr_ends=17.2)
    assert "about as well as the endpoints" in good and "15.00 dB" in bad and "by up to 2.20 dB" in bad


def test_sentences_say_which_path_kinds_have_intervals_too_wide_to_conclude():
    from aecurves.stats import mean_interval

    seg, cur = [0.02, 0.021, 0.019], [0.001, -0.002, 0.0015]
    g = _group(seg, cur)
    removed = [(s - c) / s for s, c in zip(seg, cur)]
    none = mean_interval([])  # no extra-trained endpoints in this study
    g["summary"]["paths"] = {
        "segment": {"barrier": mean_interval(seg), "removed": mean_interval([0, 0, 0]), "best_vs_extra": none},
        "curve": {"barrier": mean_interval(cur), "removed": mean_interval(removed), "best_vs_extra": none}}
    g["summary"]["bootstrap"] = {"segment": {"pairs": 3, "above_zero": 3}, "curve": {"pairs": 3, "above_zero": 1}}
    text = " ".join(report.summary_sentences("mse", g))
    r = mean_interval(cur)
    assert r["lo"] < 0 < r["hi"]  # the curves' barrier interval includes 0, the segments' does not
    assert f"curve {report.fnum(r['mean'])} [{report.fnum(r['lo'])}, {report.fnum(r['hi'])}]" in text
    assert "For the curves the interval includes 0: too wide to tell from 3 pairs" in text
    assert "straight segments the interval" not in text
    assert "above 0 for 3 of 3 straight segments, 1 of 3 curves; for the others it includes 0" in text
    share = mean_interval(removed)
    assert (f"the share removed by the curves is {report.fpct(share['mean'])} (95% interval "
            f"{report.fpct(share['lo'])} to {report.fpct(share['hi'])})") in text
    # every pair's bootstrap above 0: nothing to caution about
    g["summary"]["bootstrap"]["curve"]["above_zero"] = 3
    assert "for the others" not in " ".join(report.summary_sentences("mse", g))


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
    assert "Not recorded: this study.json has no provenance" in md and "Provenance (versions, host" in md


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
    mse = _md_table(md, "## mse group")
    assert mse[0] == ["autoencoder", "train MSE", "test MSE", "train PSNR (dB)", "test PSNR (dB)", "epochs",
                      "last-epoch gain", "gain from extra training"]
    ev = record["groups"]["mse"]["endpoints"][0]["eval"]
    assert mse[1][:5] == ["mse seed 1", report.fnum(ev["tr_loss"]), report.fnum(ev["te_loss"]),
                          report.fdb(ev["tr_psnr"]), report.fdb(ev["te_psnr"])]
    vgg = _md_table(md, "## vgg group")
    assert vgg[0][:7] == ["autoencoder", "train loss (perceptual)", "test loss (perceptual)", "train MSE", "test MSE",
                          "train PSNR (dB)", "test PSNR (dB)"]
    ev = record["groups"]["vgg"]["endpoints"][0]["eval"]
    assert ev["te_loss"] == pytest.approx(10 * ev["te_mse"])
    assert vgg[1][2] == report.fnum(ev["te_loss"]) and vgg[1][4] == report.fnum(ev["te_mse"])
    # the training log's held-out figure only in the footnote, named as such
    assert not any("training log" in h for h in mse[0] + vgg[0])
    footnote = md[md.index("## mse group"):md.index("## vgg group")]
    assert "The training log (metrics.jsonl) gives another held-out MSE, 0.01 (seed 1), 0.012 (seed 2)" in footnote
    # the paths' table names the quantity once too
    assert _md_table(md, "### Seeds 1 and 2")[0][1] == "max test MSE"


@pytest.mark.parametrize("n_train, psnr, expected", [
    (86, 20.0, "weak autoencoders on a tiny dataset (under 1000 training images; held-out PSNR under 22 dB)"),
    (86, 30.0, ": autoencoders on a tiny dataset (under 1000 training images), enough to show the method"),
    (50000, 20.0, ": weak autoencoders (held-out PSNR under 22 dB), enough to show the method, not a result about "
                  "well-trained models."),
    (50000, 30.0, None),
])
def test_caveat_states_the_data_and_the_endpoints(tmp_path, n_train, psnr, expected):
    root = make_study(tmp_path / "study", n_train=n_train, n_test=14, psnr=psnr)
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    html = (root / "report.html").read_text()
    g = record["groups"]["mse"]
    if expected is None:
        assert g["caveat"] is None and "These mse endpoints were trained on" not in md
        return
    psnrs = [e["eval"]["te_psnr"] for e in g["endpoints"]]
    ratio = np.mean([e["eval"]["te_mse"] / e["eval"]["tr_mse"] for e in g["endpoints"]])
    assert g["caveat"] == (f"These mse endpoints were trained on {n_train} images (14 held out); their held-out PSNR "
                           f"is {report.fdb(min(psnrs))} to {report.fdb(max(psnrs))} dB and their train MSE is "
                           f"{ratio:.1f}× below the test MSE" + g["caveat"][g["caveat"].index(":"):])
    assert expected in g["caveat"] and g["caveat"] in record["summary_lines"]
    assert f"<p class=\"box warn\">{g['caveat']}</p>" in html


def test_html_tables_scroll_inside_their_box(tmp_path):
    root = make_study(tmp_path / "study", provenance=PROVENANCE)
    report.write_report(root)
    html = (root / "report.html").read_text()
    assert html.count("<table>") >= 8
    assert html.count('<div class="scroll"><table>') == html.count("<table") == html.count("</table></div>")
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


def test_figures_name_their_pairs(tmp_path, monkeypatch):
    drawn = []
    original = plots.plot_loss_along_paths
    monkeypatch.setattr(plots, "plot_loss_along_paths",
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
    assert md.startswith("# Mode connectivity") and "\n## Summary\n" in md and "\n| setting | value |\n" in md
    assert "![" in md and "(report_files/mse_loss_along_paths.png)" in md
    assert _setting(md, "data folder") == " ".join(HOSTILE.split()) and _setting(md, "model factory") == " ".join(
        HOSTILE.split())
    assert f"``aecurves report '{root}'``" in md  # the command as code, the folder quoted for the shell
    html_text = (root / "report.html").read_text()
    assert "<script>" not in html_text and f"<code>aecurves report &#x27;{html.escape(str(root))[:-4]}" in html_text


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
    assert rows["width"] == "does not apply (a setting of the built-in model)" and rows["bottleneck"] == "64"
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
    (_set_summary("te_barrier", "0.02"), 'summary.te_barrier is "0.02", not a number'),
    (_set_summary("te_psnr_min", True), "summary.te_psnr_min is true, not a number"),
    (_drop_summary("te_psnr_start"), "summary has no te_psnr_start"),
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
    assert "The curves remove most of the barrier for every pair" in md  # the other two pairs are reported


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
    from elsewhere: neither through '..' in study.json nor through a link inside the folder."""
    root = make_study(tmp_path / "study")
    secret = tmp_path / "secret"
    (secret / "eval").mkdir(parents=True)
    shutil.copytree(root / "curves/mse_seed1-seed2/eval", secret / "eval", dirs_exist_ok=True)
    _edit_json(secret / "eval/eval.json", lambda r: r.update(notes=["SECRET NOTE"]))

    def point_out(s):
        s["groups"]["mse"]["pairs"][0]["eval"] = "../secret/eval"

    _edit_json(root / "study.json", point_out)
    picture = root / "endpoints/mse_seed2/reconstructions.png"
    picture.unlink()
    picture.symlink_to(tmp_path / "private.png")
    _png(tmp_path / "private.png")
    assert main(["report", str(root)]) == 0
    err = capsys.readouterr().err
    assert "outside the study folder" in err and "Traceback" not in err
    record = json.loads((root / "report.json").read_text())
    assert "../secret/eval/eval.json" in record["damaged"]
    assert "endpoints/mse_seed2/reconstructions.png" in record["damaged"]
    for name in ("report.md", "report.html"):
        assert "SECRET NOTE" not in (root / name).read_text()
    private = (tmp_path / "private.png").read_bytes()
    assert all(p.read_bytes() != private for p in (root / "report_files").iterdir())


# ----------------------------------------------------------------------------------------------------------
# convergence from the extra training, and the equal-budget ensembles (issue 20)

ENDS = {1: 0.010, 2: 0.012, 3: 0.011}  # make_study's endpoints' held-out loss


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
    line = next(x for x in record["summary_lines"] if "converged" in x)
    assert "trained on for 5 more epochs" in line and report.fpct(max(gains.values())) in line
    if converged:
        assert line.startswith("The mse endpoints had converged by the study's measure")
        assert "within the 2.0% threshold" in line and "endpoints had not converged" not in md
    else:
        assert line.startswith("The mse endpoints had not converged") and "1 of 3" in line and "(seed 1)" in line
        assert "comparisons with unconverged networks" in line
        assert md.count(report.md_text(line)) == 2  # in the summary and, as a warning, beside the endpoints
    rows = _md_table(md, "## mse group")
    assert rows[0][-1] == "gain from extra training" and rows[1][-1] == report.fpct(gains[1])
    # the last-epoch gain is shown, but never taken for convergence
    assert "near 0 by construction" in md


def test_convergence_without_extra_training_is_not_measured(tmp_path):
    root = make_study(tmp_path / "study")  # no baselines: --no-extra-training
    record = report.write_report(root)
    c = record["groups"]["mse"]["convergence"]
    assert (c["measured"], c["converged"], c["extra_training"]) == (False, None, False)
    line = next(x for x in record["summary_lines"] if "onvergence" in x)
    assert line.startswith("Convergence of the mse endpoints was not measured") and "--no-extra-training" in line
    md = (root / "report.md").read_text()
    assert "had converged" not in md and "had not converged" not in md
    assert "convergence was not measured" in md  # the endpoints' footnote
    # extra training asked for, but its evaluations not there yet
    c = report.convergence([{"seed": 1, "eval": {"te_loss": 0.01}}], True, 5)
    assert report.convergence_sentence("mse", c).startswith("Convergence of the mse endpoints is not measured yet")


def _eb_rows(mse: dict, psnr_offset: float = 0.0) -> dict:
    return {k: {"mse": v, "psnr": 20 - 10 * np.log10(v / 0.01) + psnr_offset, "ssim": 0.5, "members": 2,
                "budget_epochs": {0: 0, 1: 5, 2: 10}[dict((r[0], r[2]) for r in report.EQUAL_BUDGET_ROWS)[k]]}
            for k, v in mse.items()}


def test_equal_budget_winner_with_its_interval_over_pairs():
    from aecurves.stats import mean_interval

    keys = [k for k, _, _ in report.EQUAL_BUDGET_ROWS]
    per_pair = [dict(zip(keys, v)) for v in ([0.0100, 0.0105, 0.0090, 0.0097, 0.0096, 0.0085, 0.0092],
                                             [0.0110, 0.0116, 0.0101, 0.0106, 0.0108, 0.0094, 0.0103],
                                             [0.0104, 0.0110, 0.0093, 0.0100, 0.0099, 0.0090, 0.0095])]
    pairs = [{"available": True, "equal_budget": {"rows": _eb_rows(m)}} for m in per_pair]
    eb = report.equal_budget_summary(pairs, 5)
    assert eb["ranked"][:3] == ["extra_average", "fge_pooled", "extra_best"]
    assert (eb["winner"], eb["runner_up"]) == ("extra_average", "fge_pooled")
    expected = mean_interval([(m["extra_average"] - m["fge_pooled"]) / m["fge_pooled"] for m in per_pair])
    assert eb["winner_vs_runner_up"] == expected and expected["hi"] < 0
    assert eb["rows"]["fge_pooled"]["mse"] == mean_interval([m["fge_pooled"] for m in per_pair])
    assert eb["rows"]["fge_pooled"]["budget_epochs"] == 10 and eb["rows"]["curve_ensemble"]["budget_epochs"] == 5
    # at one curve's budget (5 epochs): the better extra-trained endpoint against the curve ensemble
    assert (eb["best_at_one_curve"], eb["one_curve_other"]) == ("extra_best", "curve_ensemble")
    one = mean_interval([(m["extra_best"] - m["curve_ensemble"]) / m["curve_ensemble"] for m in per_pair])
    assert eb["one_curve_vs_other"] == one
    first, second = report.equal_budget_sentences(eb)
    assert first.startswith("Ensembles at equal training budget (held-out MSE over 3 pairs")
    assert ("(d) the two extra-trained endpoints averaged (10 epochs) reconstructs best, MSE "
            f"{report.fnum(np.mean([m['extra_average'] for m in per_pair]))} on average; per pair its MSE is "
            f"{report.fsigned(expected['mean'])} relative to the runner-up, (c) FGE pooled from both endpoints' runs "
            f"(10 epochs) (95% interval {report.fpct(expected['lo'])} to {report.fpct(expected['hi'])})") in first
    assert "By held-out PSNR" not in first  # the same winner
    assert second.startswith("At one curve's budget (5 epochs) the best is (e) the better extra-trained endpoint: "
                             f"per pair its MSE is {report.fsigned(one['mean'])} relative to (a) the curve ensemble's")
    # an interval that includes 0 is said to be too wide
    per_pair[1]["extra_average"], per_pair[1]["fge_pooled"] = 0.0102, 0.0100
    eb = report.equal_budget_summary([{"available": True, "equal_budget": {"rows": _eb_rows(m)}}
                                      for m in per_pair], 5)
    assert "includes 0, too wide to conclude from 3 pairs" in report.equal_budget_sentences(eb)[0]


def test_equal_budget_table_from_the_files(tmp_path):
    """The table's numbers are the files': (a), (b) from the curves' eval.json, (c), (d) from ensembles.json, (e) from
    the baselines; the budget from --curve-epochs; the over-pairs row the mean and interval of the pairs'."""
    from aecurves.stats import mean_interval

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
    assert row[1:4] == ["8 (2 × 4)", "3", report.finterval(mean_interval(list(pooled.values())), report.fnum)]
    assert next(r for r in over if r[0].startswith("(b)"))[1] == "0"
    assert any(line.startswith("Ensembles at equal training budget") for line in record["summary_lines"])
    # the files it read are the report's inputs
    assert "ensembles/mse_seed1-seed3/ensembles.json" in report.input_files(root)
    assert "fge/mse_seed2/fge.json" in report.input_files(root)
