"""The report of a study of VAEs (issue 28): the first screen's answer is about the objective, distortion + β·KL/D,
with its two terms beside it along every kind of path; an autoencoder's report is as it was before VAEs."""

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import ENDS, _md_table, _section, add_alignment, add_extra_training, make_study

from aecurves import report, stats
from aecurves.report import conclusions, figures
from aecurves.report.collect import collect
from aecurves.report.model import Interval

# ----------------------------------------------------------------------------------------------------------
# an autoencoder's report: byte for byte the one made before the report knew VAEs


def _normalized(root: Path) -> dict[str, str]:
    """report.md, report.html and report.json with what changes from run to run taken out: the study folder's path,
    the time written, the figures' bytes (matplotlib's, not the report's) and report.json's fingerprint."""
    where = str(root.resolve())
    md = (root / "report.md").read_text().replace(report.md_text(where), "STUDY").replace(where, "STUDY")
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:IMAGE",
                  (root / "report.html").read_text()).replace(where, "STUDY")
    record = json.loads((root / "report.json").read_text())
    record.pop("generated_at"), record.pop("inputs_fingerprint")
    record["config"].pop("out", None)
    return {"md": md, "html": html, "json": json.dumps(record, sort_keys=True)}


def _ae_report(root: Path, monkeypatch, variant: str) -> dict[str, str]:
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "2000-01-01 00:00" if " " in fmt else
                        "2000-01-01T00:00:00")
    if variant == "aligned":  # alignment and extra training: every table and conclusion of the mse group
        make_study(root, tensors=True)
        add_alignment(root)
        add_extra_training(root, {1: 0.15, 2: 0.01, 3: 0.005})
    else:  # two groups run, the vgg one with a perceptual loss
        make_study(root, losses=("mse", "vgg"))
    report.write_report(root)
    return _normalized(root)


# _normalized() of the reports made before the report knew VAEs (same fixtures, same code); md and html regenerated
# for the explorers of issue 30 and again for their pictures at some t only (report.json unchanged)
AE_REPORT_SHA256 = {
    "aligned": {"md": "0bd5da733d25f771147e5abdf4f64100edf161ab3dd26fa98c8d4ddf2651fe93",
                "html": "6b54c8edc6237ba0ae4e3a3957146c1dcd7c68379eeeaa761308ddf08d6a8b30",
                "json": "bcc82ab5962d33832036aa2916e0f4f4e2c9a9544af18fea60c55d2d85257a85"},
    "two_groups": {"md": "0bb92fc97a08283a43516423124ff7ecce11894108d40c1e070c34f6599435d4",
                   "html": "7eb4dc45805ce1019ba63a8b2f83eb546689f60823499d276b160a2b91257dce",
                   "json": "814b3d092f97de393f549e31783d871a4f51d6eb1236788f0df3baa7f81d7550"}}


@pytest.mark.parametrize("variant", sorted(AE_REPORT_SHA256))
def test_an_autoencoders_report_is_as_before(tmp_path, monkeypatch, variant):
    """report.md, report.html (figures aside) and report.json of an autoencoder study are byte for byte those the
    report wrote before it knew VAEs; a study.json that records --kl-weight (every study does now) changes nothing:
    an autoencoder has no KL."""
    texts = _ae_report(tmp_path / "study", monkeypatch, variant)
    digests = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()}
    assert digests == AE_REPORT_SHA256[variant]
    for text in (texts["md"], texts["html"]):
        assert "VAE" not in text and "KL" not in text and "objective" not in text
    study = json.loads((tmp_path / "study/study.json").read_text())
    study["config"]["kl_weight"] = 1.0
    (tmp_path / "study/study.json").write_text(json.dumps(study))
    report.write_report(tmp_path / "study")
    assert _normalized(tmp_path / "study")["md"] == texts["md"]


# ----------------------------------------------------------------------------------------------------------
# a study of VAEs: make_study's eval.json and curve.npz with the objective and its two terms, as eval-curve writes
# them for a VAE

