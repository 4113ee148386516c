import json

import pytest
import torch

from aecurves.checkpoint import load_checkpoint, load_curve, save_checkpoint
from aecurves.records import EvalRecord

from conftest import run_cli

CURVE = ["--curve", "bezier", "--num_bends", 3, "--fix_start", "--fix_end", "--batch-size", 32, "--no-progress"]


@pytest.fixture(scope="module")
def trained_curve(tiny_endpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("curve")
    a, b = tiny_endpoints
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 4, "--dir", out) == 0
    return out / "checkpoint.pt"


def test_curve_checkpoint_keeps_the_fixed_endpoints_and_its_config(trained_curve, tiny_endpoints):
    curve, state = load_curve(trained_curve)
    assert state["kind"] == "curve" and state["epoch"] == 4 and state["args"]["curve"] == "Bezier"
    a, b = (load_checkpoint(p, "endpoint")["model"] for p in tiny_endpoints)
    for t, ref in ((0.0, a), (1.0, b)):
        got = curve.state_dict_at(t)
        for name, _ in curve.base.named_parameters():
            assert torch.equal(got[name], ref[name]), (t, name)
    # the middle bend moved away from the segment's midpoint
    mid = (curve.bends[0] + curve.bends[2]) / 2
    assert not torch.allclose(curve.bends[1], mid)
    rows = [json.loads(r) for r in (trained_curve.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(r["train_l2_term"] == 0.0 for r in rows)
    assert state["args"]["dataset"] == "synthetic" and state["args"]["use_test"] is False  # the endpoints' data


def test_weight_decay_term_is_reported_apart_from_the_reconstruction_loss(tiny_endpoints, tmp_path):
    a, b = tiny_endpoints
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 1, "--wd", 1e-3,
                   "--dir", tmp_path) == 0
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    curve, _ = load_curve(tmp_path / "checkpoint.pt")
    # t ~ U(0, 1) per batch: the reported term estimates the mean of wd/2 · ‖θ(t)‖² over t
    mean_l2 = sum(curve.l2(t).item() for t in torch.linspace(0, 1, 101).tolist()) / 101
    assert row["train_l2_term"] == pytest.approx(1e-3 / 2 * mean_l2, rel=0.1)
    assert row["train_loss"] < 0.2


def test_export_point_writes_an_endpoint_that_train_curve_accepts(trained_curve, tiny_endpoints, tmp_path, capsys):
    point = tmp_path / "mid.pt"
    assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--out", point, "--no-progress") == 0
    state = load_checkpoint(point, "endpoint")
    curve, _ = load_curve(trained_curve)
    flat = torch.cat([state["model"][n].reshape(-1) for n in curve.param_names])
    assert torch.equal(flat, curve.flat_at(0.5).detach())
    assert state["exported_from"]["bn_images"] > 0
    # BN statistics were recomputed at t = 0.5, not copied from an endpoint
    a = load_checkpoint(tiny_endpoints[0], "endpoint")["model"]
    assert not torch.equal(state["model"]["encoder.0.1.running_mean"], a["encoder.0.1.running_mean"])
    assert run_cli("train-curve", "--init_start", tiny_endpoints[0], "--init_end", point, *CURVE, "--epochs", 1,
                   "--dir", tmp_path / "c2") == 0


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict"])
def test_export_point_as_plain_weights_loads_into_a_bare_model(fmt, trained_curve, tmp_path):
    from aecurves.models import ConvAutoencoder

    ckpt, plain = tmp_path / "mid.pt", tmp_path / f"mid.{fmt}"
    for out, extra in ((ckpt, []), (plain, ["--format", fmt])):
        assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--out", out, "--no-progress", *extra) == 0
    if fmt == "safetensors":
        from safetensors.torch import load_file

        weights = load_file(plain)
    else:
        weights = torch.load(plain, weights_only=True)
    arch = json.loads((tmp_path / f"mid.{fmt}.json").read_text())["architecture"]
    bare = ConvAutoencoder(**{k: arch[k] for k in ("channels", "image_size", "latent_dim", "width")})
    bare.load_state_dict(weights)  # strict: every key, every shape
    reference = ConvAutoencoder(**{k: arch[k] for k in ("channels", "image_size", "latent_dim", "width")})
    reference.load_state_dict(load_checkpoint(ckpt, "endpoint")["model"])
    x = torch.rand(4, arch["channels"], arch["image_size"], arch["image_size"])
    bare.eval(), reference.eval()
    assert torch.equal(bare(x), reference(x))
    # written by aecurves, so with the permissions of every other output (the umask's), not the library's 0600
    assert plain.stat().st_mode & 0o777 == ckpt.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("case", ["mismatch", "curve_as_endpoint", "missing", "one_bend", "nothing_to_train",
                                  "t_outside", "no_endpoints"])
def test_bad_input_is_one_clear_error_and_overwrites_nothing(case, trained_curve, tiny_endpoints, tmp_path, capsys):
    a, b = tiny_endpoints
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    curve_args = ["--dir", out, *CURVE, "--epochs", 1]
    if case == "mismatch":
        other = load_checkpoint(b, "endpoint")
        other["args"] = {**other["args"], "latent_dim": 99}
        save_checkpoint(tmp_path / "other.pt", other)
        argv = ["train-curve", "--init_start", a, "--init_end", tmp_path / "other.pt", *curve_args]
        expect = "latent_dim"
    elif case == "curve_as_endpoint":
        argv, expect = ["train-curve", "--init_start", a, "--init_end", trained_curve, *curve_args], "export-point"
    elif case == "missing":
        argv = ["train-curve", "--init_start", a, "--init_end", tmp_path / "nope.pt", *curve_args]
        expect = "does not exist"
    elif case == "one_bend":
        argv, expect = ["train-curve", "--init_start", a, "--init_end", b, *curve_args, "--num_bends", 1], "at least 2"
    elif case == "nothing_to_train":
        argv = ["train-curve", "--init_start", a, "--init_end", b, *curve_args, "--num_bends", 2]
        expect = "Nothing to train"
    elif case == "t_outside":
        argv, expect = ["export-point", "--ckpt", trained_curve, "--t", 1.5, "--out", out / "keep.txt"], "[0, 1]"
    else:
        argv, expect = ["train-curve", *curve_args], "--init_start"
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_trained_curve_beats_the_segment(trained_curve, tmp_path):
    """The point of the project, on a small CPU problem: the curve's worst test loss is below the segment's."""
    out = tmp_path / "eval"
    assert run_cli("eval-curve", "--ckpt", trained_curve, "--num-points", 11, "--num-images", 0,
                   "--out", out, "--no-progress") == 0
    summary = EvalRecord.from_json(json.loads((out / "eval.json").read_text())).flat_summary()
    assert summary["segment_te_barrier"] > 0
    assert summary["te_loss_max"] < summary["segment_te_loss_max"]
    assert summary["te_barrier"] < summary["segment_te_barrier"]


# ----------------------------------------------------------------------------------------------------------
# the lr schedule, t sampling and the midpoint monitor


def test_default_schedule_is_the_papers_recorded_per_epoch(trained_curve):
    rows = [json.loads(r) for r in (trained_curve.parent / "metrics.jsonl").read_text().splitlines()]
    # 4 epochs, base lr 1e-3: alpha = 1/4, 2/4 -> 1; 3/4 -> 1 - 0.25/0.4*0.99 = 0.38125; 4/4 -> 0.01
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.38125e-3, 1e-5])
    assert load_checkpoint(trained_curve, "curve")["args"]["lr_schedule"] == "paper"


