"""records: the typed records at the file boundary read their own layout and the last release's, and refuse others."""

import json

import pytest

from aecurves.errors import UserError
from aecurves.records import (
    EndpointRecord,
    EnsemblesRecord,
    EvalRecord,
    FgeRecord,
    NewerFormat,
    PlaneRecord,
    RecordError,
    StageRecord,
    StudyRecord,
    check_format,
    refuse_other_outputs,
)

CURVE = {"te_barrier": 0.01, "te_loss_start": 0.5, "te_loss_end": 0.6, "length": 3.0}
SEGMENT = {"te_barrier": 0.05, "te_loss_start": 0.5, "te_loss_end": 0.6, "length": 2.0}


def old_curve_eval() -> dict:
    """eval.json as eval-curve --ckpt wrote it before format 2 (the keys and their order of eval_record then)."""
    return {"kind": "curve", "checkpoint": "/c/checkpoint.pt", "endpoints": ["/a.pt", "/b.pt"],
            "path": {"curve": "Bezier", "num_bends": 3}, "segment_evaluated": True, "perceptual": False,
            "ssim": True, "num_points": 5, "reconstruction_ts": [0.0, 0.5, 1.0], "loss": "mse",
            "loss_description": "mean squared error", "data": {"train_images": 64, "test_images": 32},
            "bn": {"recomputed": True, "images": 64, "subset": "x", "subset_seed": 0}, "train_metric_images": 64,
            "test_metric_images": 32, "notes": [], "device": "cpu", "precision": "fp32", "points_per_call": 1,
            "memory_format": "contiguous", "compiled": False, "seconds": 1.5, "config": {"ckpt": "/c/checkpoint.pt"},
            "summary": {**CURVE, **{"segment_" + k: v for k, v in SEGMENT.items()}},
            "series": {"ts": [0, 1], "segment_ts": [0, 1]}, "renormalize": False, "renormalization": None,
            "files": {"json": "/c/eval/eval.json", "npz": "/c/eval/curve.npz"}}


def old_segment_eval() -> dict:
    record = old_curve_eval()
    record.update(kind="segment", checkpoint=None, path={"curve": "segment", "num_bends": 2},
                  segment_evaluated=False, summary=dict(SEGMENT), series={"ts": [0, 1]})
    return record


def test_the_last_releases_curve_eval_json_reads_as_nested_paths():
    record = EvalRecord.from_json(old_curve_eval())
    assert record.kind == "curve" and record.paths == {"curve": CURVE, "segment": SEGMENT}
    assert record.segment_evaluated is True and record.checkpoint == "/c/checkpoint.pt"
    assert record.files["npz"] == "/c/eval/curve.npz" and record.config == {"ckpt": "/c/checkpoint.pt"}
    assert record.flat_summary() == old_curve_eval()["summary"]
    new = record.to_json()
    assert new["format_version"] == EvalRecord.FORMAT == 2 and "summary" not in new
    assert new["paths"]["segment"]["te_barrier"] == 0.05 and new["paths"]["curve"]["te_barrier"] == 0.01
    # every other key is kept, as written
    kept = {k: v for k, v in old_curve_eval().items() if k != "summary"}
    assert {k: new[k] for k in kept} == kept


def test_a_segment_only_evaluation_has_only_its_segment():
    record = EvalRecord.from_json(old_segment_eval())
    assert record.kind == "segment" and record.paths == {"segment": SEGMENT} and record.path("curve") is None
    assert record.flat_summary() == SEGMENT  # curve.npz's flat keys: the segment's plain, as before


def test_a_curve_without_its_segment():
    old = old_curve_eval()
    old.update(segment_evaluated=False, summary=dict(CURVE))
    record = EvalRecord.from_json(old)
    assert record.paths == {"curve": CURVE} and record.path("segment") is None


@pytest.mark.parametrize("make", [old_curve_eval, old_segment_eval])
def test_round_trip(make):
    record = EvalRecord.from_json(make())
    again = EvalRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and again.to_json() == record.to_json()


def test_an_eval_json_without_its_kind_reads_as_before():
    old = old_segment_eval()
    del old["kind"]
    assert EvalRecord.from_json(old).kind == "segment"
    old = old_curve_eval()
    del old["kind"]
    assert EvalRecord.from_json(old).kind == "curve"


def _damaged(change):
    def make():
        d = old_curve_eval()
        change(d)
        return d
    return make