D = 3 * 32 * 32  # make_study's images: RGB, 32x32
RATE_ENDS = {1: 30.0, 2: 34.0, 3: 32.0}  # each endpoint's held-out rate (KL, nats per image)
RATE_BUMPS = {"": (0.5, 0.2, 0.1), "segment_": (6.0, 9.0, 4.0)}  # per pair: the rate's barrier on the curve, segment
ALIGNED_RATE_BUMPS = {"": (0.05, 0.04, 0.03), "segment_": (1.0, 2.0, 1.5)}


def _terms(series: dict) -> dict:
    """The summary entries of the objective's terms (stats.summarize's, written out here: the fixture is the
    record format, not the code that writes it)."""
    out = {}
    for split in ("tr", "te"):
        for term in ("distortion", "rate"):
            v = np.asarray(series[f"{split}_{term}"], dtype=float)
            out.update({f"{split}_{term}_{k}": float(x) for k, x in (("start", v[0]), ("end", v[-1]),
                                                                     ("min", v.min()), ("max", v.max()),
                                                                     ("avg", v.mean()), ("int", v.mean()))})
            out[f"{split}_{term}_barrier"] = stats.loss_barrier(series["ts"], v)
    return out


def _make_vae(folder: Path, beta: float, seeds, rate_bumps: dict, index: int) -> None:
    """make_study's evaluation in `folder` as a VAE's: its loss (the MSE) becomes the distortion, a rate rising by
    rate_bumps[prefix][index] in the middle of each path is added, and the loss is the objective
    distortion + beta·rate/D; summary and curve.npz recomputed."""
    record = json.loads((folder / "eval.json").read_text())
    series = {k: np.asarray(v, dtype=float) for k, v in record["series"].items()}
    summary = {}
    for prefix in ("", "segment_"):
        ts = series[prefix + "ts"]
        r0, r1 = (RATE_ENDS[s] for s in seeds)
        rate = (1 - ts) * r0 + ts * r1 + rate_bumps[prefix][index] * np.sin(np.pi * ts) ** 2
        path = {k[len(prefix):]: v for k, v in series.items() if k.startswith(prefix)} if prefix else \
            {k: v for k, v in series.items() if not k.startswith("segment_")}
        for split, scale in (("tr", 1.1), ("te", 1.0)):
            path[f"{split}_distortion"] = path[f"{split}_loss"]
            path[f"{split}_rate"] = rate * scale
            path[f"{split}_loss"] = path[f"{split}_distortion"] + beta * path[f"{split}_rate"] / D
        summary.update({prefix + k: v for k, v in {**stats.summarize(path), **_terms(path)}.items()})
        series.update({prefix + k: v for k, v in path.items()})
    record.update(vae=True, kl_weight=beta, summary=summary, series={k: v.tolist() for k, v in series.items()},
                  loss_description=f"VAE objective (mean squared error + β·KL/D, β = {beta:g})")
    (folder / "eval.json").write_text(json.dumps(record))
    with open(folder / "curve.npz", "wb") as f:
        np.savez(f, **series, **summary)


def make_vae_study(root: Path, beta: float = 0.5, losses=("mse",), align: bool = True) -> Path:
    """make_study's study (seeds 1-3, three pairs) whose mse group are VAEs trained with β = `beta` (the vgg group,
    when in `losses`, stays autoencoders: a mixed study), with the aligned paths when `align`."""
    make_study(root, losses=losses)
    if align:
        add_alignment(root)
    study = json.loads((root / "study.json").read_text())
    study["config"].update(kl_weight=beta, model="aecurves.models:ConvVAE")
    (root / "study.json").write_text(json.dumps(study))
    for i, pair in enumerate(study["groups"]["mse"]["pairs"]):
        _make_vae(root / pair["eval"], beta, pair["seeds"], RATE_BUMPS, i)
        if "aligned_eval" in pair:
            _make_vae(root / pair["aligned_eval"], beta, pair["seeds"], ALIGNED_RATE_BUMPS, i)
    return root