def test_monitor_predicts_eval_curve_at_the_midpoint(trained_curve, tmp_path):
    last = json.loads((trained_curve.parent / "metrics.jsonl").read_text().splitlines()[-1])
    assert run_cli("eval-curve", "--ckpt", trained_curve, "--num-points", 3, "--num-images", 0, "--no-segment-too",
                   "--out", tmp_path / "eval", "--no-progress", "--vgg-weights", "random") == 0
    record = json.loads((tmp_path / "eval/eval.json").read_text())
    assert record["series"]["ts"][1] == 0.5
    assert last["mid_test_loss"] == pytest.approx(record["series"]["te_loss"][1], rel=1e-5)
    assert last["mid_test_psnr"] == pytest.approx(record["series"]["te_psnr"][1], rel=1e-5)


def test_resume_after_an_interruption_follows_the_uninterrupted_schedule(tiny_endpoints, tmp_path, monkeypatch):
    """Killed after epoch 1 of 3 and resumed: the same bends as a run that was never stopped (paper schedule,
    stratified t), and the same lr in every epoch."""
    from aecurves.commands import train_curve

    a, b = tiny_endpoints
    common = ["--init_start", a, "--init_end", b, *CURVE, "--epochs", 3, "--t-sampling", "stratified"]
    assert run_cli("train-curve", *common, "--dir", tmp_path / "straight") == 0
    save = train_curve.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_curve, "save_checkpoint", save_then_die)
    assert run_cli("train-curve", *common, "--dir", tmp_path / "stopped") == 130
    monkeypatch.setattr(train_curve, "save_checkpoint", save)
    assert load_checkpoint(tmp_path / "stopped/checkpoint.pt", "curve")["epoch"] == 1
    assert run_cli("train-curve", *common, "--resume", "--dir", tmp_path / "stopped") == 0
    x, _ = load_curve(tmp_path / "straight/checkpoint.pt")
    y, _ = load_curve(tmp_path / "stopped/checkpoint.pt")
    assert all(torch.equal(p, q) for p, q in zip(x.bends, y.bends))
    lrs = [[json.loads(r)["lr"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
           for d in ("straight", "stopped")]
    assert lrs[0] == lrs[1] and lrs[0][-1] == pytest.approx(1e-5)


def test_resume_keeps_the_checkpoints_schedule_and_refuses_a_contradicting_one(tiny_endpoints, tmp_path, capsys):
    a, b = tiny_endpoints
    common = ["--init_start", a, "--init_end", b, *CURVE, "--dir", tmp_path]
    assert run_cli("train-curve", *common, "--epochs", 1, "--lr-schedule", "cosine") == 0
    assert run_cli("train-curve", *common, "--epochs", 2, "--resume", "--lr-schedule", "paper") == 2
    assert "lr_schedule='cosine' vs lr_schedule='paper'" in capsys.readouterr().err
    # what defines the curve is the checkpoint's too: a contradicting flag is refused, not silently overridden
    assert run_cli("train-curve", *common, "--epochs", 2, "--resume", "--num-bends", 4, "--curve", "polychain") == 2
    assert "num_bends=3 vs num_bends=4" in capsys.readouterr().err
    assert run_cli("train-curve", *common, "--epochs", 2, "--resume", "--curve", "BEZIER") == 0  # the same curve
    assert load_checkpoint(tmp_path / "checkpoint.pt", "curve")["epoch"] == 2
    assert run_cli("train-curve", *common, "--epochs", 2, "--resume") == 0
    # a checkpoint written before schedules existed was trained at a constant lr, and resumes so
    state = load_checkpoint(tmp_path / "checkpoint.pt", "curve")
    del state["args"]["lr_schedule"], state["args"]["t_sampling"]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert run_cli("train-curve", *common, "--epochs", 3, "--resume", "--lr", 2e-3) == 0
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["lr"] == 2e-3  # constant, and the new --lr took effect on resume
    assert load_checkpoint(tmp_path / "checkpoint.pt", "curve")["args"]["lr_schedule"] == "constant"


def test_stratified_t_takes_one_value_from_each_slice():
    from aecurves.commands.train_curve import sample_ts

    ts = sample_ts(50, torch.Generator().manual_seed(0), "stratified")
    assert sorted(int(t * 50) for t in ts) == list(range(50))
    assert ts != sorted(ts)  # in random order
    uniform = sample_ts(50, torch.Generator().manual_seed(0), "uniform")
    assert all(0 <= t < 1 for t in uniform) and len({int(t * 50) for t in uniform}) < 50


def test_every_data_setting_and_the_loss_come_from_the_endpoints_unless_given():
    """DataConfig's settings (use_test too, as eval-curve takes it) and the loss: the start endpoint's, unless given."""
    from pathlib import Path

    from aecurves.commands.train_curve import fill_from_endpoint
    from aecurves.config import TrainCurveConfig, make

    args = {"dataset": "celeba", "data_dir": "/d", "image_size": 64, "limit": 100, "val_fraction": 0.2,
            "use_test": True, "loss": "vgg"}
    cfg = make(TrainCurveConfig, {})
    fill_from_endpoint(cfg, args, args)
    assert {k: getattr(cfg, k) for k in args} == {**args, "data_dir": str(Path("/d").resolve())}
    cfg = make(TrainCurveConfig, {"limit": 10, "loss": "mse"})
    fill_from_endpoint(cfg, args, args)
    assert (cfg.limit, cfg.loss, cfg.use_test) == (10, "mse", True)
    before = {k: v for k, v in args.items() if k != "use_test"}  # an endpoint from before --use-test
    cfg = make(TrainCurveConfig, {})
    fill_from_endpoint(cfg, before, before)
    assert cfg.use_test is False


def test_endpoints_with_different_losses_need_an_explicit_loss(tiny_endpoints, tmp_path, capsys):
    b = load_checkpoint(tiny_endpoints[1], "endpoint")
    b["args"]["loss"] = "vgg"
    save_checkpoint(tmp_path / "b_vgg.pt", b)
    common = ["--init_start", tiny_endpoints[0], "--init_end", tmp_path / "b_vgg.pt", *CURVE, "--epochs", 1]
    assert run_cli("train-curve", *common, "--dir", tmp_path / "c") == 2
    assert "different losses (mse and vgg)" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert run_cli("train-curve", *common, "--loss", "mse", "--dir", tmp_path / "c") == 0
    assert load_checkpoint(tmp_path / "c/checkpoint.pt", "curve")["args"]["loss"] == "mse"


def test_export_point_never_replaces_a_file(trained_curve, tiny_endpoints, tmp_path, capsys):
    kept = {p: p.read_bytes() for p in (trained_curve, tiny_endpoints[0])}
    for out in (trained_curve, tiny_endpoints[0]):
        assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--out", out, "--no-progress") == 2
        assert "one of this command's inputs" in capsys.readouterr().err
    (tmp_path / "mine.pt").write_text("mine")
    assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--out", tmp_path / "mine.pt") == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "mine.pt").read_text() == "mine"
    # only the architecture file beside plain weights is there: the message names that one
    (tmp_path / "w.safetensors.json").write_text("{}")
    assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--format", "safetensors",
                   "--out", tmp_path / "w.safetensors") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'w.safetensors.json'} already exists" in err and not (tmp_path / "w.safetensors").exists()
    # a name ending in / is a folder, never a file of that name
    assert run_cli("export-point", "--ckpt", trained_curve, "--t", 0.5, "--out", f"{tmp_path}/newdir/") == 2
    assert "is a folder" in capsys.readouterr().err and not (tmp_path / "newdir").exists()
    assert {p: p.read_bytes() for p in kept} == kept


