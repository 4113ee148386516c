"""Tests for `aecurves study`: end to end through the CLI, resume, --force, changed settings, offline VGG."""

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from aecurves import config as config_lib
from aecurves import report
from aecurves.checkpoint import load_checkpoint
from aecurves.cli import parse
from aecurves.commands import study
from aecurves.config import StudyConfig, as_record, make
from aecurves.errors import UserError
from aecurves.records import EvalRecord

from conftest import run_cli

# Tiny settings on synthetic data, fp32 for exactness: 2 endpoints, each also trained on as long as a curve and
# FGE'd as long (cycle 2 in 2 curve epochs: 1 snapshot each); B aligned to A; a curve to B and one to the aligned B;
# 2 evaluations (curve + segment), the extra-trained pair, and the pair's equal-budget ensembles.
SMALL = ["--dataset", "synthetic", "--image-size", 32, "--limit", 256, "--width", 8, "--latent-dim", 16,
         "--batch-size", 32, "--lr", 3e-3, "--epochs", 3, "--curve-epochs", 2, "--curve-lr", 3e-3, "--num-points", 5,
         "--bn-images", 64, "--train-images", 64, "--losses", "mse", "--seeds", "1,2", "--precision", "fp32",
         "--device", "cpu", "--vgg-weights", "random", "--plane-grid", 4, "--no-progress"]
