"""A study folder is a trust boundary (issue 27; docs/reliability.md, "Folders someone sent"): aecurves reads and
writes only inside it, follows no link there when writing, clearing or reading results, and refuses what it cannot
trust, naming it: links at any level, files of a newer release, another command's outputs."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aecurves import report
from aecurves.commands.study import KINDS, Stage, Study
from aecurves.errors import UserError
from aecurves.records import OUTPUTS

from conftest import run_cli
from slurm_cluster import skip_reason, slurm_cluster

# the executors' tests' tiny study (every kind of stage) with a 2x2 plane too: 15 stages in about 15 s
TINY = ["--dataset", "synthetic", "--image-size", 16, "--limit", 128, "--width", 8, "--latent-dim", 8,
        "--batch-size", 32, "--lr", 3e-3, "--epochs", 2, "--curve-epochs", 2, "--curve-lr", 3e-3, "--num-points", 4,
        "--bn-images", 32, "--train-images", 32, "--ensemble", 2, "--losses", "mse", "--seeds", "1,2",
        "--precision", "fp32", "--device", "cpu", "--vgg-weights", "random", "--plane-grid", 2, "--no-progress"]
RUN, JOB = "20250101-000000-abcd", "4242"  # a Slurm run folder and job as executors.SlurmExecutor and submitit lay out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny study, with the logs/ and slurm/ an executor leaves (a local log; a Slurm run folder with
    submitit's own link, RUN/.submission_file_UUID.sh -> RUN/JOB/JOB_submission.sh)."""
    root = tmp_path_factory.mktemp("finished") / "study"
    assert run_cli("study", *TINY, "--out", root) == 0
    (root / "logs").mkdir()
    (root / "logs/endpoint_mse_1.log").write_text("a stage's output\n")
    job = root / "slurm" / RUN / JOB
    job.mkdir(parents=True)
    (job / f"{JOB}_submission.sh").write_text("#!/bin/bash\n")
    (job / f"{JOB}_0_log.out").write_text("a job's output\n")
    return root