def _barriers(bumps: dict, rate_bumps: dict, beta: float, prefix: str) -> dict[str, list[float]]:
    """A path kind's test barriers per pair, as the fixture makes them: each term peaks at t = 1/2 (one of the
    points), so the objective's barrier is the distortion's + beta·the rate's / D."""
    distortion = [b[0 if prefix else 1] for b in bumps]
    rate = list(rate_bumps[prefix])
    return {"distortion": distortion, "rate": rate,
            "objective": [d + beta * r / D for d, r in zip(distortion, rate)]}


PATH_KINDS = (("segment", "straight segment", "segment_", False), ("aligned_segment", "aligned segment", "segment_",
                                                                     True),
              ("curve", "curve", "", False), ("aligned_curve", "aligned curve", "", True))


def _expected(beta: float) -> dict[str, dict[str, list[float]]]:
    """Per path kind, the fixture's test barriers of the objective and of each term, per pair."""
    from test_report import ALIGNED_BUMPS

    base = ((0.02, 0.001), (0.03, 0.002), (0.025, 0.0005))
    return {name: _barriers(ALIGNED_BUMPS if aligned else base, ALIGNED_RATE_BUMPS if aligned else RATE_BUMPS, beta,
                            prefix) for name, _, prefix, aligned in PATH_KINDS}


def test_the_first_screen_of_a_vae_study_is_about_the_objective_and_its_terms(tmp_path):
    """The answer names the VAE objective and is computed on it; the first table gives the objective's barrier and,
    beside it, each term's (the fixture's values over pairs, formatted as the report formats numbers); the same in
    report.html; report.json holds the VAE and each path's term barriers."""
    beta = 0.5
    root = make_vae_study(tmp_path / "study", beta)
    record = report.write_report(root)
    expected = _expected(beta)
    g = record["groups"]["mse"]
    assert g["vae"] == {"kl_weight": beta, "distortion": "VAE objective (mean squared error + β·KL/D, β = 0.5)"}
    answer = g["conclusions"][0]
    assert answer["text"].startswith("VAE objective (MSE + 0.5·KL/D): between two endpoints the straight segment "
                                     "has a held-out barrier of ")
    assert "of the endpoints' objective" in answer["text"]
    assert answer["numbers"]["segment_barrier"] == pytest.approx(np.mean(expected["segment"]["objective"]))
    assert answer["numbers"]["curve_barrier"] == pytest.approx(np.mean(expected["curve"]["objective"]))
    removed = [1 - c / s for s, c in zip(expected["segment"]["objective"], expected["curve"]["objective"])]
    assert answer["numbers"]["removed_worst"] == pytest.approx(min(removed))
    assert answer["code"] == "barrier-removed" and "paths of nearly constant low objective" in answer["text"]
    for i, pair in enumerate(g["pairs"]):
        for path, key in (("curve", ""), ("segment", "segment_")):
            name = {"": "curve", "segment_": "segment"}[key]
            assert pair[path]["te_rate_barrier"] == pytest.approx(expected[name]["rate"][i])
            assert pair[path]["te_distortion_barrier"] == pytest.approx(expected[name]["distortion"][i])
            assert pair[path]["te_barrier"] == pytest.approx(expected[name]["objective"][i])

    md, html = (root / "report.md").read_text(), (root / "report.html").read_text()
    first = _section(md, "## mse group (VAE objective: MSE + 0.5·KL/D)")
    assert first.lstrip().startswith("> " + report.md_text(answer["text"]))
    assert first.count("![") == 1  # one figure: the objective and, beside it, its terms
    table = _md_table(first, "| path |")
    assert table[0][1] == "test objective barrier (mean [95% interval] over 3 pairs)"
    assert table[0][-2:] == ["test distortion barrier (MSE) (mean [95% interval] over 3 pairs)",
                             "test rate barrier (KL in nats per image) (mean [95% interval] over 3 pairs)"]
    for row, (name, label, _, _) in zip(table[1:], PATH_KINDS):
        want = [report.finterval(Interval.of(expected[name][k]), report.fnum)
                for k in ("objective", "distortion", "rate")]
        assert row[0] == label and [row[1], *row[-2:]] == want
        for cell in want:
            shown = re.sub(r"(\[[^\]]*\])", r'<span class="interval">\1</span>', cell)  # an interval kept whole
            assert f'<td class="num">{shown}</td>' in html
    assert report.md_text(answer["text"]) in md and answer["text"].replace("'", "&#x27;") in html
    assert "<h2>mse group (VAE objective: MSE + 0.5·KL/D)</h2>" in html