@pytest.mark.parametrize("make, reason", [
    (lambda: None, "the file is null, not an object"),
    (lambda: [1], "the file is [1], not an object"),
    (_damaged(lambda d: d.update(summary=[1, 2])), "summary is [1, 2], not an object"),
    (_damaged(lambda d: d.pop("summary")), "summary is null, not an object"),
    (_damaged(lambda d: d.update(config=None)), "config is null, not an object"),
    (_damaged(lambda d: d.update(kind="plane")), "its kind is 'plane'"),
    (_damaged(lambda d: d.update(format_version=7)), "format_version 7"),
    (lambda: {**EvalRecord.from_json(old_curve_eval()).to_json(), "paths": {"bend": {}}}, "paths.bend is no path"),
    (lambda: {**EvalRecord.from_json(old_curve_eval()).to_json(), "paths": {"curve": 3}}, "paths.curve is 3"),
    (lambda: {**EvalRecord.from_json(old_segment_eval()).to_json(), "paths": {"curve": {}}}, "has a curve"),
])
def test_a_file_it_cannot_read_is_refused_saying_why(make, reason):
    with pytest.raises(RecordError, match="x/eval.json") as exc:
        EvalRecord.from_json(make(), "x/eval.json")
    assert reason in str(exc.value) and isinstance(exc.value, UserError)


def test_plane_stage_study_and_endpoint_records_read_the_last_releases_layout_and_round_trip():
    plane = {"kind": "curve", "inputs": ["/c.pt"], "summary": {"te_loss_min": 0.1}, "grid": {"points": 4},
             "loss": "mse", "config": {"ckpt": "/c.pt"}, "seconds": 2.0, "files": {"json": "/p/plane.json"}}
    stage = {"stage": "train mse seed 1", "status": "done", "inputs": {"a.pt": "ff"}, "ran": {"seconds": 1.0}}
    study = {"format_version": 1, "config": {"epochs": 3}, "provenance": {"host": "h"},
             "groups": {"mse": {"status": "run"}}, "stages": [{"name": "x"}], "layout": {"report": "report.html"}}
    for cls, old in ((PlaneRecord, plane), (StageRecord, stage), (StudyRecord, study)):
        record = cls.from_json(old)
        new = record.to_json()
        assert new["format_version"] == cls.FORMAT == 2
        assert {k: v for k, v in new.items() if k not in ("format_version", "sections")} == \
            {k: v for k, v in old.items() if k != "format_version"}, cls
        assert cls.from_json(json.loads(json.dumps(new))) == record
    assert PlaneRecord.from_json(plane).get("loss") == "mse" and StageRecord.from_json(stage).inputs == {"a.pt": "ff"}
    assert StudyRecord.from_json(study).sections is None  # format 1 had none
    assert StudyRecord.from_json({**study, "format_version": 2, "sections": {"evals": {}}}).sections == {"evals": {}}
    state = {"format_version": 1, "kind": "endpoint", "model": {"w": object()}, "optimizer": {}, "epoch": 3,
             "args": {"loss": "mse"}, "metrics": [{"epoch": 1}]}
    endpoint = EndpointRecord.from_json(state)
    assert endpoint.to_json() == {"format_version": 1, "kind": "endpoint", "epoch": 3, "args": {"loss": "mse"},
                                  "metrics": [{"epoch": 1}]}
    assert EndpointRecord.from_json({k: v for k, v in state.items() if k != "format_version"}).format_version == 1


@pytest.mark.parametrize("cls, d, reason", [
    (PlaneRecord, {"kind": "curve", "summary": None, "config": {}}, "summary is null"),
    (PlaneRecord, {"kind": "curve", "summary": {}, "config": {}, "format_version": 3}, "format_version 3"),
    (StageRecord, {"stage": "x", "status": 1, "inputs": {}}, "its status is 1"),
    (StageRecord, {"stage": "x", "status": "done"}, "inputs is null"),
    (StudyRecord, {"format_version": 3, "groups": {}}, "format_version 3"),
    (StudyRecord, {"format_version": 2, "groups": [1]}, "groups is [1], not an object"),
    (EndpointRecord, {"epoch": "3"}, "epoch is '3'"),
    (EndpointRecord, {"format_version": 9}, "format_version 9"),
])
def test_other_records_refuse_what_they_cannot_read(cls, d, reason):
    with pytest.raises(RecordError, match="some/file") as exc:
        cls.from_json(d, "some/file")
    assert reason in str(exc.value)


