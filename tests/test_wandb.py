"""Weights & Biases logging (--wandb): offline runs (WANDB_MODE=offline, no account, no network) read back from
their files and compared with what the commands wrote (metrics.jsonl, eval.json, report.json); a missing wandb or a
failing one never fails a run."""

import json
import struct
import sys
from pathlib import Path

import pytest

from aecurves import wandb_log
from aecurves.config import StudyConfig, make

from conftest import run_cli

wandb = pytest.importorskip("wandb", reason="the optional wandb package is not installed: pip install "
                                            "'aecurves[wandb]'")
from wandb.proto import wandb_internal_pb2  # noqa: E402

# a network and a data set small enough for each command to run in a second or two
SMALL = ["--dataset", "synthetic", "--image-size", "16", "--limit", "64", "--width", "4", "--latent-dim", "8",
         "--batch-size", "32", "--lr", "3e-3", "--no-progress", "--precision", "fp32", "--device", "cpu"]
EVAL = ["--num-points", "3", "--bn-images", "32", "--train-images", "32", "--num-images", "2", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> Path:
    """Every W&B run of a test goes to its own folder, offline. wandb reads its environment once per process (its
    setup singleton), so it is torn down around each test."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield folder
    wandb.teardown()


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("endpoints")
    for seed in (1, 2):
        assert run_cli("train", *SMALL, "--epochs", 1, "--seed", seed, "--out", root / f"seed{seed}") == 0
    return root / "seed1" / "checkpoint.pt", root / "seed2" / "checkpoint.pt"


# ----------------------------------------------------------------------------------------------------------
# an offline run read back: its .wandb file is a LevelDB-style log of wandb_internal_pb2.Record messages


def records(path: Path):
    """The Records of a run's .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks,
    each a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(folder: Path) -> dict:
    """{name, group, project, job_type, config, history: {step: values}, summary}: an offline run as its file
    holds it."""
    run = {"history": {}, "summary": {}, "config": {}}
    for r in records(next(folder.glob("*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(name=r.run.display_name, group=r.run.run_group, project=r.run.project,
                       job_type=r.run.job_type)
            run["config"].update(_items(r.run.config.update))
        elif kind == "config":
            run["config"].update(_items(r.config.update))
        elif kind == "history":
            values = _items(r.history.item)
            run["history"][r.history.step.num] = {k: v for k, v in values.items() if not k.startswith("_")}
        elif kind == "summary":
            run["summary"].update(_items(r.summary.update))
    run["folder"] = folder
    return run


def offline_runs(wandb_dir: Path) -> dict:
    """{run name: run} of every offline run under WANDB_DIR, once wandb's service has closed their files (a
    finished run's file may still be in its writer's buffer until then)."""
    wandb.teardown()
    runs = [read_run(f) for f in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    return {r["name"]: r for r in runs}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------------------
# each command's run


def test_train_logs_every_epochs_row_at_its_epoch(tmp_path, offline):
    out = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", 2, "--out", out, "--wandb", "proj", "--wandb-group", "g",
                   "--wandb-name", "endpoint-a") == 0
    runs = offline_runs(offline)
    assert list(runs) == ["endpoint-a"]
    run = runs["endpoint-a"]
    assert (run["project"], run["group"], run["job_type"]) == ("proj", "g", "train")
    assert run["config"]["seed"] == 42 and run["config"]["epochs"] == 2
    rows = metrics(out)
    assert sorted(run["history"]) == [1, 2]
    for row in rows:
        logged = run["history"][row["epoch"]]
        assert logged == numbers(row)  # every number of the row, exactly, train_loss and test_psnr among them
        assert {"train_loss", "test_loss", "test_mse", "test_psnr", "lr"} <= set(logged)
    assert run["summary"]["test_psnr"] == rows[-1]["test_psnr"]  # W&B's summary: the last epoch's values


def test_without_a_name_the_run_is_named_by_its_folder_and_nothing_is_logged_without_wandb(tmp_path, offline):
    assert run_cli("train", *SMALL, "--epochs", 1, "--out", tmp_path / "plain") == 0
    assert not (offline / "wandb").exists()  # no --wandb: W&B is never started
    assert run_cli("train", *SMALL, "--epochs", 1, "--out", tmp_path / "runs" / "mine", "--wandb", "p") == 0
    (run,) = offline_runs(offline).values()
    assert run["name"] == "runs/mine" and run["group"] == ""


def test_train_curve_logs_its_epoch_rows(tmp_path, offline, endpoints):
    a, b = endpoints
    out = tmp_path / "curve"
    assert run_cli("train-curve", "--init-start", a, "--init-end", b, "--epochs", 2, "--bn-images", 32,
                   "--batch-size", 32, "--no-progress", "--device", "cpu", "--out", out, "--wandb", "p",
                   "--wandb-name", "curve:mse:1-2") == 0
    run = offline_runs(offline)["curve:mse:1-2"]
    rows = metrics(out)
    assert run["job_type"] == "train-curve" and sorted(run["history"]) == [1, 2]
    for row in rows:
        assert run["history"][row["epoch"]] == numbers(row)
    assert {"train_loss", "train_l2_term", "mid_test_loss", "mid_test_psnr"} <= set(run["history"][2])


def test_fge_logs_its_epoch_rows_and_the_ensembles_numbers(tmp_path, offline, endpoints):
    out = tmp_path / "fge"
    assert run_cli("fge", "--ckpt", endpoints[0], "--epochs", 2, "--cycle", 2, "--bn-images", 32, "--num-images", 0,
                   "--no-progress", "--precision", "fp32", "--device", "cpu", "--out", out, "--wandb", "p") == 0
    (run,) = offline_runs(offline).values()
    rows = metrics(out)
    assert run["job_type"] == "fge" and sorted(run["history"]) == [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert run["history"][row["epoch"]] == numbers(row)
    fge = json.loads((out / "fge.json").read_text())
    expected = wandb_log.numbers({k: fge[k] for k in ("start", "ensemble", "ensemble_mse_gain")})
    assert {"ensemble/mse", "ensemble/psnr", "start/mse", "ensemble_mse_gain/vs_start"} <= set(expected)
    assert {k: run["summary"][k] for k in expected} == expected


def test_eval_curve_logs_its_series_as_a_table_and_its_figure(tmp_path, offline, endpoints):
    out = tmp_path / "segment"
    assert run_cli("eval-curve", "--segment", *endpoints, *EVAL, "--out", out, "--wandb", "p",
                   "--wandb-group", "study-x") == 0
    (run,) = offline_runs(offline).values()
    assert (run["job_type"], run["group"]) == ("eval-curve", "study-x")
    record = json.loads((out / "eval.json").read_text())
    series = record["series"]
    tables = list((run["folder"] / "files" / "media" / "table").glob("series_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    columns = table["columns"]
    assert columns[0] == "t" and "te_loss" in columns
    assert len(table["data"]) == len(series["ts"]) == 3  # one row per t
    for i, row in enumerate(table["data"]):
        assert row[0] == series["ts"][i]
        for name, value in zip(columns[1:], row[1:]):
            assert value == series[name][i], name
    images = list((run["folder"] / "files" / "media" / "images").glob("loss_along_path_*.png"))
    assert len(images) == 1
    logged = {k: v for k, v in run["summary"].items() if k.startswith("paths/")}
    assert logged == {f"paths/{k}": v for k, v in wandb_log.numbers(record["paths"]).items()} and logged


def test_a_curve_evaluations_table_has_both_paths_in_one_row_per_t():
    series = {"ts": [0.0, 0.5, 1.0], "te_loss": [1.0, 2.0, 1.0], "segment_ts": [0.0, 0.5, 1.0],
              "segment_te_loss": [1.0, 3.0, 1.0], "short": [1.0]}
    assert wandb_log.series_table(series) == (["t", "te_loss", "segment_te_loss"],
                                              [[0.0, 1.0, 1.0], [0.5, 2.0, 3.0], [1.0, 1.0, 1.0]])


# ----------------------------------------------------------------------------------------------------------
# failures never fail a run


def _notes(captured: str) -> list[str]:
    return [line for line in captured.splitlines() if line.startswith("W&B:")]


def test_a_missing_wandb_is_a_one_line_note(tmp_path, offline, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is not installed
        assert run_cli("train", *SMALL, "--epochs", 1, "--out", out, "--wandb", "p") == 0
    notes = _notes(capsys.readouterr().err)
    assert len(notes) == 1 and "not installed" in notes[0] and notes[0].endswith(wandb_log.GOES_ON)
    assert len(metrics(out)) == 1 and (out / "checkpoint.pt").is_file()
    assert not (offline / "wandb").exists()


def test_a_failing_init_is_a_one_line_note(tmp_path, offline, monkeypatch, capsys):
    def refuse(**kwargs):
        raise RuntimeError("no network here")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", 1, "--out", out, "--wandb", "p") == 0
    notes = _notes(capsys.readouterr().err)
    assert len(notes) == 1 and "RuntimeError: no network here" in notes[0] and notes[0].endswith(wandb_log.GOES_ON)
    assert len(metrics(out)) == 1


def test_a_failing_log_is_a_one_line_note_and_the_run_goes_on(tmp_path, offline, monkeypatch, capsys):
    from wandb.sdk.wandb_run import Run

    calls = []

    def broken(self, *args, **kwargs):
        calls.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(Run, "log", broken)
    out = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", 2, "--out", out, "--wandb", "p") == 0
    notes = _notes(capsys.readouterr().err)
    assert len(notes) == 1 and "OSError: disk full" in notes[0]
    assert len(calls) == 1  # after the failure, nothing more is tried
    assert len(metrics(out)) == 2


def test_only_rank_0_starts_a_run(tmp_path, offline):
    cfg = make(StudyConfig, {"wandb": "p"})  # any config with --wandb
    with wandb_log.logging_run(cfg, "train", tmp_path, is_main=False, name="x") as tracker:
        tracker.log({"a": 1.0}, 1)
        assert not tracker.active
    assert not (offline / "wandb").exists()


def test_the_other_wandb_flags_are_refused_without_wandb(tmp_path, capsys):
    assert run_cli("train", *SMALL, "--epochs", 1, "--out", tmp_path / "r", "--wandb-group", "g") == 2
    assert "--wandb-group would be ignored without --wandb PROJECT" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------------
# the study


def test_the_studys_wandb_settings_reach_its_training_and_evaluation_stages(tmp_path):
    from aecurves.commands.study.settings import resolve, section, section_record, study_record

    settings = resolve(make(StudyConfig, {"out": str(tmp_path / "my-study"), "wandb": "p", "wandb_entity": "me"}))
    assert settings.wandb_group == "my-study"  # the study folder's name
    for name in ("endpoints", "extras", "fges", "curves", "evals"):
        cfg = section(settings, name)
        assert (cfg.wandb, cfg.wandb_entity, cfg.wandb_group) == ("p", "me", "my-study"), name
        assert not {"wandb", "wandb_entity", "wandb_group"} & set(section_record(settings, name))
    assert not hasattr(section(settings, "aligns"), "wandb")
    assert not any(k.startswith("wandb") for k in study_record(settings))  # study.json: not what the study is
    plain = resolve(make(StudyConfig, {"out": str(tmp_path / "my-study")}))
    assert section(plain, "endpoints").wandb is None and plain.wandb_group is None
    given = resolve(make(StudyConfig, {"out": str(tmp_path / "s"), "wandb": "p", "wandb_group": "mine"}))
    assert section(given, "curves").wandb_group == "mine"


def test_the_studys_summary_numbers_go_to_a_run_named_study(tmp_path, offline):
    from aecurves.commands.study.settings import resolve, study_record

    settings = resolve(make(StudyConfig, {"out": str(tmp_path / "st"), "wandb": "p"}))
    report = {"groups": {"mse": {"summary": {"pairs": 3, "segment_te_barrier_mean": 0.25, "note": "text",
                                             "paths": {"curve": {"barrier": {"mean": 0.01, "lo": None}}}}},
                         "vgg": {"status": "skipped", "summary": None}}}
    wandb_log.log_study(settings, study_record(settings), report)
    run = offline_runs(offline)["study"]
    assert (run["group"], run["job_type"]) == ("st", "study")
    summary = {k: v for k, v in run["summary"].items() if not k.startswith("_")}
    assert summary == {"mse/pairs": 3, "mse/segment_te_barrier_mean": 0.25, "mse/paths/curve/barrier/mean": 0.01}
    assert run["config"]["preset"] == "demo"


@pytest.mark.slow
def test_a_study_logs_each_stage_as_a_run_named_by_it_in_one_group(tmp_path, offline):
    root = tmp_path / "demo-study"
    assert run_cli("study", *SMALL[:-4], "--epochs", 1, "--curve-epochs", 1, "--num-points", 3, "--bn-images", 32,
                   "--train-images", 32, "--losses", "mse", "--seeds", "1,2", "--no-extra-training", "--no-fge",
                   "--no-align", "--plane-grid", 0, "--vgg-weights", "random", "--precision", "fp32", "--device",
                   "cpu", "--out", root, "--wandb", "p") == 0
    runs = offline_runs(offline)
    assert set(runs) == {"endpoint:mse:1", "endpoint:mse:2", "curve:mse:1-2", "eval:mse:1-2", "study"}
    assert {r["group"] for r in runs.values()} == {"demo-study"}
    for seed in (1, 2):
        rows = metrics(root / "endpoints" / f"mse_seed{seed}")
        assert runs[f"endpoint:mse:{seed}"]["history"][1] == numbers(rows[0])
    report = json.loads((root / "report.json").read_text())
    expected = {f"mse/{k}": v for k, v in wandb_log.numbers(report["groups"]["mse"]["summary"]).items()}
    assert {k: v for k, v in runs["study"]["summary"].items() if not k.startswith("_")} == expected