def test_a_vae_groups_details_give_each_terms_numbers(tmp_path):
    """The terms' conclusion, each pair's table, the endpoints' table (objective, distortion, rate) and the
    configuration's β."""
    beta = 0.5
    root = make_vae_study(tmp_path / "study", beta)
    record = report.write_report(root)
    expected = _expected(beta)
    md = (root / "report.md").read_text()
    terms = next(c for c in record["groups"]["mse"]["conclusions"] if c["code"] == "vae-terms")
    assert terms["numbers"]["rate"]["curve"]["mean"] == pytest.approx(np.mean(expected["curve"]["rate"]))
    assert terms["numbers"]["distortion"]["aligned_segment"]["mean"] == pytest.approx(
        np.mean(expected["aligned_segment"]["distortion"]))
    assert report.fnum(Interval.of(expected["segment"]["rate"]).mean) in terms["text"]
    assert "rate (KL in nats per image): straight segment " in terms["text"] and report.md_text(terms["text"]) in md
    # seeds 1 and 3: the curve, the segment and the aligned ones, with each term's barrier
    rows = {r[0]: r for r in _md_table(md, "### Seeds 1 and 3")}
    header = rows["path"]
    assert header[1] == "max test objective" and header[-2:] == ["test distortion barrier (MSE)",
                                                                  "test rate barrier (KL in nats per image)"]
    for label, name in (("Bezier curve (3 bends)", "curve"), ("segment", "segment"), ("aligned curve", "aligned_curve"),
                        ("aligned segment", "aligned_segment")):
        assert rows[label][2] == report.fnum(expected[name]["objective"][1])
        assert rows[label][-2:] == [report.fnum(expected[name]["distortion"][1]),
                                    report.fnum(expected[name]["rate"][1])]
    # the endpoints: the objective and its terms at t = 0 / 1, as eval-curve measured them
    endpoints = _md_table(md, "### Endpoints")
    assert endpoints[0][:5] == ["VAE", "train objective", "test objective", "test distortion (MSE)",
                                "test rate (KL in nats per image)"]
    for row, seed in zip(endpoints[1:], (1, 2, 3)):
        assert row[2:5] == [report.fnum(ENDS[seed] + beta * RATE_ENDS[seed] / D), report.fnum(ENDS[seed]),
                            report.fnum(RATE_ENDS[seed])]
    assert dict(_md_table(md, "### Configuration")[1:])["KL weight β (VAE)"].startswith("0.5 (objective: ")
    assert "The networks are VAEs" in md.split("## mse group")[0]


def test_the_first_figure_of_a_vae_group_draws_the_objective_and_its_terms(tmp_path):
    """Three panels, each path kind's mean over pairs of the objective, the distortion and the rate along t, from
    the pairs' curve.npz."""
    root = make_vae_study(tmp_path / "study", beta=1.0)
    study = collect(root)
    figs = figures.plan(study, root)
    job = next(j for j in figs.jobs if j.rel == figs.groups["mse"].mean_loss)
    assert job.make.func is figures._plot_panels and figs.groups["mse"].mean_terms
    panels = dict(job.make.args[0])
    assert list(panels) == ["held-out VAE objective (MSE + 1·KL/D)", "held-out distortion (MSE)",
                            "held-out rate (KL in nats per image)"]
    for bands, key in zip(panels.values(), ("te_loss", "te_distortion", "te_rate")):
        assert [b["label"] for b in bands] == ["straight segment", "aligned segment", "curve", "aligned curve"]
        for band, (_, _, prefix, aligned) in zip(bands, PATH_KINDS):
            runs = [np.load(root / (p.aligned_eval if aligned else p.eval) / "curve.npz")[prefix + key]
                    for p in study.groups["mse"].pairs]
            assert band["mean"] == pytest.approx(np.mean(runs, axis=0))
            assert band["hi"] == pytest.approx(np.max(runs, axis=0))
    figures.draw(figs, root)
    with Image.open(root / figs.groups["mse"].mean_loss) as im:
        assert im.width > 2 * im.height  # three panels side by side


