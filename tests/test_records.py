"""records: the typed records at the file boundary read their own layout and the last release's, and refuse others."""

import json

import pytest

from aecurves.errors import UserError
from aecurves.records import (
    EndpointRecord,
    EvalRecord,
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