@pytest.fixture
def study(finished, tmp_path) -> Path:
    root = tmp_path / "study"
    shutil.copytree(finished, root, symlinks=True)
    # made here, where it lives: submitit's link is absolute
    (root / "slurm" / RUN / ".submission_file_0123abcd.sh").symlink_to(root / "slurm" / RUN / JOB /
                                                                          f"{JOB}_submission.sh")
    return root


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`, found without following links: a file's bytes' hash and mtime, a link's target."""
    found = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_file():
                found[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            else:
                found[rel] = ("folder",)
    return found


def test_a_clean_rerun_skips_everything_and_accepts_submitits_own_link(study, capsys):
    """The study's own layout (curves/X/eval/, logs/, slurm/RUN/ with submitit's link) is no reason to refuse."""
    before = snapshot(study / "endpoints")
    assert run_cli("study", *TINY, "--out", study) == 0
    assert "0 stages run, 15 already finished" in capsys.readouterr().out
    assert snapshot(study / "endpoints") == before


def test_the_folder_named_may_itself_be_a_link(study, tmp_path, capsys):
    named = tmp_path / "named"
    named.symlink_to(study)
    assert run_cli("study", *TINY, "--out", named) == 0
    assert "0 stages run, 15 already finished" in capsys.readouterr().out
    assert run_cli("report", named) == 0


@pytest.mark.slow
def test_a_slurm_study_reruns_past_submitits_own_links_and_a_copy_of_it_is_refused(tmp_path, monkeypatch, capsys):
    """On the test cluster: submitit leaves a link per job in the study's run folder; a re-run (Slurm or serial)
    accepts those, but in a copy of the folder they point into the original, and the copy is refused."""
    if reason := skip_reason():
        pytest.skip(reason)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = [*TINY, "--no-align", "--no-extra-training", "--no-fge", "--plane-grid", 0]
    slurm = ["--executor", "slurm", "--slurm-partition", "debug", "--slurm-cpus", 1, "--slurm-time", 10]
    root = tmp_path / "study"
    with slurm_cluster(tmp_path / "cluster"):
        assert run_cli("study", *flags, *slurm, "--out", root) == 0
        links = sorted((root / "slurm").glob("*/.submission_file_*.sh"))
        assert len(links) == 4 and all(p.is_symlink() for p in links)  # 2 endpoints, a curve, its evaluation
        capsys.readouterr()
        assert run_cli("study", *flags, *slurm, "--out", root) == 0
        rerun = capsys.readouterr().out
        assert "0 stages run, 5 already finished" in rerun, rerun
    assert run_cli("study", *flags, "--out", root) == 0
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    assert run_cli("study", *flags, "--out", copy) == 2
    err = capsys.readouterr().err
    assert f"-> {root}/slurm/" in err and "holds symbolic links" in err


# ----------------------------------------------------------------------------------------------------------
# a link at every level: each moves a part of the study out to the canary folder and links to it there (or links
# to something else), as a folder someone sent may


def _move_out(rel: str, relative: bool = False):
    def make(root: Path, canary: Path) -> Path:
        link, target = root / rel, canary / Path(rel).name
        shutil.move(link, target)
        link.symlink_to(os.path.relpath(target, link.parent) if relative else target)
        return link
    return make


def _link(rel: str, to):
    def make(root: Path, canary: Path) -> Path:
        link = root / rel
        if link.is_dir():
            shutil.rmtree(link)
        elif link.exists():
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(to(root, canary))
        return link
    return make


LINKS = {
    "stage folder": _move_out("endpoints/mse_seed1_extra"),
    "stage folder, relative": _move_out("fge/mse_seed2", relative=True),
    "file in a stage folder": _move_out("endpoints/mse_seed1/checkpoint.pt"),
    "eval/ in a curve folder": _move_out("curves/mse_seed1-seed2/eval"),
    "plane/ in a curve folder": _move_out("curves/mse_seed1-seed2/plane", relative=True),
    "stage record": _move_out("aligned/mse_seed2-to-seed1/study_stage.json"),
    "logs/": _move_out("logs"),
    "logs/X.log": _move_out("logs/endpoint_mse_1.log"),
    "slurm/": _move_out("slurm"),
    "slurm run folder": _move_out(f"slurm/{RUN}"),
    "slurm job folder": _move_out(f"slurm/{RUN}/{JOB}"),
    "a submission link pointing elsewhere": _link(f"slurm/{RUN}/.submission_file_0123abcd.sh",
                                                  lambda root, canary: canary / "file.txt"),
    "report_files/": _move_out("report_files"),
    "report.html": _move_out("report.html"),
    "study.json": _move_out("study.json"),
    "dangling": _link("endpoints/mse_seed2/metrics.jsonl", lambda root, canary: canary / "nothing-here"),
    "to a folder inside": _link("ensembles/mse_seed1-seed2", lambda root, canary: root / "baselines/mse_seed1-seed2"),
    "to the folder itself": _link("baselines/loop", lambda root, canary: ".."),
    "new top-level link": _link("data", lambda root, canary: canary),
}
COMMANDS = {
    "re-run": lambda root: ["study", *TINY, "--out", root],
    "--force all": lambda root: ["study", *TINY, "--out", root, "--force", "all"],
    "--force its kinds": lambda root: ["study", *TINY, "--out", root, *(f"--force={k}" for k in (
        "extras", "fges", "evals", "planes", "aligns", "ensembles"))],
    "--plan": lambda root: ["study", *TINY, "--out", root, "--plan"],
    "report": lambda root: ["report", root],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", LINKS)
def test_a_link_anywhere_in_the_study_folder_is_refused_and_nothing_changes(study, tmp_path, capsys, where,
                                                                             command):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "file.txt").write_text("someone else's file\n")
    link = LINKS[where](study, canary)
    inside, outside = snapshot(study), snapshot(canary)
    assert run_cli(*COMMANDS[command](study)) == 2
    captured = capsys.readouterr()
    assert f"{link} -> {os.readlink(link)}" in captured.err and "nothing was changed" in captured.err
    assert "docs/reliability.md#folders-someone-sent" in captured.err and "Traceback" not in captured.err
    assert "stage" not in captured.out  # refused before any stage was judged or planned
    assert snapshot(study) == inside and snapshot(canary) == outside


def test_clear_follows_no_link_even_one_made_after_the_check(study, tmp_path):
    """Defence in depth: Study.clear itself refuses a linked stage folder (N2: it used to delete the target's
    files)."""
    _move_out("endpoints/mse_seed1_extra")(study, tmp_path)
    canary = tmp_path / "mse_seed1_extra"
    before = snapshot(canary)
    st = Stage("extra:mse:1", "extra", "", "endpoints/mse_seed1_extra")
    with pytest.raises(UserError, match="is a symbolic link"):
        Study(SimpleNamespace(out=str(study))).clear(st)
    assert snapshot(canary) == before and len(before) > 3
    # a link inside a stage folder is removed as a link; its target stays
    folder = study / "fge/mse_seed1"
    (folder / "elsewhere").symlink_to(canary)
    Study(SimpleNamespace(out=str(study))).clear(Stage("fge:mse:1", "fge", "", "fge/mse_seed1"))
    assert list(folder.iterdir()) == [] and snapshot(canary) == before
    # a curve keeps its eval/ and plane/ (other stages')
    Study(SimpleNamespace(out=str(study))).clear(Stage("curve:mse:1-2", "curve", "", "curves/mse_seed1-seed2"))
    assert sorted(p.name for p in (study / "curves/mse_seed1-seed2").iterdir()) == sorted(KINDS["curve"].keep)


def test_the_report_writes_through_no_link_made_after_its_check(study, tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    canary.mkdir()
    link = _move_out("report_files")(study, canary)
    before = snapshot(canary)
    monkeypatch.setattr(report, "refuse_study_links", lambda root: None)  # as if the link came later
    with pytest.raises(UserError, match="is a symbolic link") as exc:
        report.write_report(study)
    assert str(link) in str(exc.value) and snapshot(canary) == before


def test_a_hard_linked_report_file_is_replaced_by_name_and_the_other_file_is_unchanged(study, tmp_path):
    """A hard link is no symbolic link: not refused, and harmless to an atomic write (the rename replaces the name,
    not the file), so the file it shares its bytes with keeps them."""
    other = tmp_path / "other.html"
    other.write_text("someone else's page\n")
    (study / "report.html").unlink()
    os.link(other, study / "report.html")
    assert run_cli("report", study) == 0
    assert other.read_text() == "someone else's page\n" and other.stat().st_nlink == 1
    assert "<html" in (study / "report.html").read_text()


def test_hard_links_into_the_study_never_change_the_other_file(study, tmp_path, capsys):
    """Hard links are no links to follow: a forced stage clears their names and writes new files, a re-run rewrites
    study.json and its stage records by renaming, so the files outside that share their bytes keep them."""
    outside = {}
    for rel in ("endpoints/mse_seed1_extra/metrics.jsonl", "endpoints/mse_seed2_extra/study_stage.json",
                "study.json", "report.md"):
        other = tmp_path / rel.replace("/", "_")
        shutil.copy(study / rel, other)
        (study / rel).unlink()
        os.link(other, study / rel)
        outside[other] = other.read_bytes()
    assert run_cli("study", *TINY, "--out", study, "--force", "extras") == 0
    assert "5 stages run, 10 already finished" in capsys.readouterr().out  # extras, baseline, ensembles, report
    assert {p: p.read_bytes() for p in outside} == outside
    assert all(p.stat().st_nlink == 1 for p in outside)


# ----------------------------------------------------------------------------------------------------------
# N4: a folder a newer release wrote


def _newer_json(rel: str, key: str = "format_version"):
    def make(root: Path) -> str:
        path = root / rel
        record = json.loads(path.read_text())
        record[key] = 99
        path.write_text(json.dumps(record))
        return f"{path} has {key} 99"
    return make


def _newer_checkpoint(rel: str, **drop):
    def make(root: Path) -> str:
        path = root / rel
        state = torch.load(path, weights_only=True)
        state["format_version"] = 99
        for key in drop:
            del state[key]  # a layout this release cannot read
        torch.save(state, path)
        return f"{path} has format_version 99"
    return make


NEWER = {
    "study.json": _newer_json("study.json"),
    "report.json": _newer_json("report.json"),
    "eval.json": _newer_json("curves/mse_seed1-seed2/eval/eval.json"),
    "baseline eval.json": _newer_json("baselines/mse_seed1-seed2/eval.json"),
    "plane.json": _newer_json("curves/mse_seed1-seed2/plane/plane.json"),
    "study_stage.json": _newer_json("endpoints/mse_seed2/study_stage.json"),
    "fge.json": _newer_json("fge/mse_seed1/fge.json", "format"),
    "ensembles.json": _newer_json("ensembles/mse_seed1-seed2/ensembles.json", "format"),
    "endpoint checkpoint": _newer_checkpoint("endpoints/mse_seed1/checkpoint.pt"),
    "curve checkpoint, another layout": _newer_checkpoint("curves/mse_seed1-seed2_aligned/checkpoint.pt",
                                                          optimizer=None),
    "aligned checkpoint": _newer_checkpoint("aligned/mse_seed2-to-seed1/checkpoint.pt"),
}


@pytest.mark.parametrize("command", ["re-run", "--force all", "--plan"])
@pytest.mark.parametrize("which", NEWER)
def test_a_newer_releases_files_are_refused_before_anything_is_rewritten(study, capsys, which, command):
    """N4: the study used to rewrite study.json as its own format and delete and recompute a newer eval.json it
    could not read; now it refuses, naming the file and its version, and changes nothing."""
    named = NEWER[which](study)
    before = snapshot(study)
    assert run_cli(*COMMANDS[command](study)) == 2
    err = capsys.readouterr().err
    assert named in err and "written by another release" in err and "Traceback" not in err
    assert "continue the study with that release, or choose another --out folder" in err
    assert snapshot(study) == before


def test_the_report_refuses_a_newer_report_and_names_a_newer_input(study, capsys):
    NEWER["eval.json"](study)
    assert run_cli("report", study) == 0  # an input it cannot read: named, and left out
    err = capsys.readouterr().err
    assert f"{study / 'curves/mse_seed1-seed2/eval/eval.json'} is damaged (eval.json has format_version 99" in err
    assert "written by another release" in err
    NEWER["report.json"](study)
    before = snapshot(study)
    assert run_cli("report", study) == 2
    assert f"{study / 'report.json'} has format_version 99" in capsys.readouterr().err
    assert snapshot(study) == before


# ----------------------------------------------------------------------------------------------------------
# N5: one command's output folder is not another's


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_eval_curve_and_plane_refuse_a_training_runs_folder(finished, tmp_path, capsys, overwrite):
    """eval-curve --out into a training run's folder used to replace its reconstructions.png; --overwrite replaces
    only an evaluation's own files."""
    a, b = (finished / f"endpoints/mse_seed{s}/checkpoint.pt" for s in (1, 2))
    for rel in ("endpoints/mse_seed1", "curves/mse_seed1-seed2", "fge/mse_seed1"):
        out = tmp_path / rel
        shutil.copytree(finished / rel, out)
        before = snapshot(out)
        assert run_cli("eval-curve", "--segment", a, b, "--num-points", 2, "--out", out, *overwrite) == 2
        err = capsys.readouterr().err
        assert f"The output folder {out} holds the files of a training run (checkpoint.pt, metrics.jsonl" in err
        assert "not of eval-curve" in err and "nothing was changed" in err
        assert run_cli("plane", "--points", a, b, finished / "endpoints/mse_seed1_extra/checkpoint.pt", "--grid", 2,
                       "--out", out, *overwrite) == 2
        assert "holds the files of a training run" in capsys.readouterr().err
        assert snapshot(out) == before


@pytest.mark.parametrize("rel, names", [
    ("curves/mse_seed1-seed2/eval", "eval.json, curve.npz, loss_along_path.png, reconstructions_segment.png, "
                                    "ensemble.png"),
    ("baselines/mse_seed1-seed2", "eval.json, curve.npz, loss_along_path.png"),
    ("curves/mse_seed1-seed2/plane", "plane.json, plane.npz, plane.png"),
])
@pytest.mark.parametrize("command", ["train", "train --resume", "train-curve"])
def test_train_and_train_curve_refuse_an_evaluations_folder(finished, tmp_path, capsys, rel, names, command):
    """train --out into an evaluation's folder used to replace its reconstructions.png."""
    out = tmp_path / "out"
    shutil.copytree(finished / rel, out)
    before = snapshot(out)
    a, b = (finished / f"endpoints/mse_seed{s}/checkpoint.pt" for s in (1, 2))
    argv = {"train": ["train", *TINY[:12], "--epochs", 1],
            "train --resume": ["train", *TINY[:12], "--epochs", 1, "--resume"],
            "train-curve": ["train-curve", "--init_start", a, "--init_end", b, "--epochs", 1]}[command]
    assert run_cli(*argv, "--out", out) == 2
    err = capsys.readouterr().err
    kind = "an evaluation" if "eval" in names else "a plane"
    assert f"The output folder {out} holds the files of {kind} ({names})" in err and "nothing was changed" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("rel, kind, planted", [
    ("endpoints/mse_seed1", "an evaluation", "eval.json"),
    ("curves/mse_seed1-seed2", "a plane", "plane.png"),
    ("curves/mse_seed1-seed2/eval", "a training run", "checkpoint.pt"),
    ("baselines/mse_seed1-seed2", "a training run", "metrics.jsonl"),
])
def test_the_study_refuses_a_stage_folder_holding_another_commands_outputs(study, capsys, rel, kind, planted):
    """The re-run used to notice neither mix: a stage folder with files no stage of its kind writes."""
    source = next(p for p in study.rglob(planted) if p.parent != study / rel)
    shutil.copy(source, study / rel / planted)
    before = snapshot(study)
    assert run_cli("study", *TINY, "--out", study) == 2
    err = capsys.readouterr().err
    assert f"The folder {study / rel} of the stage" in err and f"holds the files of {kind} ({planted})" in err
    assert planted in err and "nothing was changed" in err
    assert snapshot(study) == before


def test_outputs_table_tells_the_commands_apart():
    """No name is in two kinds of output (reconstructions.png, train's and eval-curve's, is in none)."""
    names = [n for kind in OUTPUTS.values() for n in kind]
    assert len(names) == len(set(names)) and "reconstructions.png" not in names