def test_a_mixed_study_renders_each_group_as_what_it_is(tmp_path):
    """A VAE group (mse) beside an autoencoder group (vgg): each first screen, table and endpoint table as its own."""
    root = make_vae_study(tmp_path / "study", beta=2.0, losses=("mse", "vgg"), align=False)
    record = report.write_report(root)
    md = (root / "report.md").read_text()
    vae, ae = (_section(md, h) for h in ("## mse group (VAE objective: MSE + 2·KL/D)", "## vgg group (VGG "
                                                                                        "perceptual loss)"))
    assert record["groups"]["mse"]["conclusions"][0]["text"].startswith("VAE objective (MSE + 2·KL/D): ")
    assert record["groups"]["vgg"]["conclusions"][0]["text"].startswith("VGG perceptual loss: between two endpoints")
    assert "vae" not in record["groups"]["vgg"] and "te_rate_barrier" not in record["groups"]["vgg"]["pairs"][0][
        "curve"]
    assert len(_md_table(vae, "| path |")[0]) == len(_md_table(ae, "| path |")[0]) + 2
    assert "VAE" not in ae and "KL" not in ae and "rate" not in ae
    assert _md_table(_section(md, "## vgg group in detail"), "### Endpoints")[0][:3] == [
        "autoencoder", "train loss (perceptual)", "test loss (perceptual)"]
    assert _md_table(_section(md, "## mse group in detail"), "### Endpoints")[0][0] == "VAE"
    side = {r[0]: r for r in _md_table(md, "### All loss groups side by side")[1:]}
    assert set(side) == {"mse (VAE objective)", "vgg"}
    assert side["mse (VAE objective)"][2] == report.fnum(np.mean(_expected(2.0)["segment"]["objective"]))
    assert dict(_md_table(md, "### Configuration")[1:])["KL weight β (VAE)"].startswith("2 (objective")


def test_a_vae_group_before_its_evaluations_and_a_damaged_vae_entry(tmp_path, capsys):
    """Before any evaluation, a built-in VAE's group is named by its objective (study.json's β); an eval.json whose
    "vae" is not true or false is named as damaged and left out."""
    root = make_vae_study(tmp_path / "study", beta=0.25, align=False)
    for pair in json.loads((root / "study.json").read_text())["groups"]["mse"]["pairs"]:
        (root / pair["eval"] / "eval.json").unlink()
    record = report.write_report(root)
    assert record["groups"]["mse"]["vae"] == {"kl_weight": 0.25, "distortion": None}
    assert "## mse group (VAE objective: MSE + 0.25·KL/D)" in (root / "report.md").read_text()
    assert conclusions.objective_name("vgg", None) == "VGG perceptual loss"

    root = make_vae_study(tmp_path / "damaged", align=False)
    path = root / "curves/mse_seed1-seed2/eval/eval.json"
    path.write_text(path.read_text().replace('"vae": true', '"vae": "yes"'))
    record = report.write_report(root)
    assert record["damaged"] == {"curves/mse_seed1-seed2/eval/eval.json": 'vae is "yes", not true or false'}
    assert record["groups"]["mse"]["summary"]["pairs_evaluated"] == 2
    assert "curves/mse_seed1-seed2/eval/eval.json is damaged" in capsys.readouterr().err