def test_export_point_and_align_never_write_into_the_data_folder(tmp_path, capsys):
    """The next run would read what they wrote there as a training image (even a .png)."""
    from test_checkpoint import _curve_state, _endpoint_state

    from aecurves.checkpoint import save_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    ends = []
    for seed in (1, 2):
        ends.append(tmp_path / f"e{seed}.pt")
        save_checkpoint(ends[-1], _endpoint_state(seed=seed, dataset="folder", data_dir=str(data)))
    curve = _curve_state("aecurves.models:ConvAutoencoder", {}, *ends)
    curve["args"].update(dataset="folder", data_dir=str(data))
    save_checkpoint(tmp_path / "curve.pt", curve)
    assert run_cli("export-point", "--ckpt", tmp_path / "curve.pt", "--t", 0.5, "--bn-images", 0,
                   "--out", data / "x.png") == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert run_cli("align", "--init-start", ends[0], "--init-end", ends[1], "--out", data / "sub/aligned.pt") == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert list(data.iterdir()) == []
    assert run_cli("export-point", "--ckpt", tmp_path / "curve.pt", "--t", 0.5, "--bn-images", 0,
                   "--out", tmp_path / "x.pt", "--no-progress") == 0  # outside it: written


def test_a_diverged_curve_stops_before_it_is_saved(tiny_endpoints, tmp_path, monkeypatch, capsys):
    from aecurves.commands import train_curve

    real = train_curve.train_curve_one_epoch

    def diverging(net, curve, *args, **kwargs):
        out = real(net, curve, *args, **kwargs)
        with torch.no_grad():
            curve.bends[1][0] = float("nan")
        return out

    monkeypatch.setattr(train_curve, "train_curve_one_epoch", diverging)
    a, b = tiny_endpoints
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 1, "--dir", tmp_path) == 2
    assert "non-finite values in bend 1" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def _rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_channels_last_curve_training_matches_contiguous_to_rounding(tiny_endpoints, tmp_path, capsys):
    a, b = tiny_endpoints
    args = ["train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 2, "--precision", "fp32"]
    assert run_cli(*args, "--dir", tmp_path / "cl") == 0
    assert "fp32, channels_last, Adam fused" in capsys.readouterr().out
    assert run_cli(*args, "--memory-format", "contiguous", "--dir", tmp_path / "nchw") == 0
    cl, nchw = _rows(tmp_path / "cl"), _rows(tmp_path / "nchw")
    assert [r["memory_format"] for r in cl + nchw] == ["channels_last"] * 2 + ["contiguous"] * 2
    for x, y in zip(cl, nchw):
        for key in ("train_loss", "mid_test_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-3), key
    curves = [load_curve(tmp_path / d / "checkpoint.pt")[0] for d in ("cl", "nchw")]
    start = (curves[1].bends[0] + curves[1].bends[2]) / 2  # where the middle bend started (init_linear)
    moved = (curves[1].bends[1] - start).norm()
    # Adam's normalised steps let a weight whose gradient is near 0 go either way: the bends agree as a whole
    assert (curves[0].bends[1] - curves[1].bends[1]).norm() < 0.01 * moved


def test_curve_compile_that_fails_falls_back_with_the_same_numbers(tiny_endpoints, tmp_path, capsys, monkeypatch):
    a, b = tiny_endpoints
    args = ["train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 1, "--precision", "fp32"]
    assert run_cli(*args, "--dir", tmp_path / "plain") == 0

    def no_compiler(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert run_cli(*args, "--compile", "--dir", tmp_path / "compiled") == 0
    assert "could not compile the base network (RuntimeError: no C++ compiler)" in capsys.readouterr().out
    plain, fallback = _rows(tmp_path / "plain")[0], _rows(tmp_path / "compiled")[0]
    assert fallback["compiled"] is False
    assert (fallback["train_loss"], fallback["mid_test_loss"]) == (plain["train_loss"], plain["mid_test_loss"])


@pytest.mark.slow
def test_compiled_curve_training_runs_compiled_and_matches_eager(tiny_endpoints, tmp_path, capsys):
    """torch.compile for real (inductor, this machine's C++ compiler): one graph of the base network serves every t
    (θ(t) stays uncompiled), and the numbers are eager training's to float rounding."""
    a, b = tiny_endpoints
    args = ["train-curve", "--init_start", a, "--init_end", b, *CURVE, "--epochs", 2, "--precision", "fp32"]
    assert run_cli(*args, "--dir", tmp_path / "eager") == 0
    assert run_cli(*args, "--compile", "--dir", tmp_path / "compiled") == 0
    printed = capsys.readouterr().out
    assert "could not compile" not in printed and "Adam fused, compiled" in printed
    eager, compiled = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    assert all(r["compiled"] for r in compiled)
    for x, y in zip(eager, compiled):
        for key in ("train_loss", "mid_test_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-3), key