@pytest.mark.parametrize("cls, d", [
    (EvalRecord, {"format_version": 3}),
    (PlaneRecord, {"format_version": 99, "kind": "curve", "summary": {}, "config": {}}),
    (StageRecord, {"format_version": 3, "stage": "x", "status": "done", "inputs": {}}),
    (StudyRecord, {"format_version": 3, "groups": {}}),
    (EndpointRecord, {"format_version": 2}),
])
def test_a_newer_format_is_told_apart_from_a_damaged_file(cls, d):
    """issue 27, N4: a record of a later release is NewerFormat (a RecordError, so every reader still refuses it),
    which readers that redo damaged work let through; another unknown version stays a plain RecordError."""
    with pytest.raises(NewerFormat, match="some/file") as exc:
        cls.from_json(d, "some/file")
    assert f"has format_version {d['format_version']}, newer than this release of aecurves reads" in str(exc.value)
    assert "written by another release" in str(exc.value) and isinstance(exc.value, RecordError)
    for other in (0, "3", True, 2.5):
        try:
            cls.from_json({**d, "format_version": other}, "some/file")
        except NewerFormat:
            raise AssertionError(f"{other!r} is no newer format") from None
        except RecordError:
            pass


def test_check_format_reads_the_key_it_is_given():
    check_format({"format": 1}, 1, "fge.json", "format")
    check_format({"format_version": 7}, 1, "fge.json", "format")  # not its key
    with pytest.raises(NewerFormat, match="fge.json has format 2, newer"):
        check_format({"format": 2}, 1, "fge.json", "format")


def test_refuse_other_outputs_names_the_folder_and_the_files(tmp_path):
    for name in ("metrics.jsonl", "checkpoint.pt", "reconstructions.png"):
        (tmp_path / name).write_text("")
    refuse_other_outputs(tmp_path, "train", ("evaluation", "plane"))  # its own files
    with pytest.raises(UserError) as exc:
        refuse_other_outputs(tmp_path, "eval-curve", ("training run",))
    assert str(exc.value).startswith(f"The output folder {tmp_path} holds the files of a training run "
                                     "(checkpoint.pt, metrics.jsonl), not of eval-curve")
    (tmp_path / "plane.png").symlink_to(tmp_path / "nothing")  # a dangling link counts: lexists
    with pytest.raises(UserError, match=r"holds the files of a plane \(plane.png\)"):
        refuse_other_outputs(tmp_path, "train", ("evaluation", "plane"))


# ----------------------------------------------------------------------------------------------------------
# fge.json and ensembles.json (their key is "format", not format_version)


