"""Tests for aecurves.plane_geometry and the plane command: the basis, the coordinates, the values at the bends against
independent evaluations and eval-curve, a plane that must be flat, the outputs, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aecurves import evaluation, metrics, plots
from aecurves.checkpoint import load_curve, save_checkpoint
from aecurves.commands import eval_curve, plane
from aecurves.config import SUBSET_SEED, EvalCurveConfig, PlaneConfig, make
from aecurves.curves import Curve, NetworkAt, recompute_bn
from aecurves.data import BatchLoader, load_data
from aecurves.errors import UserError
from aecurves.files import LOCK_NAME
from aecurves.losses import MSELoss
from aecurves.metrics import evaluate, fixed_subset
from aecurves.models import ConvAutoencoder, build_model
from aecurves.plane_geometry import grid_axes, plane_through

from conftest import run_cli

ARCH = {"channels": 3, "image_size": 32, "latent_dim": 16, "width": 8}
DATA_ARGS = {"dataset": "synthetic", "data_dir": None, "image_size": 32, "limit": 256, "val_fraction": 0.1,
             "use_test": False}
# One batch of BN images: the paper's size-weighted average is then plain batch statistics, easy to redo by hand.
FAST = {"bn_images": 64, "train_images": 64, "batch_size": 64, "device": "cpu", "vgg_weights": "random",
        "no_progress": True}
UPSAMPLE = {"model": "ae_models:upsample_autoencoder", "model_kwargs": {"width": 4}}  # conv biases before BN


def run_plane(settings: dict) -> dict:
    return plane.run(make(PlaneConfig, settings))


def _endpoint(path, seed, data, loss="mse", **arch):
    """A freshly initialised network with BN statistics of the training images (no training: any weights do)."""
    torch.manual_seed(seed)
    arch = {**ARCH, **arch}
    model = build_model(arch)
    with torch.no_grad():
        model.train()
        model(data.train[:64].float().div(255))
    save_checkpoint(path, {"kind": "endpoint", "model": model.state_dict(), "optimizer": {}, "epoch": 1,
                           "args": {**DATA_ARGS, "loss": loss, "seed": seed, **arch}, "metrics": []})
    return model.state_dict()


def _curve(path, a_state, b_state, a_path, b_path, offset=0.05, num_bends=3):
    """A Bezier curve whose middle bend sits right above the segment's midpoint (so, on a 3x3 grid without
    margins, every bend is a grid node), `offset` times a random unit-variance step away from it."""
    curve = Curve(build_model(ARCH), "bezier", num_bends)
    curve.set_endpoints(a_state, b_state)
    curve.init_linear()
    if offset:
        with torch.no_grad():
            chord = (curve.bends[-1] - curve.bends[0]).double()
            step = torch.randn(chord.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            step -= torch.dot(step, chord) / torch.dot(chord, chord) * chord
            curve.bends[1].add_((offset * step).float())
    args = {**DATA_ARGS, "loss": "mse", "init_start": str(a_path), "init_end": str(b_path), "curve": "Bezier",
            "num_bends": num_bends, "fix_start": True, "fix_end": True, "seed": 1}
    save_checkpoint(path, {"kind": "curve", "curve": curve.curve_state(), "model_config": dict(ARCH),
                           "optimizer": {}, "epoch": 1, "args": args, "metrics": []})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plane")
    data = load_data("synthetic", image_size=32, limit=256, progress=False)
    paths = {name: root / name / "checkpoint.pt" for name in ("a", "b", "curve", "line", "odd")}
    a, b = _endpoint(paths["a"], 1, data), _endpoint(paths["b"], 2, data)
    _curve(paths["curve"], a, b, paths["a"], paths["b"])
    _curve(paths["line"], a, b, paths["a"], paths["b"], offset=0)  # never moved off the segment
    _endpoint(paths["odd"], 3, data, width=4)  # another architecture
    return {"root": root, "data": data, **paths}


@pytest.fixture(scope="module")
def curve_plane(setup):
    summary = run_plane({**FAST, "ckpt": str(setup["curve"]), "grid": 3, "margin": 0.0})
    out = setup["curve"].parent / "plane"
    return out, summary, dict(np.load(out / "plane.npz")), json.loads((out / "plane.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# the plane's geometry, on hand-made vectors


def test_basis_is_orthonormal_and_follows_the_reference_order():
    g = torch.Generator().manual_seed(0)
    w0, w1, w2 = (torch.randn(1000, generator=g) for _ in range(3))
    p = plane_through(w0, w1, w2)
    assert torch.dot(p.u, p.u).item() == pytest.approx(1, abs=1e-6)
    assert torch.dot(p.v, p.v).item() == pytest.approx(1, abs=1e-6)
    assert abs(torch.dot(p.u, p.v).item()) < 1e-6
    chord = w2.double() - w0.double()  # the differences are taken in float64
    assert torch.allclose(p.u, chord / chord.norm(), atol=1e-12)  # the first axis runs from θ₀ to θ₂
    assert torch.dot(p.v, w1.double() - w0.double()).item() > 0  # θ₁ lies above it
    assert p.dx == pytest.approx(chord.norm().item(), rel=1e-12)


def test_bends_project_to_their_coordinates_by_hand():
    g = torch.Generator().manual_seed(1)
    w0, w1, w2 = (torch.randn(500, generator=g) for _ in range(3))
    p = plane_through(w0, w1, w2)
    a, c = (w1.double() - w0.double()).numpy(), (w2.double() - w0.double()).numpy()
    x1 = a @ c / np.linalg.norm(c)
    y1 = np.sqrt(a @ a - x1**2)
    assert np.allclose(p.coordinates(w0), [0, 0], atol=1e-12)
    assert np.allclose(p.coordinates(w1), [x1, y1], rtol=1e-9)
    assert np.allclose(p.coordinates(w2), [np.linalg.norm(c), 0], rtol=1e-9, atol=1e-9)
    assert p.dy == pytest.approx(y1, rel=1e-9)
    assert torch.allclose(p.point(*p.coordinates(w1)), w1.double(), atol=1e-9)  # every bend lies in the plane
    assert p.distance(w1) < 1e-9
    off = w0.double() + 3 * torch.randn(500, generator=g, dtype=torch.float64)
    assert p.distance(off) > 1  # a random direction in 500 dimensions mostly leaves the plane


def test_grid_axes_with_a_margin_per_side():
    g = torch.Generator().manual_seed(2)
    p = plane_through(*(torch.randn(50, generator=g) for _ in range(3)))
    alphas, betas, grid = grid_axes(p, 5, 0.1, 0.3, 0.0, 0.5)
    assert np.allclose(alphas, np.linspace(-0.1, 1.3, 5)) and np.allclose(betas, np.linspace(0.0, 1.5, 5))
    assert grid.shape == (5, 5, 2)
    for i in range(5):
        for j in range(5):
            assert np.allclose(grid[i, j], [alphas[i] * p.dx, betas[j] * p.dy])


def test_three_points_that_span_no_plane_are_refused():
    w = torch.randn(100, generator=torch.Generator().manual_seed(3))
    with pytest.raises(UserError, match="are the same network"):
        plane_through(w, w.clone(), w.clone())
    v = torch.randn(100, generator=torch.Generator().manual_seed(4))
    with pytest.raises(UserError, match="span a line, not a plane"):
        plane_through(w, 0.5 * w + 0.5 * v, v)  # the midpoint, in float32


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_network_with_non_finite_weights_is_named_as_damaged(bad, tiny_endpoints, tmp_path, capsys):
    """Once 'A and C are the same network (‖C−A‖ = inf)': a non-finite distance is a damaged input, named as such;
    from the command line such a file is refused when read, naming the file."""
    w = torch.randn(100, generator=torch.Generator().manual_seed(3))
    c = w.clone()
    c[7] = bad
    with pytest.raises(UserError, match=r"^C holds non-finite weights \(NaN or inf\): a damaged network") as err:
        plane_through(w, torch.randn(100), c, names=("A", "B", "C"))
    assert "same network" not in str(err.value)
    state = torch.load(tiny_endpoints[1], weights_only=True)
    state["model"]["decoder_input.weight"] = state["model"]["decoder_input.weight"].double() * 1e300
    save_checkpoint(tmp_path / "c.pt", state)
    assert run_cli("plane", "--points", *tiny_endpoints, tmp_path / "c.pt", "--no-progress", "--out",
                   tmp_path / "pl") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c.pt'} holds non-finite values" in err and "same network" not in err
    assert not (tmp_path / "pl").exists()


# ----------------------------------------------------------------------------------------------------------
# a curve's plane


def test_the_bends_are_grid_nodes_and_match_independent_evaluations(setup, curve_plane):
    out, summary, npz, _ = curve_plane
    curve, _ = load_curve(setup["curve"])
    w = [b.detach().double().numpy() for b in curve.bends]
    dx = np.linalg.norm(w[2] - w[0])
    x1 = (w[1] - w[0]) @ (w[2] - w[0]) / dx
    y1 = np.sqrt((w[1] - w[0]) @ (w[1] - w[0]) - x1**2)
    assert np.allclose(npz["bend_coordinates"], [[0, 0], [x1, y1], [dx, 0]], rtol=1e-6, atol=1e-6 * dx)
    assert x1 == pytest.approx(dx / 2, rel=1e-5)  # the fixture put θ₁ above the middle: node (1, 2)
    nodes = {0: (0, 0), 1: (1, 2), 2: (2, 0)}
    for key in ("tr_loss", "te_loss", "tr_mse", "te_mse", "te_psnr"):
        assert npz[f"bend_{key}"][0] == npz[key][0, 0], key  # θ₀ is the node itself, bit for bit
        for k, node in nodes.items():
            assert npz[key][node] == pytest.approx(npz[f"bend_{key}"][k], rel=1e-5), (key, k)
    # θ₁ by hand: its weights in a fresh network, BN statistics of the one batch of fixed BN images
    data = setup["data"]
    model = build_model(ARCH)
    model.load_state_dict({**curve.base.state_dict(), **curve.unflatten(curve.bends[1].detach())})
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = 1.0
    with torch.no_grad():
        model.train()
        model(fixed_subset(data.train, 64).float().div(255))
    own = evaluate(model, BatchLoader(data.test, 64, "cpu"), MSELoss())
    assert npz["bend_te_loss"][1] == pytest.approx(own["loss"], rel=1e-5)
    assert npz["bend_te_psnr"][1] == pytest.approx(own["psnr"], rel=1e-5)
    # the grid is not flat: moving off θ₀ changes the loss
    assert npz["te_loss"].max() > 1.01 * npz["te_loss"].min()


def test_the_endpoints_agree_with_eval_curve(setup, curve_plane, tmp_path):
    _, _, npz, _ = curve_plane
    eval_curve.run(make(EvalCurveConfig, {**FAST, "ckpt": str(setup["curve"]), "num_points": 3, "num_images": 0,
                                          "segment_too": False, "out": str(tmp_path / "eval")}))
    series = np.load(tmp_path / "eval" / "curve.npz")
    for key in ("tr_loss", "te_loss", "tr_mse", "te_mse"):
        assert npz[f"bend_{key}"][0] == pytest.approx(series[key][0], rel=1e-6), key
        assert npz[f"bend_{key}"][2] == pytest.approx(series[key][-1], rel=1e-6), key


def test_curve_and_segment_projections(setup, curve_plane):
    _, _, npz, _ = curve_plane
    (x0, y0), (x1, y1), (x2, y2) = npz["bend_coordinates"]
    ts = npz["ts"]
    assert np.array_equal(ts, np.linspace(0, 1, 61))
    expected = np.stack([(1 - ts) ** 2 * x0 + 2 * ts * (1 - ts) * x1 + ts**2 * x2,
                         (1 - ts) ** 2 * y0 + 2 * ts * (1 - ts) * y1 + ts**2 * y2], axis=1)
    assert np.allclose(npz["curve_coordinates"], expected, rtol=1e-5, atol=1e-5 * npz["dx"])
    assert np.allclose(npz["segment_coordinates"], np.stack([ts * npz["dx"], 0 * ts], axis=1), atol=1e-5 * npz["dx"])
    curve, _ = load_curve(setup["curve"])
    # a Bezier curve of 3 bends lies in their plane: only float32 rounding separates them
    assert npz["curve_distance"].max() < 1e-5 * curve.bends[0].norm().item()


def test_outputs_agree(setup, curve_plane):
    out, summary, npz, record = curve_plane
    shapes = {"alphas": (3,), "betas": (3,), "grid": (3, 3, 2), "bend_coordinates": (3, 2), "ts": (61,),
              "curve_coordinates": (61, 2), "segment_coordinates": (61, 2), "curve_distance": (61,), "dx": (),
              "dy": (),
              **{f"{s}_{m}": (3, 3) for s in ("tr", "te") for m in ("loss", "mse", "psnr")},
              **{f"bend_{s}_{m}": (3,) for s in ("tr", "te") for m in ("loss", "mse", "psnr")},
              "recon": (3, 3, 4, 3, 32, 32), "recon_images": (4, 3, 32, 32)}
    assert {k: v.shape for k, v in npz.items()} == shapes
    assert np.array_equal(npz["alphas"], [0, 0.5, 1]) and np.array_equal(npz["betas"], [0, 0.5, 1])
    assert np.allclose(npz["grid"][2, 1], [npz["dx"], npz["dy"] / 2])
    assert record["kind"] == "curve" and record["inputs"] == [str(setup["curve"])]
    assert record["endpoints"] == [str(setup["a"]), str(setup["b"])]
    assert record["curve"] == {"curve": "Bezier", "num_bends": 3, "middle_bend": 1}
    assert record["grid"]["points"] == 3 and record["grid"]["margins"] == dict.fromkeys(
        ("left", "right", "bottom", "top"), 0.0)
    assert record["plane"]["dx"] == float(npz["dx"]) and record["plane"]["dy"] == float(npz["dy"])
    assert record["bn"]["recomputed"] and record["bn"]["images"] == 64 and record["train_metric_images"] == 64
    assert record["test_metric_images"] == len(setup["data"].test)
    for k, bend in enumerate(record["bends"]):
        assert bend["te_loss"] == npz["bend_te_loss"][k] and bend["coordinates"] == npz["bend_coordinates"][k].tolist()
    assert record["summary"]["te_loss_max"] == npz["te_loss"].max() == summary["te_loss_max"]
    assert summary["tr_loss_start"] == npz["bend_tr_loss"][0]
    assert record["config"]["grid"] == 3 and record["seconds_per_point"] > 0
    files = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    assert files == ["plane.json", "plane.npz", "plane.png"]  # no temporaries left
    assert sorted(record["files"]) == ["json", "npz", "plot"]
    with Image.open(out / "plane.png") as im:
        im.verify()


def test_points_per_call_gives_the_same_plane(setup, curve_plane, tmp_path):
    _, _, npz, record = curve_plane
    assert record["points_per_call"] == 1 and record["memory_format"] == "channels_last"
    run_plane({**FAST, "ckpt": str(setup["curve"]), "grid": 3, "margin": 0.0, "points_per_call": 4,
               "memory_format": "contiguous", "out": str(tmp_path)})  # 9 nodes: chunks of 4, 4 and 1
    other = json.loads((tmp_path / "plane.json").read_text())
    assert other["points_per_call"] == 4 and other["memory_format"] == "contiguous"
    other_npz = np.load(tmp_path / "plane.npz")
    for k in npz:
        if k == "recon":  # pixels: a float rounding difference may move one across a uint8 step
            assert np.abs(other_npz[k].astype(int) - npz[k].astype(int)).max() <= 1
        else:
            np.testing.assert_allclose(other_npz[k], npz[k], rtol=1e-5, atol=0, err_msg=k)


# ----------------------------------------------------------------------------------------------------------
# the plane through three networks


def test_points_that_differ_only_in_biases_before_batchnorm_give_a_flat_plane(setup, tmp_path):
    """Recomputed BN statistics absorb a conv bias that feeds a BatchNorm: every network of the plane through
    A and two such variants of it computes A's function, so the plane is flat to float rounding."""
    data = setup["data"]
    a = _endpoint(tmp_path / "A.pt", 5, data, **UPSAMPLE)
    g = torch.Generator().manual_seed(0)
    for name in ("B", "C"):
        state = {k: v.clone() for k, v in a.items()}
        for key in ("encoder.0.bias", "encoder.3.bias"):
            state[key] += 0.5 * torch.randn(state[key].shape, generator=g)
        args = {**DATA_ARGS, "loss": "mse", "seed": 5, **ARCH, **UPSAMPLE}
        save_checkpoint(tmp_path / f"{name}.pt", {"kind": "endpoint", "model": state, "optimizer": {}, "epoch": 1,
                                                  "args": args, "metrics": []})
    out = tmp_path / "out"
    assert run_cli("plane", "--points", tmp_path / "A.pt", tmp_path / "B.pt", tmp_path / "C.pt", "--model",
                   UPSAMPLE["model"], "--grid", 3, "--bn-images", 64, "--train-images", 64, "--batch-size", 64,
                   "--device", "cpu", "--no-progress", "--margin-top", 0.5, "--out", out) == 0
    npz = np.load(out / "plane.npz")
    record = json.loads((out / "plane.json").read_text())
    assert record["kind"] == "points" and record["points"] == ["A", "B", "C"] and record["curve"] is None
    assert record["inputs"] == [str(tmp_path / f"{name}.pt") for name in "ABC"]
    assert np.allclose(npz["alphas"], [-0.2, 0.5, 1.2]) and np.allclose(npz["betas"], [-0.2, 0.65, 1.5])
    assert npz["dx"] > 0.5 and npz["dy"] > 0.5 and "curve_coordinates" not in npz
    for key in ("tr_loss", "te_loss", "tr_mse", "te_mse"):
        values = np.concatenate([npz[key].ravel(), npz[f"bend_{key}"]])
        assert values.max() == pytest.approx(values.min(), rel=1e-5), key
    # not flat by construction: with A's statistics kept instead of recomputed, B is another function
    model = build_model({**ARCH, **UPSAMPLE})
    b = torch.load(tmp_path / "B.pt", weights_only=True)["model"]
    model.load_state_dict({**b, **{k: v for k, v in a.items() if "running" in k}})
    kept = evaluate(model, BatchLoader(data.test, 64, "cpu"), MSELoss())["loss"]
    assert kept != pytest.approx(npz["te_loss"][0, 0], rel=1e-3)