ENDPOINTS = ("endpoints/mse_seed1/checkpoint.pt", "endpoints/mse_seed2/checkpoint.pt")
CURVE = "curves/mse_seed1-seed2/checkpoint.pt"
EVAL = "curves/mse_seed1-seed2/eval"
ALIGNED = "aligned/mse_seed2-to-seed1/checkpoint.pt"
ALIGNED_CURVE = "curves/mse_seed1-seed2_aligned/checkpoint.pt"
ALIGNED_EVAL = "curves/mse_seed1-seed2_aligned/eval"
EXTRAS = ("endpoints/mse_seed1_extra/checkpoint.pt", "endpoints/mse_seed2_extra/checkpoint.pt")
BASELINE = "baselines/mse_seed1-seed2"
FGES = ("fge/mse_seed1", "fge/mse_seed2")
ENSEMBLES = "ensembles/mse_seed1-seed2"
STAGES = ["endpoint:mse:1", "endpoint:mse:2", "extra:mse:1", "extra:mse:2", "fge:mse:1", "fge:mse:2", "align:mse:1-2",
          "curve:mse:1-2", "aligned-curve:mse:1-2", "eval:mse:1-2", "aligned-eval:mse:1-2", "baseline:mse:1-2",
          "ensembles:mse:1-2", "plane:mse:1-2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, torch's spinning OpenMP threads make these tiny runs
    up to 15x slower when other processes hold the cores; results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stamp(root: Path, rel: str) -> tuple:
    p = root / rel
    return p.stat().st_mtime_ns, _sha(p)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "s"
    assert run_cli("study", *SMALL, "--out", out) == 0
    return out


@pytest.fixture
def copy_of(finished, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(finished, dest)
    return dest


def _md_row(md: str, first_cell: str, after: str = "") -> list[str]:
    """Cells of the first markdown table row starting with `first_cell` (after the text `after`), as a reader sees
    them (report.md escapes its text)."""
    import html
    import re

    text = md[md.index(after):] if after else md
    for line in text.splitlines():
        cells = [html.unescape(re.sub(r"\\(.)", r"\1", c.strip()))
                 for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in the markdown")


@pytest.mark.slow
def test_study_end_to_end_layout_and_report_numbers(finished):
    root = finished
    for rel in (*ENDPOINTS, "endpoints/mse_seed1/metrics.jsonl", "endpoints/mse_seed1/reconstructions.png", CURVE,
                "curves/mse_seed1-seed2/metrics.jsonl", f"{EVAL}/eval.json", f"{EVAL}/curve.npz",
                f"{EVAL}/loss_along_path.png", f"{EVAL}/reconstructions.png", f"{EVAL}/reconstructions_segment.png",
                "study.json", "report.html", "report.md", "report.json", "report_files/mse_loss_along_paths.png",
                "endpoints/mse_seed1/study_stage.json", f"{EVAL}/study_stage.json", ALIGNED, ALIGNED_CURVE, *EXTRAS,
                f"{ALIGNED_EVAL}/eval.json", f"{ALIGNED_EVAL}/reconstructions_segment.png", f"{BASELINE}/eval.json",
                "report_files/mse_seed1-seed2_aligned_segment_reconstructions.png",
                "curves/mse_seed1-seed2/plane/plane.json", "report_files/mse_plane_seed1-seed2.png"):
        assert (root / rel).is_file(), rel
    study_json = json.loads((root / "study.json").read_text())
    cfg = study_json["config"]
    prov = study_json["provenance"]  # what ran where, and how long each stage took
    import torch

    import aecurves

    assert prov["aecurves"] == aecurves.__version__ and prov["torch"] == torch.__version__
    assert prov["device"].startswith("cpu (") and prov["precision"] == "fp32" and prov["host"]
    assert list(prov["stage_seconds"]) == STAGES
    stages = prov["stage_seconds"].values()  # each rounded to 0.1 s, like the wall time
    assert prov["wall_seconds"] >= sum(stages) - 0.05 * len(stages) > 0 and prov["finished"] >= prov["started"]
    _, again = parse(["study", "--config", str(root / "study.json")])  # a study's record reproduces it
    assert study.resolved_config(again) == cfg
    assert cfg["epochs"] == 3 and cfg["curve_epochs"] == 2 and cfg["seeds"] == [1, 2] and cfg["losses"] == ["mse"]
    assert cfg["curve"] == "Bezier" and cfg["num_bends"] == 3 and cfg["preset"] == "demo"
    assert load_checkpoint(root / ENDPOINTS[0], "endpoint")["epoch"] == 3
    curve = load_checkpoint(root / CURVE, "curve")
    assert curve["epoch"] == 2 and curve["args"]["fix_start"] and curve["args"]["fix_end"]

    record = json.loads((root / EVAL / "eval.json").read_text())
    assert record["num_points"] == 5 and record["segment_evaluated"]
    assert record["format_version"] == EvalRecord.FORMAT and set(record["paths"]) == {"curve", "segment"}
    summary = EvalRecord.from_json(record).flat_summary()  # curve.npz's flat keys
    with np.load(root / EVAL / "curve.npz") as npz:
        assert len(npz["ts"]) == 5 and len(npz["segment_ts"]) == 5
        for k in ("te_barrier", "segment_te_barrier", "length", "segment_length", "te_loss_max"):
            assert float(npz[k]) == pytest.approx(summary[k], rel=1e-12)

    rep = json.loads((root / "report.json").read_text())
    g = rep["groups"]["mse"]
    pair = g["pairs"][0]
    assert pair["curve"]["te_barrier"] == summary["te_barrier"]
    assert pair["segment"]["te_barrier"] == summary["segment_te_barrier"]
    assert pair["curve"]["length"] == summary["length"] and pair["segment"]["length"] == summary["segment_length"]
    assert pair["curve"]["te_loss_max"] == summary["te_loss_max"]
    removed = (summary["segment_te_barrier"] - summary["te_barrier"]) / summary["segment_te_barrier"]
    assert pair["barrier_removed"] == pytest.approx(removed)
    e1, e2 = g["endpoints"]
    assert e1["eval"]["te_loss"] == summary["te_loss_start"] and e2["eval"]["te_psnr"] == summary["te_psnr_end"]
    last = json.loads((root / "endpoints/mse_seed1/metrics.jsonl").read_text().splitlines()[-1])
    assert e1["training"]["test_loss"] == last["test_loss"]
    s = g["summary"]
    assert s["segment_te_barrier_mean"] == summary["segment_te_barrier"]
    assert s["worst_psnr_curves"] == summary["te_psnr_min"]
    assert s["worst_psnr_endpoints"] == min(summary["te_psnr_start"], summary["te_psnr_end"])

    # the aligned paths and the extra-trained endpoints: B aligned to A, a curve to it, both ends trained on as
    # long as a curve (train --init with the curve's epochs, lr and schedule), measured like the paths' points
    aligned = load_checkpoint(root / ALIGNED, "endpoint")
    assert aligned["aligned_to"]["method"] == "activations" and aligned["aligned_to"]["latent"] == "permutation"
    assert aligned["aligned_to"]["end"] == str((root / ENDPOINTS[1]).resolve())
    assert load_checkpoint(root / ALIGNED_CURVE, "curve")["args"]["init_end"] == str((root / ALIGNED).resolve())
    extra = load_checkpoint(root / EXTRAS[0], "endpoint")
    assert extra["args"]["init"] == str((root / ENDPOINTS[0]).resolve())
    assert (extra["epoch"], extra["args"]["lr"], extra["args"]["lr_schedule"]) == (2, 3e-3, "paper")
    a = EvalRecord.from_json(json.loads((root / ALIGNED_EVAL / "eval.json").read_text())).flat_summary()
    # B and aligned B compute the same function: the same held-out loss at t = 1 (BN recomputed alike)
    assert a["te_loss_end"] == pytest.approx(summary["te_loss_end"], rel=1e-4)
    base = json.loads((root / BASELINE / "eval.json").read_text())
    assert base["num_points"] == 2 and base["endpoints"] == [str((root / e).resolve()) for e in EXTRAS]
    better, extra_best = min(summary["te_loss_start"], summary["te_loss_end"]), \
        min(base["paths"]["segment"]["te_loss_start"], base["paths"]["segment"]["te_loss_end"])
    paths = pair["paths"]
    assert paths["aligned_segment"]["barrier"] == a["segment_te_barrier"] and paths["aligned_curve"]["barrier"] == \
        a["te_barrier"]
    assert paths["aligned_segment"]["removed"] == pytest.approx(
        (summary["segment_te_barrier"] - a["segment_te_barrier"]) / summary["segment_te_barrier"])
    assert paths["curve"]["best_vs_endpoint"] == pytest.approx((summary["te_loss_min"] - better) / better)
    assert paths["aligned_curve"]["best_vs_extra"] == pytest.approx((a["te_loss_min"] - extra_best) / extra_best)
    ens = json.loads((root / EVAL / "eval.json").read_text())["ensemble"]  # the study's --ensemble 5
    assert ens["k"] == 5 and pair["ensemble"] == ens
    assert pair["extra_endpoint"]["mse"] == min(base["paths"]["segment"]["te_mse_start"],
                                                base["paths"]["segment"]["te_mse_end"])
    plane = json.loads((root / "curves/mse_seed1-seed2/plane/plane.json").read_text())
    assert plane["config"]["grid"] == 4 and g["plane"]["summary"] == plane["summary"]
    stage = json.loads((root / "endpoints/mse_seed1/study_stage.json").read_text())
    assert plane["format_version"] == stage["format_version"] == 2 and stage["status"] == "done"  # records.py
    one = s["paths"]["aligned_curve"]["barrier"]  # one pair: the mean, no interval
    assert (one["n"], one["mean"], one["lo"]) == (1, a["te_barrier"], None)

    # the markdown shows the same numbers (as formatted by the report)
    md = (root / "report.md").read_text()
    from aecurves.report import fdb, fnum, fpct

    row = _md_row(md, "Bezier curve (3 bends)")
    assert row[1:4] == [fnum(summary["te_loss_max"]), fnum(summary["te_barrier"]), fpct(removed)]
    assert row[6] == fnum(summary["length"]) and row[7] == fdb(summary["te_psnr_min"])
    assert row[9] == f"[{fnum(summary['te_barrier_lo'])}, {fnum(summary['te_barrier_hi'])}]"  # over images
    seg = _md_row(md, "segment", "Seeds 1 and 2")
    assert seg[1:3] == [fnum(summary["segment_te_loss_max"]), fnum(summary["segment_te_barrier"])]
    barriers = _md_row(md, "seeds 1-2", "Test barrier:")
    assert barriers[1:] == [fnum(summary["segment_te_barrier"]), fnum(a["segment_te_barrier"]),
                            fnum(summary["te_barrier"]), fnum(a["te_barrier"])]
    assert _md_row(md, "aligned segment", "Seeds 1 and 2")[2] == fnum(a["segment_te_barrier"])
    row = _md_row(md, "seeds 1-2", "Averaging along the curve")
    assert row[1] == "(a) output average of 5 points of the curve"
    e = ens["entries"]["path_average"]
    assert row[2:] == [fnum(e["mse"]), fdb(e["psnr"]), fnum(e["ssim"])]
    ep = _md_row(md, "mse seed 1")
    assert ep[2] == fnum(summary["te_mse_start"]) and ep[4] == fdb(summary["te_psnr_start"])
    assert fnum(summary["segment_te_barrier"]) in rep["summary_lines"][0]
    for line in rep["summary_lines"]:
        assert report.md_text(line) in md

    # HTML: self-contained (figures embedded), with the same tables
    html = (root / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") >= 5
    assert 'src="report_files' not in html
    assert fnum(summary["segment_te_barrier"]) in html


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(copy_of, monkeypatch, capsys):
    root = copy_of
    before = {rel: _stamp(root, rel) for rel in (*ENDPOINTS, CURVE, f"{EVAL}/eval.json", "report.html")}
    provenance = json.loads((root / "study.json").read_text())["provenance"]

    def boom(cfg):
        raise AssertionError("a finished stage was run again")

    for mod in ("train", "train_curve", "eval_curve", "align", "plane", "fge", "ensembles"):
        monkeypatch.setattr(f"aecurves.commands.{mod}.run", boom)
    assert run_cli("study", *SMALL, "--out", root) == 0
    assert {rel: _stamp(root, rel) for rel in before} == before
    out = capsys.readouterr().out
    assert out.count("finished already, skipped") == len(STAGES) and "report: up to date" in out
    assert re.search(r"stage 8/15: train-curve mse seeds 1-2", out)
    assert "fge mse seed 2 as long as a curve: finished already, skipped" in out
    assert "ensembles mse seeds 1-2 at equal budget: finished already, skipped" in out
    assert json.loads((root / "study.json").read_text())["provenance"] == provenance  # that of the run that made it


@pytest.mark.slow
def test_a_study_folder_of_the_last_release_reruns_with_every_stage_skipped(copy_of, monkeypatch, capsys):
    """study.json format 1 (0.1.0: no "sections"; every other file as now): the re-run skips every stage and
    retrains nothing, and rewrites study.json in the current format with the same config."""
    root = copy_of
    record = json.loads((root / "study.json").read_text())
    assert record["format_version"] == study.FORMAT_VERSION == 2
    assert list(record["sections"]) == ["endpoints", "extras", "fges", "aligns", "curves", "evals", "ensembles",
                                        "planes"]
    assert record["sections"]["extras"]["epochs"] == record["sections"]["extras"]["save_every_epoch"] == 2
    old = {k: v for k, v in record.items() if k != "sections"}
    (root / "study.json").write_text(json.dumps({**old, "format_version": 1}))
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
             and p.name not in ("study.json", ".aecurves.lock")]
    kept = {rel: _stamp(root, rel) for rel in files}

    def boom(cfg):
        raise AssertionError("a finished stage was run again")

    for mod in ("train", "train_curve", "eval_curve", "align", "plane", "fge", "ensembles"):
        monkeypatch.setattr(f"aecurves.commands.{mod}.run", boom)
    assert run_cli("study", *SMALL, "--out", root) == 0
    out = capsys.readouterr().out
    assert out.count("finished already, skipped") == len(STAGES) and "report: up to date" in out
    assert {rel: _stamp(root, rel) for rel in files} == kept
    again = json.loads((root / "study.json").read_text())
    assert again["format_version"] == 2 and again["config"] == {**record["config"], "out": str(root)}
    assert again["sections"] == record["sections"]


@pytest.mark.slow
def test_only_a_stage_left_started_or_submitted_is_offered_to_an_earlier_drivers_job(copy_of, capsys):
    """A Slurm job stays in squeue for a moment (COMPLETING) after the driver read its result: a re-run then must judge
    the finished stage, not follow that job (it did, once in four clean-clone runs). The executor is asked to follow
    an earlier driver's job only for a stage whose record says started or submitted."""
    from aecurves.executors import SerialExecutor

    class Remembering(SerialExecutor):
        def __init__(self):
            super().__init__()
            self.asked = []

        def attach(self, stage, record):
            self.asked.append((stage, record["status"]))
            return None  # no job of its own in the queue: the stage is judged

    record = copy_of / EVAL / "study_stage.json"
    record.write_text(record.read_text().replace('"status": "done"', '"status": "submitted"'))
    one = study.Study(study.resolve(parse(["study", *map(str, SMALL), "--out", str(copy_of)])[1]))
    study.plan_study(one)
    executor = Remembering()
    summary = study.run_stages(one, executor)
    assert executor.asked == [("eval:mse:1-2", "submitted")]
    assert summary["ran"] == [] and len(summary["skipped"]) == len(STAGES) + 1  # and the report


def test_a_stage_is_finished_only_with_every_output(copy_of, capsys):
    (copy_of / "endpoints/mse_seed1/reconstructions.png").unlink()
    kept = {rel: _stamp(copy_of, rel) for rel in (*ENDPOINTS, CURVE)}
    assert run_cli("study", *SMALL, "--out", copy_of) == 0
    out = capsys.readouterr().out
    assert "train mse seed 1: resuming (some of its outputs are missing)" in out
    assert (copy_of / "endpoints/mse_seed1/reconstructions.png").is_file()
    assert {rel: _stamp(copy_of, rel) for rel in kept} == kept  # nothing built on it was redone
    assert out.count("finished already, skipped") == len(STAGES) - 1


@pytest.mark.slow
def test_report_command_rewrites_the_report(copy_of):
    before = json.loads((copy_of / "report.json").read_text())
    (copy_of / "report.html").unlink()
    assert run_cli("report", copy_of) == 0
    after = json.loads((copy_of / "report.json").read_text())
    assert (copy_of / "report.html").is_file() and after["inputs_fingerprint"] == before["inputs_fingerprint"]
    assert after["summary_lines"] == before["summary_lines"]


@pytest.mark.slow
def test_changed_settings_are_refused_before_anything_changes(copy_of, capsys):
    root = copy_of
    before = {rel: _stamp(root, rel) for rel in (*ENDPOINTS, CURVE)}
    argv = [a for a in SMALL]
    argv[argv.index("--epochs") + 1] = 4
    assert run_cli("study", *argv, "--out", root) == 2
    err = capsys.readouterr().err
    assert "endpoint:mse:1" in err and "epochs=3 (existing) vs 4 (requested)" in err and "--force" in err
    assert {rel: _stamp(root, rel) for rel in before} == before


@pytest.mark.slow
def test_force_redoes_one_endpoint_and_what_is_built_on_it(copy_of, capsys):
    root = copy_of
    other = _stamp(root, ENDPOINTS[1])
    curve_before, eval_before = _sha(root / CURVE), _stamp(root, f"{EVAL}/eval.json")
    assert run_cli("study", *SMALL, "--out", root, "--force", "endpoint:mse:1") == 0
    out = capsys.readouterr().out
    assert "train mse seed 1: redoing (--force)" in out
    assert "train mse seed 2: finished already, skipped" in out
    assert "train-curve mse seeds 1-2: redoing (its inputs changed" in out
    assert _stamp(root, ENDPOINTS[1]) == other  # the other finished endpoint is untouched
    assert _sha(root / CURVE) != curve_before and _stamp(root, f"{EVAL}/eval.json") != eval_before
    assert load_checkpoint(root / ENDPOINTS[0], "endpoint")["epoch"] == 3


@pytest.mark.slow
def test_resume_after_interrupt(tmp_path, monkeypatch, capsys):
    """Interrupted in the second stage (epoch 2 of endpoint seed 2): the re-run skips stage 1, resumes stage 2."""
    from aecurves.commands import train

    root = tmp_path / "s"
    argv = [*SMALL, "--save-every-epoch", 1, "--out", root]
    real_epoch, calls = train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # stage 1 runs epochs 1-3; stage 2 is stopped in its epoch 2
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    assert run_cli("study", *argv) == 130
    assert "Re-run the same command" in capsys.readouterr().err
    assert load_checkpoint(root / ENDPOINTS[0], "endpoint")["epoch"] == 3
    assert load_checkpoint(root / ENDPOINTS[1], "endpoint")["epoch"] == 1
    assert not (root / CURVE).exists()
    first = _stamp(root, ENDPOINTS[0])

    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    real_run, seen = train.run, []
    monkeypatch.setattr(train, "run", lambda cfg: (seen.append(cfg), real_run(cfg))[1])
    assert run_cli("study", *argv) == 0
    out = capsys.readouterr().out
    assert _stamp(root, ENDPOINTS[0]) == first  # not re-run
    assert [(c.seed, c.resume, bool(c.init)) for c in seen] == [(2, True, False), (1, False, True), (2, False, True)]
    assert "resuming (interrupted at epoch 1 of 3)" in out and "resuming from" in out
    rows = [json.loads(r) for r in (root / "endpoints/mse_seed2/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (root / "report.html").is_file() and (root / f"{EVAL}/eval.json").is_file()


@pytest.mark.slow
def test_offline_vgg_group_is_skipped_with_the_remedy(copy_of, monkeypatch, capsys):
    from aecurves import losses

    def offline(weights="imagenet"):
        raise losses.VGGUnavailable("URLError: offline in this test")

    monkeypatch.setattr(losses, "load_vgg_features", offline)
    argv = [a for a in SMALL]
    argv[argv.index("--losses") + 1] = "mse,vgg"
    argv[argv.index("--vgg-weights") + 1] = "imagenet"
    assert run_cli("study", *argv, "--out", copy_of) == 0
    out = capsys.readouterr().out
    # one line up front, the full reason and remedy once, at the end
    first = next(line for line in out.splitlines() if line.startswith("vgg group skipped: "))
    assert "offline in this test" in first and "remedy follows at the end" in first
    assert out.count(losses.vgg_missing_message("URLError: offline in this test")) == 1
    assert out.rindex("vgg group SKIPPED") > out.index("study finished")
    assert not (copy_of / "endpoints/vgg_seed1").exists()
    groups = json.loads((copy_of / "study.json").read_text())["groups"]
    assert groups["mse"]["status"] == "run" and groups["vgg"]["status"] == "skipped"
    rep = json.loads((copy_of / "report.json").read_text())
    assert rep["groups"]["vgg"]["status"] == "skipped" and rep["groups"]["mse"]["pairs"][0]["available"]
    md = (copy_of / "report.md").read_text()
    assert "SKIPPED" in md and "offline in this test" in md and "--vgg-weights PATH" in md
    assert "The vgg group was skipped" in md


def test_stage_configs_equal_the_commands_run_by_hand(tmp_path):
    """Each stage's config is exactly what its own command builds from the same flags: its section, made from the
    study's settings through their `sets`, with the stage's own files, seed and folder."""
    cfg = study.resolve(make(StudyConfig, {"preset": "demo", "out": str(tmp_path)}))
    one = study.Study(cfg)
    stages = {st.name: st for st in study.plan(cfg, 10, 2)}

    def config(name, resume=False):
        return one.config(stages[name], resume)

    a, b = str(tmp_path / "endpoints/mse_seed1/checkpoint.pt"), str(tmp_path / "endpoints/mse_seed2/checkpoint.pt")
    t = config("endpoint:mse:1")
    _, by_hand = parse(["train", "--dataset", "lfw", "--image-size", "32", "--loss", "mse", "--seed", "1", "--width",
                        "16", "--batch-size", "32", "--epochs", "60", "--lr", "3e-3", "--lr-schedule", "paper",
                        "--save-every-epoch", "20", "--out", str(tmp_path / "endpoints/mse_seed1")])
    assert as_record(t) == as_record(by_hand)
    c = config("curve:mse:1-2", resume=True)
    _, by_hand = parse(["train-curve", "--init-start", a, "--init-end", b, "--fix-start", "--fix-end", "--epochs",
                        "60", "--lr", "3e-3", "--batch-size", "32", "--out", str(tmp_path / "curves/mse_seed1-seed2"),
                        "--resume"])
    assert as_record(c) == as_record(by_hand)
    curve = str(tmp_path / "curves/mse_seed1-seed2/checkpoint.pt")
    e = config("eval:mse:1-2")
    _, by_hand = parse(["eval-curve", "--ckpt", curve, "--ensemble", "5", "--out",
                        str(tmp_path / "curves/mse_seed1-seed2/eval"), "--overwrite"])  # the study redoes what it finds
    assert as_record(e) == as_record(by_hand)                                       # unfinished
    assert e.num_points == 61 and e.segment_too is True and c.seed == 1 and t.width == 16
    x = config("extra:mse:2")
    _, by_hand = parse(["train", "--init", b, "--seed", "2", "--batch-size", "32", "--epochs", "60", "--lr", "3e-3",
                        "--lr-schedule", "paper", "--save-every-epoch", "60", "--out",
                        str(tmp_path / "endpoints/mse_seed2_extra")])
    assert as_record(x) == as_record(by_hand)
    al = config("align:mse:1-2")
    _, by_hand = parse(["align", "--init_start", a, "--init_end", b, "--out",
                        str(tmp_path / "aligned/mse_seed2-to-seed1/checkpoint.pt")])
    assert as_record(al) == as_record(by_hand)
    extras = [str(tmp_path / f"endpoints/mse_seed{s}_extra/checkpoint.pt") for s in (1, 2)]
    bl = config("baseline:mse:1-2")
    _, by_hand = parse(["eval-curve", "--segment", *extras, "--num-points", "2", "--num-images", "0", "--out",
                        str(tmp_path / "baselines/mse_seed1-seed2"), "--overwrite"])
    assert as_record(bl) == as_record(by_hand)
    f = config("fge:mse:2")
    _, by_hand = parse(["fge", "--ckpt", b, "--epochs", "60", "--cycle", "4", "--lr-1", "3e-3", "--lr-2", "6e-6",
                        "--wd", "0", "--batch-size", "32", "--seed", "2", "--out", str(tmp_path / "fge/mse_seed2")])
    assert as_record(f) == as_record(by_hand)
    pl = config("plane:mse:1-2")
    _, by_hand = parse(["plane", "--ckpt", curve, "--grid", "21", "--out",
                        str(tmp_path / "curves/mse_seed1-seed2/plane"), "--overwrite"])
    assert as_record(pl) == as_record(by_hand)
    # what study.json records of each section: the settings its stages get from the study, the fixed ones too
    curves = study.section_record(cfg, "curves")
    assert curves["fix_start"] is curves["fix_end"] is True and (curves["epochs"], curves["lr"]) == (60, 3e-3)
    assert "init_start" not in curves and "out" not in curves and "cache_dir" not in curves  # the stage's; unset
    assert "no_progress" not in curves  # how this run was asked to go, as study.json's config leaves it out
    assert study.section_record(cfg, "fges")["lr_2"] == pytest.approx(3e-3 * 0.002)


def test_a_custom_model_study_neither_sets_nor_compares_the_width(tmp_path):
    """width is a setting of the built-in model: with a factory outside aecurves the endpoints record none, and the
    study expects none (0.1.0 expected the default 32, so such a study refused its own re-run as stale)."""
    model = f"{Path(__file__).with_name('ae_models.py')}:mlp_autoencoder"
    cfg = study.resolve(make(StudyConfig, {"model": model, "losses": "mse", "out": str(tmp_path)}))
    endpoint = next(s for s in study.plan(cfg, 10, 2) if s.kind == "endpoint")
    one = study.Study(cfg)
    assert one.config(endpoint).width is None and "width" not in one.config(endpoint).given
    assert "width" not in one.expected(endpoint) and one.expected(endpoint)["model"] == model
    curve = next(s for s in study.plan(cfg, 10, 2) if s.kind == "curve")
    assert one.config(curve).model == model  # named again for the commands that read checkpoints


def test_every_study_setting_sets_fields_its_sections_have():
    """The `sets` metadata: every target is a field of that section's config, set by one study setting only, and
    every section field a study setting sets is one a user could give that command as a flag."""
    targets = config_lib.study_setting_of()
    assert len(targets) == sum(len(f.metadata["sets"]) for f in dataclasses.fields(StudyConfig))  # no field twice
    for (name, field_name), setting in targets.items():
        cls, fixed = config_lib.STUDY_SECTIONS[name]
        assert field_name in cls.__dataclass_fields__ and field_name not in fixed, (name, field_name, setting)
        assert cls.__dataclass_fields__[field_name].metadata["cli"], (name, field_name)
    assert targets[("curves", "lr")] == targets[("extras", "lr")] == targets[("fges", "lr_1")] == "curve_lr"
    assert {s for (s, f), setting in targets.items() if setting == "device"} == set(config_lib.STUDY_SECTIONS)


def test_a_study_config_file_may_hold_a_table_per_section(tmp_path, capsys):
    """[curves] lr = 0.01 is --curve-lr 0.01: the tables read the `sets` backwards; flat keys (0.1.0's files) stay."""
    tables = tmp_path / "tables.toml"
    tables.write_text('losses = "mse"\n[endpoints]\nepochs = 7\nbatch-size = 16\n[curves]\nepochs = 3\nlr = 0.01\n'
                      '[fges]\ncycle = 2\n[planes]\ngrid = 5\n[evals]\nnum_points = 9\n[aligns]\nmethod = "weights"\n')
    flat = tmp_path / "flat.toml"
    flat.write_text('losses = "mse"\nepochs = 7\nbatch_size = 16\ncurve_epochs = 3\ncurve_lr = 0.01\nfge_cycle = 2\n'
                    'plane_grid = 5\nnum_points = 9\nalign_method = "weights"\n')
    _, from_tables = parse(["study", "--config", str(tables)])
    _, from_flat = parse(["study", "--config", str(flat)])
    assert as_record(from_tables) == as_record(from_flat) and from_flat.curve_lr == 0.01
    cfg = study.resolve(from_tables)
    assert study.section(cfg, "curves").lr == study.section(cfg, "extras").lr == study.section(cfg, "fges").lr_1
    for text, phrase in (('[curves]\nfix_start = false\n', r"\[curves\] fix_start is not a study setting"),
                         ('curve_lr = 0.1\n[curves]\nlr = 0.2\n',
                          r"\[curves\] lr = 0.2 and curve_lr = 0.1 are the same study setting \(--curve-lr\)"),
                         ('[curves]\nlr = 0.2\n[fges]\nlr_1 = 0.3\n', r"\[fges\] lr_1 = 0.3 and \[curves\] lr = 0.2"),
                         ('curves = 3\n', "curves must be a table")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UserError, match=phrase):
            parse(["study", "--config", str(bad)])


def test_presets_flags_and_bad_input(tmp_path):
    cfg = study.resolve(make(StudyConfig, {"epochs": 7}))
    assert cfg.preset == "demo" and cfg.epochs == 7 and cfg.width == 16 and cfg.seeds == (1, 2, 3)
    assert cfg.losses == ("mse", "vgg") and cfg.out == "runs/study"
    celeba = study.resolve(make(StudyConfig, {"preset": "celeba", "data_dir": str(tmp_path)}))
    assert (celeba.image_size, celeba.latent_dim, celeba.batch_size, celeba.epochs, celeba.lr) == \
        (64, 128, 64, 30, 1e-4)
    with pytest.raises(UserError, match="--data-dir"):
        study.resolve(make(StudyConfig, {"preset": "celeba"}))
    with pytest.raises(UserError, match="two distinct seeds"):
        study.resolve(make(StudyConfig, {"seeds": "1"}))
    with pytest.raises(UserError, match="--losses"):
        study.resolve(make(StudyConfig, {"losses": "mse,l1"}))
    plain = {"losses": "mse", "seeds": "1,2,3", "align": False, "extra_training": False, "fge": False,
             "plane_grid": 0}
    stages = study.plan(study.resolve(make(StudyConfig, plain)), 10, 2)
    assert [s.name for s in stages][:4] == ["endpoint:mse:1", "endpoint:mse:2", "endpoint:mse:3", "curve:mse:1-2"]
    assert len(stages) == 3 + 3 + 3 + 1
    assert study.select_forced(["curves"], stages) == {"curve:mse:1-2", "curve:mse:1-3", "curve:mse:2-3"}
    assert study.select_forced(["eval:mse:1-3", "report"], stages) == {"eval:mse:1-3", "report"}
    assert len(study.select_forced(["mse"], stages)) == 9
    # by default: extra training and FGE per endpoint, alignment, an aligned curve and its evaluation, a baseline
    # and the equal-budget ensembles per pair
    stages = study.plan(study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2,3"})), 10, 2)
    names = [s.name for s in stages]
    assert names[3:12] == ["extra:mse:1", "extra:mse:2", "extra:mse:3", "fge:mse:1", "fge:mse:2", "fge:mse:3",
                           "align:mse:1-2", "align:mse:1-3", "align:mse:2-3"]
    assert len(stages) == 3 * 10 + 2 and names.index("aligned-curve:mse:1-2") < names.index("eval:mse:1-2")
    assert names[-2:] == ["plane:mse:1-2", "report"]  # the demo preset draws one plane per group
    assert study.select_forced(["curves"], stages) == {f"{k}:mse:{p}" for k in ("curve", "aligned-curve")
                                                       for p in ("1-2", "1-3", "2-3")}
    assert study.select_forced(["aligns"], stages) == {"align:mse:1-2", "align:mse:1-3", "align:mse:2-3"}
    assert stages[names.index("aligned-curve:mse:2-3")].inputs == ["endpoints/mse_seed2/checkpoint.pt",
                                                                  "aligned/mse_seed3-to-seed2/checkpoint.pt"]
    with pytest.raises(UserError, match="matches no stage"):
        study.select_forced(["curve:vgg:1-2"], stages)


def test_cli_reports_a_missing_celeba_folder(capsys):
    assert run_cli("study", "--preset", "celeba") == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_outputs_of_the_same_command_run_by_hand_are_adopted(tmp_path, capsys):
    """E.g. endpoints trained under torchrun into the study folder: same settings, so the study adopts them."""
    root = tmp_path / "s"
    by_hand = ["--dataset", "synthetic", "--image-size", 32, "--limit", 256, "--width", 8, "--latent-dim", 16,
               "--batch-size", 32, "--lr", 3e-3, "--epochs", 3, "--loss", "mse", "--seed", 1, "--precision", "fp32",
               "--device", "cpu", "--save-every-epoch", 5, "--lr-schedule", "paper", "--no-progress"]
    assert run_cli("train", *by_hand, "--out", root / "endpoints/mse_seed1") == 0
    before = _stamp(root, ENDPOINTS[0])
    assert run_cli("study", *SMALL, "--out", root) == 0
    out = capsys.readouterr().out
    assert "train mse seed 1: finished already, skipped (adopted existing outputs)" in out
    assert _stamp(root, ENDPOINTS[0]) == before
    assert json.loads((root / "endpoints/mse_seed1/study_stage.json").read_text())["adopted"] is True


# ----------------------------------------------------------------------------------------------------------
# fast geometric ensembling and the equal-budget ensembles (issue 20)


def test_fge_and_ensemble_stages_in_the_plan(tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("study", *SMALL, "--out", out, "--plan") == 0
    text = capsys.readouterr().out
    for name in STAGES:
        assert f"  {name} " in text
    lines = text.splitlines()

    def after(name):
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(name + " "))
        return lines[i + 1].split("after:")[1].strip()

    assert after("fge:mse:1") == "endpoint:mse:1" and after("fge:mse:2") == "endpoint:mse:2"
    assert after("ensembles:mse:1-2") == "fge:mse:1, fge:mse:2, extra:mse:1, extra:mse:2"
    assert not out.exists() or not any(out.iterdir())  # --plan writes nothing

    cfg = study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2,3", "curve_epochs": 10}))
    assert cfg.fge is True and cfg.fge_cycle == 4  # fge's default: snapshots after epochs 1, 5, 9
    stages = {s.name: s for s in study.plan(cfg, 10, 2)}
    pair = stages["ensembles:mse:1-3"]
    assert pair.inputs == [f"fge/mse_seed{s}/snapshot_{k}.pt" for s in (1, 3) for k in (1, 2, 3)] + [
        "endpoints/mse_seed1_extra/checkpoint.pt", "endpoints/mse_seed3_extra/checkpoint.pt"]
    assert pair.deps == ("fge:mse:1", "fge:mse:3", "extra:mse:1", "extra:mse:3")
    config = study.Study(cfg).config(pair)
    assert config.averages == {"fge_start": [0, 1, 2], "fge_end": [3, 4, 5], "fge_pooled": [0, 1, 2, 3, 4, 5],
                               "extra_start": [6], "extra_end": [7], "extra_average": [6, 7]}
    fge = study.Study(cfg).config(stages["fge:mse:3"])
    assert (fge.epochs, fge.cycle, fge.lr_1, fge.seed) == (10, 4, cfg.curve_lr, 3)  # the equal budget
    all_stages = list(stages.values())
    assert study.select_forced(["fges"], all_stages) == {"fge:mse:1", "fge:mse:2", "fge:mse:3"}
    assert study.select_forced(["fge:mse:1"], all_stages) == {"fge:mse:1"}
    assert study.select_forced(["ensembles"], all_stages) == {f"ensembles:mse:{p}" for p in ("1-2", "1-3", "2-3")}

    # --no-fge: no FGE stage; the pair's ensembles stage measures the extra-trained endpoints alone
    no_fge = study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2", "fge": False}))
    stages = {s.name: s for s in study.plan(no_fge, 10, 2)}
    assert not any(n.startswith("fge:") for n in stages)
    assert stages["ensembles:mse:1-2"].deps == ("extra:mse:1", "extra:mse:2")
    assert study.Study(no_fge).config(stages["ensembles:mse:1-2"]).averages == {
        "extra_start": [0], "extra_end": [1], "extra_average": [0, 1]}
    neither = study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2", "fge": False,
                                                             "extra_training": False}))
    assert not any(s.kind in ("fge", "ensembles") for s in study.plan(neither, 10, 2))
    group = study.loss_group(no_fge, "mse")
    assert "fge" not in group and group["pairs"][0]["ensembles"] == "ensembles/mse_seed1-seed2"


def test_the_fge_cycle_default_and_refusals(tmp_path, capsys):
    def resolved(**kw):
        return study.resolve(make(StudyConfig, {"losses": "mse", **kw}))

    # fge's cycle of 4 when it takes at least 2 snapshots within --curve-epochs, else 2
    assert resolved(curve_epochs=6).fge_cycle == 4 and study.fge_snapshots(6, 4) == 2
    assert resolved(curve_epochs=5).fge_cycle == 2 and study.fge_snapshots(5, 2) == 3
    assert resolved(curve_epochs=5, fge_cycle=4).fge_cycle == 4  # given: kept (1 snapshot)
    with pytest.raises(UserError, match=r"--fge-cycle 6 takes no FGE snapshot .* --curve-epochs 2 "):
        resolved(curve_epochs=2, fge_cycle=6)
    with pytest.raises(UserError, match="even number"):
        resolved(fge_cycle=3)
    with pytest.raises(UserError, match="--fge-cycle 6 would be ignored with --no-fge"):  # a request it ignores
        resolved(curve_epochs=2, fge_cycle=6, fge=False)
    argv = [a for a in SMALL]
    assert run_cli("study", *argv, "--fge-cycle", 8, "--out", tmp_path / "s") == 2
    assert "takes no FGE snapshot" in capsys.readouterr().err and not (tmp_path / "s").exists()


def _hand_average(paths: list, bn_images: int, recompute: bool) -> dict:
    """The output average of the checkpoints `paths` on their held-out images, computed here from the files: each
    network's BatchNorm statistics recomputed on eval-curve's subset (or as saved), its outputs averaged per image;
    MSE (mean of per-image MSE) and PSNR (mean of per-image PSNR)."""
    import torch

    from aecurves.curves import recompute_bn
    from aecurves.data import load_run_data
    from aecurves.metrics import fixed_subset
    from aecurves.models import build_model

    ckpts = [load_checkpoint(p, "endpoint") for p in paths]
    data = load_run_data(ckpts[0]["args"])
    x = data.test.float().div(255)
    total = 0
    for ckpt in ckpts:
        model = build_model(ckpt["args"])
        model.load_state_dict(ckpt["model"])
        if recompute:
            recompute_bn(model, dict(model.named_parameters()), fixed_subset(data.train, bn_images).float().div(255)
                         .split(256))
        model.eval()
        with torch.no_grad():
            total = total + model(x)
    err = (total / len(ckpts) - x).pow(2).flatten(1).mean(1).double()
    return {"mse": float(err.mean()), "psnr": float((10 * torch.log10(1 / err)).mean())}


@pytest.mark.slow
def test_equal_budget_table_matches_a_hand_computation_from_the_files(finished):
    root = finished
    rep = json.loads((root / "report.json").read_text())
    g = rep["groups"]["mse"]
    rows = g["pairs"][0]["equal_budget"]["rows"]
    assert list(rows) == ["curve_ensemble", "endpoint_average", "fge_pooled", "fge_start", "fge_end",
                          "extra_average", "extra_best"]
    # each row's training beyond the endpoints, in epochs (--curve-epochs 2)
    assert {k: r["budget_epochs"] for k, r in rows.items()} == {
        "curve_ensemble": 2, "endpoint_average": 0, "fge_pooled": 4, "fge_start": 2, "fge_end": 2,
        "extra_average": 4, "extra_best": 2}
    # (a), (b): the curve's eval.json; (e): the baseline's better extra-trained endpoint
    entries = json.loads((root / EVAL / "eval.json").read_text())["ensemble"]["entries"]
    for key, entry in (("curve_ensemble", "path_average"), ("endpoint_average", "endpoint_average")):
        assert {m: rows[key][m] for m in ("mse", "psnr", "ssim")} == {m: entries[entry][m] for m in ("mse", "psnr",
                                                                                                      "ssim")}
    base = json.loads((root / BASELINE / "eval.json").read_text())["paths"]["segment"]
    assert rows["extra_best"]["mse"] == min(base["te_mse_start"], base["te_mse_end"])
    assert rows["extra_best"]["psnr"] == max(base["te_psnr_start"], base["te_psnr_end"])
    # (c): the FGE snapshots of both endpoints' runs, from their files; each run alone equals its own fge.json
    runs = [json.loads((root / f / "fge.json").read_text()) for f in FGES]
    assert [r["budget_epochs"] for r in runs] == [2, 2] and [len(r["snapshots"]) for r in runs] == [1, 1]
    assert rows["fge_start"]["mse"] == pytest.approx(runs[0]["ensemble"]["mse"], rel=1e-5)
    assert rows["fge_end"]["psnr"] == pytest.approx(runs[1]["ensemble"]["psnr"], rel=1e-5)
    snapshots = [root / f / "snapshot_1.pt" for f in FGES]
    hand = _hand_average(snapshots, 64, recompute=False)  # as saved: fge recomputed them on the same subset
    assert rows["fge_pooled"]["members"] == 2
    assert rows["fge_pooled"]["mse"] == pytest.approx(hand["mse"], rel=1e-5)
    assert rows["fge_pooled"]["psnr"] == pytest.approx(hand["psnr"], rel=1e-5)
    # (d): the two extra-trained endpoints, their BatchNorm statistics recomputed like every point of the paths
    hand = _hand_average([root / e for e in EXTRAS], 64, recompute=True)
    assert rows["extra_average"]["mse"] == pytest.approx(hand["mse"], rel=1e-5)
    assert rows["extra_average"]["psnr"] == pytest.approx(hand["psnr"], rel=1e-5)
    alone = json.loads((root / ENSEMBLES / "ensembles.json").read_text())["averages"]
    assert alone["extra_start"]["mse"] == pytest.approx(base["te_mse_start"], rel=1e-5)  # the baseline's own
    # over pairs (one here): the means, the winner by MSE and the sentence that names it
    eb = g["equal_budget"]
    means = {k: r["mse"]["mean"] for k, r in eb["rows"].items()}
    assert means == {k: r["mse"] for k, r in rows.items()}
    ranked = sorted(means, key=means.get)
    assert (eb["winner"], eb["runner_up"]) == tuple(ranked[:2])
    assert eb["winner_vs_runner_up"]["mean"] == pytest.approx((means[ranked[0]] - means[ranked[1]])
                                                              / means[ranked[1]])
    sentence = next(line for line in rep["summary_lines"] if line.startswith("Ensembles at equal training budget"))
    assert report.EQUAL_BUDGET_SHORT[ranked[0]] + f" ({rows[ranked[0]]['budget_epochs']} epochs) reconstructs " \
        "best" in sentence
    # the markdown shows the same numbers
    from aecurves.report import fdb, fnum

    md = (root / "report.md").read_text()
    row = _md_row(md, "seeds 1-2", "Ensembles at equal training budget\n")
    assert row[1:] == ["(a) curve ensemble: output average of 5 points of the curve", "2", "5",
                       fnum(rows["curve_ensemble"]["mse"]), fdb(rows["curve_ensemble"]["psnr"]),
                       fnum(rows["curve_ensemble"]["ssim"])]
    table = md[md.index("Ensembles at equal training budget\n"):]
    pooled = _md_row(table[table.index("(b) the two endpoints averaged"):], "seeds 1-2")
    assert pooled[1:5] == ["(c) FGE: 1 snapshot from each endpoint's run, pooled", "4 (2 × 2)", "2",
                           fnum(rows["fge_pooled"]["mse"])]
    # convergence, from the extra-trained endpoints' held-out gain
    c = g["convergence"]
    ends = json.loads((root / EVAL / "eval.json").read_text())["paths"]["curve"]
    gain1 = (ends["te_loss_start"] - base["te_loss_start"]) / ends["te_loss_start"]
    assert c["measured"] and c["gains"]["1"] == pytest.approx(gain1)
    assert c["converged"] == (max(c["gains"].values()) <= report.CONVERGED_GAIN)


@pytest.mark.slow
def test_an_old_study_folder_reruns_only_the_new_stages(copy_of, monkeypatch, capsys):
    """A folder of the release before FGE (no fge/, no ensembles/, study.json and report.json without them): the
    re-run runs the FGE stages, the ensembles and the report; nothing else is redone."""
    root = copy_of
    for folder in (*FGES, ENSEMBLES):
        shutil.rmtree(root / folder)
    record = json.loads((root / "study.json").read_text())
    for key in ("fge", "fge_cycle"):
        record["config"].pop(key)
    record["groups"]["mse"].pop("fge")
    for pair in record["groups"]["mse"]["pairs"]:
        pair.pop("ensembles")
    record["stages"] = [s for s in record["stages"] if s["kind"] not in ("fge", "ensembles")]
    (root / "study.json").write_text(json.dumps(record))
    old = json.loads((root / "report.json").read_text())
    old["format_version"] = 3
    (root / "report.json").write_text(json.dumps(old))
    kept = {rel: _stamp(root, rel) for rel in (*ENDPOINTS, *EXTRAS, CURVE, ALIGNED, ALIGNED_CURVE,
                                               f"{EVAL}/eval.json", f"{ALIGNED_EVAL}/eval.json",
                                               f"{BASELINE}/eval.json", "curves/mse_seed1-seed2/plane/plane.json")}

    def boom(cfg):
        raise AssertionError("a finished stage was run again")

    for mod in ("train", "train_curve", "eval_curve", "align", "plane"):
        monkeypatch.setattr(f"aecurves.commands.{mod}.run", boom)
    assert run_cli("study", *SMALL, "--out", root) == 0
    out = capsys.readouterr().out
    assert {rel: _stamp(root, rel) for rel in kept} == kept
    assert out.count("finished already, skipped") == len(STAGES) - 3
    assert "3 stages run" not in out and "4 stages run, 11 already finished" in out  # 2 FGE, 1 ensembles, report
    for folder in FGES:
        assert (root / folder / "fge.json").is_file()
    rep = json.loads((root / "report.json").read_text())
    assert rep["format_version"] == report.REPORT_VERSION and "fge_pooled" in rep["groups"]["mse"]["pairs"][0][
        "equal_budget"]["rows"]