def fge_json() -> dict:
    """fge.json as fge writes it: a real run's keys in their order (its lists shortened)."""
    run = "/r/fge"
    return {
        "format": 1, "kind": "fge", "reference": "timgaripov/dnn-mode-connectivity fge.py (Garipov et al. 2018)",
        "endpoint": {"checkpoint": "/r/ep/checkpoint.pt", "sha256": "0acf", "epoch": 3, "lr": 0.003, "loss": "mse",
                     "kl_weight": 1.0},
        "config": {"ckpt": "/r/ep/checkpoint.pt", "epochs": 4, "cycle": 2, "lr_1": 0.003, "lr_2": 6e-06, "out": run},
        "optimizer": "Adam, its state loaded from the endpoint checkpoint",
        "schedule": {"cycle": 2, "lr_1": 0.003, "lr_2": 6e-06, "lr_2_over_lr_1": 0.002, "set": "before every step",
                     "epochs_counted_from": 0},
        "budget_epochs": 4, "steps_per_epoch": 6, "train_images": 180, "test_images": 40, "loss": "mse",
        "kl_weight": 1.0, "loss_description": "mean squared error",
        "data": {"dataset": "synthetic", "image_size": 32, "source": "synthetic"},
        "bn": {"recomputed": True, "images": 64, "subset_seed": 0, "batch_size": 256, "what": "every snapshot"},
        "metrics": ["mse", "psnr", "ssim"],
        "epochs": [{"epoch": e, "lr": 3.8e-4, "train_loss": 0.04, "snapshot": e // 2 + 1 if e % 2 == 0 else None}
                   for e in range(4)],
        "snapshot_epochs": [0, 2],
        "snapshots": [{"index": k, "epoch": 2 * k - 2, "file": f"{run}/snapshot_{k}.pt", "lr_last_step": 3.8e-4,
                       "bn_images": 64, "mse": 0.039, "psnr": 14.5, "ssim": 0.4} for k in (1, 2)],
        "start": {"what": "the starting endpoint", "bn_images": 64, "mse": 0.040, "psnr": 14.3, "ssim": 0.39},
        "ensemble": {"what": "the output average of the 2 snapshots", "members": 2, "mse": 0.037, "psnr": 14.7,
                     "ssim": 0.43},
        "ensemble_mse_gain": {"vs_start": 0.067, "vs_best_snapshot": 0.02},
        "notes": [], "device": "cpu", "precision": "fp32", "seconds": {"training": 1.0, "evaluation": 0.5},
        "files": {"json": f"{run}/fge.json", "metrics": f"{run}/metrics.jsonl", "checkpoint": f"{run}/checkpoint.pt",
                  "snapshots": [f"{run}/snapshot_1.pt", f"{run}/snapshot_2.pt"],
                  "reconstructions": f"{run}/reconstructions.png"}}


def ensembles_json() -> dict:
    """ensembles.json as the ensembles stage writes it: a real file's keys in their order."""
    nets = ["/r/fge/snapshot_1.pt", "/r/fge/snapshot_2.pt", "/r/ep/checkpoint.pt"]
    return {
        "format": 1, "kind": "ensembles",
        "config": {"networks": nets, "averages": {"fge": [0, 1], "all": [0, 1, 2]}, "bn_images": 64,
                   "out": "/r/ens", "cache_dir": None, "model": None, "device": "cpu", "no_progress": True},
        "networks": [{"checkpoint": n, "sha256": "e1a5"} for n in nets],
        "averages": {"fge": {"members": [0, 1], "files": nets[:2], "mse": 0.037, "psnr": 14.7, "ssim": 0.43},
                     "all": {"members": [0, 1, 2], "files": nets, "mse": 0.036, "psnr": 14.8, "ssim": 0.44}},
        "metrics": ["mse", "psnr", "ssim"], "vae": False, "test_images": 40, "train_images": 180,
        "bn": {"recomputed": True, "images": 64, "subset_seed": 0, "batch_size": 256, "what": "every network"},
        "data": {"source": "synthetic"}, "notes": [], "device": "cpu", "seconds": 2.5,
        "files": {"json": "/r/ens/ensembles.json"}}


@pytest.mark.parametrize("cls, make", [(FgeRecord, fge_json), (EnsemblesRecord, ensembles_json)])
def test_fge_and_ensembles_records_write_back_the_file_they_read(cls, make):
    """to_json(from_json(x)) is x, its keys in their order: the same bytes once written (write_json keeps the order)."""
    record = cls.from_json(make(), "r/x.json")
    assert record.to_json() == make() and list(record.to_json()) == list(make())
    assert json.dumps(record.to_json(), indent=2) == json.dumps(make(), indent=2)
    assert cls.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.config == make()["config"] and cls.FORMAT == 1


def test_what_the_study_reads_of_fge_json_and_ensembles_json():
    fge = FgeRecord.from_json(fge_json())
    assert fge.budget_epochs == 4 and fge.config["ckpt"] == "/r/ep/checkpoint.pt"
    assert fge.listed_files() == ["/r/fge/fge.json", "/r/fge/metrics.jsonl", "/r/fge/checkpoint.pt",
                                  "/r/fge/reconstructions.png", "/r/fge/snapshot_1.pt", "/r/fge/snapshot_2.pt"]
    assert fge.get("snapshot_epochs") == [0, 2] and fge.get("absent", 7) == 7
    ensembles = EnsemblesRecord.from_json(ensembles_json())
    assert ensembles.networks() == ["/r/fge/snapshot_1.pt", "/r/fge/snapshot_2.pt", "/r/ep/checkpoint.pt"]
    assert ensembles.averages["all"]["members"] == [0, 1, 2] and ensembles.averages["fge"]["mse"] == 0.037
    assert ensembles.config["averages"] == {"fge": [0, 1], "all": [0, 1, 2]} and ensembles.vae is False
    assert EnsemblesRecord.from_json({**ensembles_json(), "vae": True}).vae is True
    config = {k: v for k, v in ensembles_json()["config"].items() if k != "networks"}
    assert EnsemblesRecord.from_json({**ensembles_json(), "config": config}).networks() == []


def test_an_fge_json_and_ensembles_json_of_the_old_layout_read():
    """Without "format" (format 1); fge.json from before issue 28 without "kl_weight", ensembles.json without "vae"
    (autoencoders'): every key is kept as written and the record writes format 1."""
    old = fge_json()
    del old["format"], old["kl_weight"], old["endpoint"]["kl_weight"]
    record = FgeRecord.from_json(old)
    assert record.budget_epochs == 4 and len(record.listed_files()) == 6 and record.get("kl_weight") is None
    new = record.to_json()
    assert new == {"format": 1, **old} and list(new) == ["format", *old]
    old = ensembles_json()
    del old["format"], old["vae"]
    record = EnsemblesRecord.from_json(old)
    assert record.vae is False and len(record.networks()) == 3 and record.to_json() == {"format": 1, **old}


@pytest.mark.parametrize("cls", [FgeRecord, EnsemblesRecord])
def test_an_fge_or_ensembles_json_of_a_newer_format_is_newer_not_damaged(cls):
    d = {**(fge_json() if cls is FgeRecord else ensembles_json()), "format": 2}
    with pytest.raises(NewerFormat, match="runs/x.json has format 2, newer than this release"):
        cls.from_json(d, "runs/x.json")
    for other in (0, "1", True, 1.0, None):
        with pytest.raises(RecordError, match="runs/x.json has format") as exc:
            cls.from_json({**d, "format": other}, "runs/x.json")
        assert type(exc.value) is RecordError, other


def _changed(make, **change):
    d = make()
    for key, value in change.items():
        if "." in key:
            outer, inner = key.split(".")
            d[outer][inner] = value
        else:
            d[key] = value
    return d


@pytest.mark.parametrize("cls, d, reason", [
    (FgeRecord, None, "the file is null, not an object"),
    (FgeRecord, [1], "the file is [1], not an object"),
    (FgeRecord, _changed(fge_json, kind="ensembles"), "its kind is 'ensembles', not 'fge'"),
    (FgeRecord, _changed(fge_json, config=None), "config is null, not an object"),
    (FgeRecord, _changed(fge_json, config=["x"]), 'config is ["x"], not an object'),
    (FgeRecord, _changed(fge_json, budget_epochs=None), "its budget_epochs is None"),
    (FgeRecord, _changed(fge_json, budget_epochs="4"), "its budget_epochs is '4'"),
    (FgeRecord, _changed(fge_json, budget_epochs=True), "its budget_epochs is True"),
    (FgeRecord, _changed(fge_json, budget_epochs=-1), "its budget_epochs is -1"),
    (FgeRecord, _changed(fge_json, files=["a"]), 'files is ["a"], not an object'),
    (FgeRecord, _changed(fge_json, **{"files.snapshots": "a.pt"}), 'files.snapshots is "a.pt", not a list'),
    (FgeRecord, _changed(fge_json, **{"files.snapshots": [1]}), "files.snapshots is [1], not a list of file"),
    (FgeRecord, _changed(fge_json, **{"files.json": 3}), "files.json is 3, not a file name"),
    (FgeRecord, _changed(fge_json, snapshots={"1": {}}), "its snapshots are not a list of objects"),
    (FgeRecord, _changed(fge_json, snapshots=[1]), "its snapshots are not a list of objects"),
    (EnsemblesRecord, "x", 'the file is "x", not an object'),
    (EnsemblesRecord, _changed(ensembles_json, kind="fge"), "its kind is 'fge', not 'ensembles'"),
    (EnsemblesRecord, _changed(ensembles_json, config=3), "config is 3, not an object"),
    (EnsemblesRecord, _changed(ensembles_json, averages=None), "averages is null, not an object"),
    (EnsemblesRecord, _changed(ensembles_json, averages=[]), "averages is [], not an object"),
    (EnsemblesRecord, _changed(ensembles_json, averages={"fge": 3}), "averages.fge is 3, not an object"),
    (EnsemblesRecord, _changed(ensembles_json, **{"config.networks": "a.pt"}), "config.networks is \"a.pt\""),
])
def test_a_damaged_fge_or_ensembles_json_is_refused_naming_the_file_and_the_fault(cls, d, reason):
    with pytest.raises(RecordError, match="runs/pair/x.json") as exc:
        cls.from_json(d, "runs/pair/x.json")
    assert reason in str(exc.value) and type(exc.value) is RecordError