def test_points_with_different_losses_need_loss(setup, tmp_path):
    state = torch.load(setup["b"], weights_only=True)
    state["args"]["loss"] = "vgg"
    save_checkpoint(tmp_path / "vgg.pt", state)
    with pytest.raises(UserError, match="different losses"):
        run_plane({**FAST, "points": [str(setup["a"]), str(tmp_path / "vgg.pt"), str(setup["b"])],
                   "out": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# bad input: exit 2, one message, nothing written


def test_bad_input_exits_2_with_a_message(setup, tmp_path, capsys):
    a, b, curve = setup["a"], setup["b"], setup["curve"]
    out = tmp_path / "out"
    (tmp_path / "file").write_text("")
    cases = [
        ([], "neither of --ckpt and --points"),
        (["--ckpt", curve, "--points", a, b, a], "both of --ckpt and --points"),
        (["--ckpt", curve, "--grid", 1], "--grid must be at least 2"),
        (["--ckpt", curve, "--margin", -0.1], "--margin must be at least 0"),
        (["--ckpt", a], "but a curve checkpoint"),
        (["--ckpt", tmp_path / "nope.pt"], "does not exist"),
        (["--points", a, b, setup["odd"]], "do not match each other"),
        (["--points", a, curve, b], "is a curve checkpoint"),
        (["--points", a, a, a], "A and C are the same network"),
        (["--ckpt", setup["line"]], "span a line, not a plane"),
    ]
    for flags, message in cases:
        assert run_cli("plane", *flags, "--no-progress", "--out", out) == 2, flags
        assert message in " ".join(capsys.readouterr().err.split()), flags
    assert run_cli("plane", "--ckpt", curve, "--no-progress", "--out", tmp_path / "file") == 2
    assert "is an existing file" in capsys.readouterr().err
    assert not out.exists()
    # a folder holding another plane is kept unless --overwrite says otherwise
    (tmp_path / "held").mkdir()
    (tmp_path / "held/plane.json").write_text("{}")
    assert run_cli("plane", "--ckpt", curve, "--no-progress", "--out", tmp_path / "held") == 2
    assert "already holds a plane (plane.json). Pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "held").iterdir()] == ["plane.json"]


def test_a_two_bend_curve_is_a_line(setup, tmp_path):
    curve = Curve(build_model(ARCH), "polychain", 2)
    curve.set_endpoints(ConvAutoencoder(**ARCH).state_dict(), ConvAutoencoder(**ARCH).state_dict())
    save_checkpoint(tmp_path / "c.pt", {"kind": "curve", "curve": curve.curve_state(), "model_config": dict(ARCH),
                                        "optimizer": {}, "epoch": 1, "args": {**DATA_ARGS, "loss": "mse"},
                                        "metrics": []})
    with pytest.raises(UserError, match="has 2 bends"):
        run_plane({**FAST, "ckpt": str(tmp_path / "c.pt"), "out": str(tmp_path / "out")})


def test_failed_run_leaves_previous_results_intact(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = {**FAST, "ckpt": str(setup["curve"]), "grid": 2, "curve_points": 5, "out": str(out), "overwrite": True}
    run_plane(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"plane.json", "plane.npz", "plane.png"} <= set(before)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(plots, "plot_plane", broken)  # fails after plane.npz was written, before plane.json
        with pytest.raises(RuntimeError, match="boom"):
            run_plane({**cfg, "grid": 3})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new npz, no temporary files
    run_plane({**cfg, "grid": 3})  # and a run that succeeds does replace them
    assert json.loads((out / "plane.json").read_text())["grid"]["points"] == 3
    assert np.load(out / "plane.npz")["tr_loss"].shape == (3, 3)


def test_plane_json_holds_the_record_keys_eval_curve_writes(curve_plane, setup, tmp_path):
    """Both records are built by evaluation.record_keys: the same keys, and at the shared protocol the same
    values."""
    _, _, _, record = curve_plane
    eval_curve.run(make(EvalCurveConfig, {**FAST, "ckpt": str(setup["curve"]), "num_points": 2, "segment_too": False,
                                          "num_images": 0, "out": str(tmp_path)}))
    eval_record = json.loads((tmp_path / "eval.json").read_text())
    shared = ("loss", "loss_description", "data", "bn", "train_metric_images", "test_metric_images", "device",
              "precision", "points_per_call", "memory_format", "compiled", "seconds", "config", "notes")
    assert set(shared) <= set(record) and set(shared) <= set(eval_record)
    for key in ("loss", "loss_description", "data", "bn", "train_metric_images", "test_metric_images", "device",
                "precision", "points_per_call", "memory_format", "compiled"):
        assert record[key] == eval_record[key], key


def test_the_reconstructions_at_every_grid_point_are_its_networks(setup, curve_plane):
    """plane.npz's recon[i, j]: the first held-out images reconstructed by the network at grid node (i, j), BN
    statistics recomputed there from the same images as its metrics, as uint8 pixels (the strips' rounding)."""
    out, _, npz, record = curve_plane
    data = setup["data"]
    fixed = data.test[: plane.RECON_IMAGES].float().div(255)
    assert npz["recon"].dtype == np.uint8 and np.array_equal(npz["recon_images"], data.test[: plane.RECON_IMAGES])
    curve, _ = load_curve(setup["curve"])
    geometry = plane_through(*(curve.bends[k].detach() for k in (0, 1, 2)))
    bn_loader = BatchLoader(fixed_subset(data.train, 64, SUBSET_SEED), 64, "cpu")
    for i, j in ((0, 0), (2, 1), (1, 2)):
        weights = curve.unflatten(geometry.point(*npz["grid"][i, j]).float())
        recompute_bn(curve.base, weights, bn_loader)
        expected = evaluation.pixels(metrics.reconstruct(NetworkAt(curve.base, weights), fixed))
        assert np.abs(npz["recon"][i, j].astype(int) - expected.astype(int)).max() <= 1, (i, j)
    # different networks reconstruct differently: the grid's corners are not one picture repeated
    assert not np.array_equal(npz["recon"][0, 0], npz["recon"][2, 2])
