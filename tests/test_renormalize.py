"""eval-curve --renormalize (aecurves.renormalize, REPAIR's correction of the layers without BatchNorm): which layers,
the endpoints left as they are, the interpolated statistics reached at inner t, the records and labels, bad input."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aecurves import plots, renormalize
from aecurves.checkpoint import save_checkpoint
from aecurves.commands import eval_curve
from aecurves.config import SUBSET_SEED, EvalCurveConfig, make
from aecurves.curves import Curve, NetworkAt, make_segment, recompute_bn
from aecurves.data import BatchLoader, load_data
from aecurves.metrics import fixed_subset
from aecurves.models import ConvAutoencoder, build_model

from conftest import run_cli, train_briefly

ARCH = {"channels": 3, "image_size": 32, "latent_dim": 16, "width": 8}
DATA_ARGS = {"dataset": "synthetic", "data_dir": None, "image_size": 32, "limit": 256, "val_fraction": 0.1,
             "use_test": False}
FAST = {"num_points": 3, "bn_images": 64, "train_images": 64, "num_images": 0, "batch_size": 32, "device": "cpu",
        "vgg_weights": "random", "no_progress": True}
BUILTIN_LAYERS = ["encoder.4", "decoder_input"]  # ConvAutoencoder(**ARCH): the two latent Linears
OUTPUT_LAYER = "decoder.2"  # its output ConvTranspose2d (3 stages down, 2 up), left out by default


def _args(seed, **extra):
    return {**DATA_ARGS, "loss": "mse", "seed": seed, **ARCH, "lr": 3e-3, "epochs": 1, **extra}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("renormalize")
    data = load_data("synthetic", image_size=32, limit=256, progress=False)
    paths = []
    for seed in (1, 2):
        model = train_briefly(data, seed, ARCH)
        path = root / f"e{seed}" / "checkpoint.pt"
        save_checkpoint(path, {"kind": "endpoint", "model": model.state_dict(), "optimizer": {}, "epoch": 1,
                               "args": _args(seed), "metrics": []})
        paths.append((path, model.state_dict()))
    bn = BatchLoader(fixed_subset(data.train, FAST["bn_images"], SUBSET_SEED), FAST["batch_size"], "cpu")
    return {"root": root, "data": data, "a": paths[0][0], "b": paths[1][0], "states": [p[1] for p in paths],
            "bn": bn}


def _renormalizer(pair, include_output=True):
    segment = make_segment(build_model(ARCH), *pair["states"])
    plan = renormalize.find_layers(segment.base, include_output=include_output)
    return segment, renormalize.Renormalizer(segment, plan, pair["bn"], pair["bn"])


def _outputs(base, weights, loader, images):
    recompute_bn(base, weights, loader)  # as the evaluation protocol does at every t
    network = NetworkAt(base, weights)
    network.eval()
    with torch.no_grad():
        return network(images)


# ----------------------------------------------------------------------------------------------------------
# which layers


def test_the_builtin_model_corrects_exactly_its_layers_without_batchnorm():
    plan = renormalize.find_layers(ConvAutoencoder(**ARCH))
    assert plan.names == BUILTIN_LAYERS  # in forward order
    assert plan.covered == ["encoder.0.0", "encoder.1.0", "encoder.2.0", "decoder.0.0", "decoder.1.0"]
    assert list(plan.skipped) == [OUTPUT_LAYER] and "output layer" in plan.skipped[OUTPUT_LAYER]
    assert [layer.kind for layer in plan.layers] == ["Linear", "Linear"]
    # every layer of the model is either read by BatchNorm (covered) or not (corrected, or the output layer)
    model = ConvAutoencoder(**ARCH)
    convs = [n for n, m in model.named_modules() if isinstance(m, renormalize.LAYER_TYPES)]
    assert sorted(plan.covered + plan.names + [OUTPUT_LAYER]) == sorted(convs)
    # the output layer is corrected only when asked (benchmarks/renormalize_segments.py measures both)
    every = renormalize.find_layers(ConvAutoencoder(**ARCH), include_output=True)
    assert every.names == BUILTIN_LAYERS + [OUTPUT_LAYER] and every.skipped == {}
    assert [layer.output for layer in every.layers] == [False, False, True]
    wide = renormalize.find_layers(ConvAutoencoder(3, 64, 16, 8), include_output=True)
    assert wide.names == ["encoder.5", "decoder_input", "decoder.3"]


class AllBatchNorm(nn.Module):
    """Every conv read by a BatchNorm, the output one too (its BatchNorm then a sigmoid)."""

    def __init__(self, bn_output=True):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.ConvTranspose2d(4, 3, 3, 1, 1), *([nn.BatchNorm2d(3)] if bn_output else []),
                                 nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


def test_a_model_with_batchnorm_after_every_conv_gets_no_correction():
    for include_output in (False, True):
        plan = renormalize.find_layers(AllBatchNorm(bn_output=True), include_output=include_output)
        assert plan.layers == [] and plan.covered == ["net.0", "net.3"] and plan.skipped == {}
        assert "nothing to correct" in renormalize.no_layers_message(plan)
    # only the output conv writes without BatchNorm: left out (the default), nothing to correct
    plan = renormalize.find_layers(AllBatchNorm(bn_output=False))
    assert plan.layers == [] and plan.covered == ["net.0"] and "output layer" in plan.skipped["net.3"]
    assert "net.3: the output layer" in renormalize.no_layers_message(plan)
    every = renormalize.find_layers(AllBatchNorm(bn_output=False), include_output=True)
    assert every.names == ["net.3"] and every.layers[0].output


class Awkward(nn.Module):
    """A layer without bias, one called twice, one read both by BatchNorm and by something else."""

    def __init__(self):
        super().__init__()
        self.nobias = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.twice = nn.Conv2d(4, 4, 3, 1, 1)
        self.shared = nn.Conv2d(4, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = self.twice(self.twice(self.nobias(x)))
        s = self.shared(h)
        return torch.sigmoid(self.out(self.bn(s) + s))


def test_layers_that_cannot_be_corrected_are_listed_with_the_reason():
    plan = renormalize.find_layers(Awkward(), include_output=True)
    assert plan.names == ["shared", "out"]  # read by BatchNorm AND the sum: not covered, so corrected
    assert "no bias" in plan.skipped["nobias"] and "called 2 times" in plan.skipped["twice"]


def test_the_mlp_without_batchnorm_has_every_linear_corrected():
    from ae_models import mlp_autoencoder, upsample_autoencoder

    assert renormalize.find_layers(mlp_autoencoder(3, 16, 8)).names == ["1", "3", "4"]  # "6" writes the output
    assert renormalize.find_layers(mlp_autoencoder(3, 16, 8), include_output=True).names == ["1", "3", "4", "6"]
    plan = renormalize.find_layers(upsample_autoencoder(3, 16, 8))
    assert plan.names == ["encoder.7", "decoder.0", "decoder.3"] and list(plan.skipped) == ["decoder.7"]
    assert plan.covered == ["encoder.0", "encoder.3"]


# ----------------------------------------------------------------------------------------------------------
# what the correction does


def test_at_the_endpoints_the_renormalised_network_is_the_plain_one(pair):
    """At t = 0 the targets are A's own statistics, measured on the same images for the same network, so every
    scale is exactly 1 (x / x) and the mean shift exactly cancels up to one rounding of b' = (b − μ) + μ: the
    weights agree to a few float32 ulps and the outputs (in [0, 1]) to 1e-6. Likewise at t = 1."""
    segment, renorm = _renormalizer(pair)
    images = pair["data"].test[:16].float().div(255)
    for t in (0.0, 1.0):
        folds = renorm.folds_at(t)
        assert all(torch.equal(f.scale, torch.ones_like(f.scale)) for f in folds.values())
        plain, fixed = segment.weights(t), renorm.weights_at(t)
        for name in plain:
            assert torch.allclose(fixed[name], plain[name], rtol=1e-6, atol=1e-6), (t, name)
        got, want = _outputs(segment.base, fixed, pair["bn"], images), _outputs(segment.base, plain, pair["bn"], images)
        assert (got - want).abs().max() < 1e-6, t


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_at_an_inner_t_every_corrected_layer_has_the_interpolated_statistics(pair, t):
    """The promise: on the BN images, in eval mode with the BN statistics recomputed for the corrected weights (as
    every point is evaluated), each corrected channel's mean is (1 − t)·μ_A + t·μ_B and its std
    ((1 − t)·σ_A + t·σ_B)·√(var/(var + eps)), σ = √(var + eps). The statistics are those the correction was
    fitted on, so they agree to float32 rounding of the forward pass (1e-4 relative)."""
    segment, renorm = _renormalizer(pair)
    targets = renorm.targets(t)
    fixed = renorm.weights_at(t)
    recompute_bn(segment.base, fixed, pair["bn"])
    after = renormalize.layer_statistics(segment.base, fixed, pair["bn"], renorm.plan.layers, stop=False)
    plain_weights = segment.weights(t)
    recompute_bn(segment.base, plain_weights, pair["bn"])
    before = renormalize.layer_statistics(segment.base, plain_weights, pair["bn"], renorm.plan.layers, stop=False)
    off = 0.0
    for layer in renorm.plan.layers:
        mean, var = after[layer.name]
        target_mean, target_std = targets[layer.name]
        scale = renorm.folds_at(t)[layer.name].scale
        raw_var = (target_std / scale) ** 2 - renormalize.EPS  # the var the fold was fitted to
        assert torch.allclose(mean, target_mean, rtol=1e-4, atol=1e-4 * float(target_std.max())), layer.name
        assert torch.allclose(var.sqrt(), target_std * (raw_var / (raw_var + renormalize.EPS)).sqrt(),
                              rtol=1e-4, atol=1e-6), layer.name
        assert torch.allclose(var.sqrt(), target_std, rtol=1e-3)  # here every var >> eps
        # and the plain network is far from the targets: the correction did something
        plain_mean, plain_var = before[layer.name]
        off = max(off, float(((renormalize.sigma(plain_var) - target_std).abs() / target_std).max()))
    assert off > 0.05


def test_the_correction_is_folded_into_weight_and_bias_by_hand(pair):
    """W' = W·s, b' = (b − μ)·s + μ_target, per output channel (dimension 1 of a ConvTranspose2d weight)."""
    segment, renorm = _renormalizer(pair)
    folds, plain, fixed = renorm.folds_at(0.5), segment.weights(0.5), renorm.weights_at(0.5)
    for layer in renorm.plan.layers:
        f = folds[layer.name]
        s = f.scale.float()
        axis = 1 if layer.transposed else 0
        shape = [1] * plain[layer.weight].dim()
        shape[axis] = -1
        assert torch.allclose(fixed[layer.weight], plain[layer.weight] * s.view(shape), rtol=1e-6, atol=1e-7)
        want_b = ((plain[layer.bias].double() - f.mean) * f.scale + f.target_mean).float()
        assert torch.allclose(fixed[layer.bias], want_b, rtol=1e-6, atol=1e-7)
    untouched = set(plain) - {n for layer in renorm.plan.layers for n in (layer.weight, layer.bias)}
    assert untouched and all(torch.equal(fixed[n], plain[n]) for n in untouched)


def test_grouped_conv_transpose_folds_its_output_channels():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    layer = renormalize.Layer("c", "c.weight", "c.bias", "ConvTranspose2d", True, 2, 6, True, frozenset(),
                              frozenset())
    scale = torch.arange(1.0, 7.0, dtype=torch.float64)
    fold = renormalize.Fold(scale, torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64),
                            torch.ones(6, dtype=torch.float64))
    weights = dict(conv.named_parameters(prefix="c"))
    fixed = renormalize.fold_weights({k: v.detach() for k, v in weights.items()}, layer, fold)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        plain = nn.functional.conv_transpose2d(x, conv.weight, None, groups=2)
        got = nn.functional.conv_transpose2d(x, fixed["c.weight"], None, groups=2)
    assert torch.allclose(got, plain * scale.float().view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)


def test_a_curve_is_renormalised_by_its_own_t_between_its_endpoints(pair):
    curve = Curve(build_model(ARCH), "bezier", 3)
    curve.set_endpoints(*pair["states"])
    curve.init_linear()
    with torch.no_grad():
        curve.bends[1].add_(0.02 * torch.randn(curve.bends[1].shape, generator=torch.Generator().manual_seed(0)))
    renorm = renormalize.Renormalizer(curve, renormalize.find_layers(curve.base, include_output=True), pair["bn"],
                                      pair["bn"])
    path = renormalize.RenormalizedPath(curve, renorm)
    assert all(torch.equal(f.scale, torch.ones_like(f.scale)) for f in renorm.folds_at(0.0).values())
    fixed = path.weights(0.5)
    recompute_bn(curve.base, fixed, pair["bn"])
    after = renormalize.layer_statistics(curve.base, fixed, pair["bn"], renorm.plan.layers)
    for name, (target_mean, _) in renorm.targets(0.5).items():
        assert torch.allclose(after[name][0], target_mean, rtol=1e-4, atol=1e-4)
    assert path.curve_name == "Bezier" and path.num_bends == 3


# ----------------------------------------------------------------------------------------------------------
# eval-curve --renormalize


@pytest.fixture(scope="module")
def runs(pair):
    labels = {}
    original = plots.plot_loss_along_paths

    def spy(series, path, **kwargs):
        labels[str(path)] = [s["label"] for s in series]
        return original(series, path, **kwargs)

    plots.plot_loss_along_paths = spy
    try:
        out = {}
        for on in (False, True):
            folder = pair["root"] / f"eval_{on}"
            summary = eval_curve.run(make(EvalCurveConfig, {**FAST, "segment": [str(pair["a"]), str(pair["b"])],
                                                            "renormalize": on,
                                                            "out": str(folder)}))
            out[on] = (summary, json.loads((folder / "eval.json").read_text()))
    finally:
        plots.plot_loss_along_paths = original
    return out, labels


def test_eval_curve_renormalised_segment_is_recorded_and_differs_inside(runs, capsys):
    (plain, plain_record), (fixed, record) = runs[0][False], runs[0][True]
    assert plain_record["renormalize"] is False and plain_record["renormalization"] is None
    assert record["renormalize"] is True and record["config"]["renormalize"] is True
    r = record["renormalization"]
    assert r["layers"] == BUILTIN_LAYERS and r["count"] == 2 and r["output_layer_corrected"] is False
    assert list(r["skipped"]) == [OUTPUT_LAYER]
    assert r["images"] == FAST["bn_images"] and r["paths"] == ["segment, renormalised"]
    assert any("renormalised (--renormalize)" in n and "decoder_input" in n for n in record["notes"])
    # every other key of eval.json is as without --renormalize
    assert set(record) == set(plain_record)
    # the ends are the endpoints; the inner point is another network, with another loss
    for split in ("tr", "te"):
        assert record["series"][f"{split}_loss"][0] == pytest.approx(plain_record["series"][f"{split}_loss"][0],
                                                                     rel=1e-5)
        assert record["series"][f"{split}_loss"][-1] == pytest.approx(plain_record["series"][f"{split}_loss"][-1],
                                                                      rel=1e-5)
    mid, plain_mid = record["series"]["te_loss"][1], plain_record["series"]["te_loss"][1]
    assert abs(mid - plain_mid) > 1e-3 * plain_mid
    assert fixed["te_loss_max"] != plain["te_loss_max"]


def test_the_renormalised_path_is_named_so_in_the_figure_and_the_summary(runs):
    labels = {Path(k).parent.name: v for k, v in runs[1].items()}  # the legend of loss_along_path.png
    assert labels == {"eval_False": ["segment"], "eval_True": ["segment, renormalised"]}


def test_a_curve_and_its_segment_are_both_renormalised(pair, tmp_path, capsys):
    curve = Curve(build_model(ARCH), "bezier", 3)
    curve.set_endpoints(*pair["states"])
    curve.init_linear()
    ckpt = tmp_path / "curve" / "checkpoint.pt"
    args = {**DATA_ARGS, "loss": "mse", "init_start": str(pair["a"]), "init_end": str(pair["b"]), "curve": "Bezier",
            "num_bends": 3, "fix_start": True, "fix_end": True, "seed": 1}
    save_checkpoint(ckpt, {"kind": "curve", "curve": curve.curve_state(), "model_config": dict(ARCH),
                           "optimizer": {}, "epoch": 1, "args": args, "metrics": []})
    capsys.readouterr()
    assert run_cli("eval-curve", "--ckpt", ckpt, "--renormalize", "--num-points", 3, "--bn-images", 32,
                   "--train-images", 32, "--num-images", 0, "--batch-size", 32, "--vgg-weights", "random",
                   "--no-progress", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "Bezier curve (3 bends), renormalised\n" in printed and "segment, renormalised\n" in printed
    record = json.loads((tmp_path / "curve" / "eval" / "eval.json").read_text())
    assert record["renormalization"]["paths"] == ["Bezier curve (3 bends), renormalised", "segment, renormalised"]
    # a Bezier curve with 3 bends on the segment is the segment: the two renormalised paths agree
    assert record["series"]["te_loss"] == pytest.approx(record["series"]["segment_te_loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_renormalize_with_ensemble_is_refused(pair, tmp_path, capsys):
    assert run_cli("eval-curve", "--segment", pair["a"], pair["b"], "--renormalize", "--ensemble", 3,
                   "--no-progress", "--device", "cpu", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--renormalize and --ensemble cannot be combined" in err and "Run eval-curve twice" in err
    assert not (tmp_path / "out").exists()


def test_renormalize_on_a_model_with_nothing_to_correct_is_refused(tmp_path, capsys):
    factory = tmp_path / "all_bn.py"
    factory.write_text(
        "from torch import nn\n\n"
        "def build(channels, image_size, latent_dim):\n"
        "    return nn.Sequential(nn.Conv2d(channels, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.Conv2d(4, channels, 3, 1, 1), nn.BatchNorm2d(channels), nn.Sigmoid())\n")
    spec = f"{factory}:build"
    arch = {"model": spec, "model_kwargs": {}, "channels": 3, "image_size": 16, "latent_dim": 4, "width": None}
    ends = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"e{seed}.pt"
        save_checkpoint(path, {"kind": "endpoint", "model": build_model(arch).state_dict(), "optimizer": {},
                               "epoch": 1, "metrics": [],
                               "args": {**DATA_ARGS, **arch, "image_size": 16, "loss": "mse", "seed": seed}})
        ends.append(path)
    capsys.readouterr()
    assert run_cli("eval-curve", "--segment", *ends, "--model", spec, "--renormalize", "--no-progress",
                   "--device", "cpu", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--renormalize has nothing to correct" in err and "read only by BatchNorm" in err
    assert not (tmp_path / "out").exists()
    # without --renormalize the same pair evaluates
    assert run_cli("eval-curve", "--segment", *ends, "--model", spec, "--num-points", 2, "--bn-images", 16,
                   "--train-images", 16, "--num-images", 0, "--vgg-weights", "random", "--no-progress",
                   "--device", "cpu", "--out", tmp_path / "plain") == 0


def test_renormalize_is_off_by_default_and_a_flag():
    from aecurves.cli import parse

    assert EvalCurveConfig().renormalize is False
    _, cfg = parse(["eval-curve", "--segment", "a.pt", "b.pt", "--renormalize"])
    assert cfg.renormalize is True


def test_a_model_without_batchnorm_is_corrected_without_bn_recomputation(pair):
    """The MLP of ae_models: no BatchNorm, so no recomputation, and every Linear corrected in turn."""
    from ae_models import mlp_autoencoder

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(mlp_autoencoder(3, 32, 8, hidden=24).state_dict())
    segment = make_segment(mlp_autoencoder(3, 32, 8, hidden=24), *states)
    plan = renormalize.find_layers(segment.base)
    renorm = renormalize.Renormalizer(segment, plan, pair["bn"], None)
    assert all(torch.equal(f.scale, torch.ones_like(f.scale)) for f in renorm.folds_at(1.0).values())
    fixed = renorm.weights_at(0.5)
    after = renormalize.layer_statistics(segment.base, fixed, pair["bn"], plan.layers)
    for name, (target_mean, target_std) in renorm.targets(0.5).items():
        assert torch.allclose(after[name][0], target_mean, rtol=1e-4, atol=1e-4 * float(target_std.max())), name
    # per point: one eval-mode pass per corrected layer, and no BatchNorm pass
    passes = renorm.passes
    renorm.folds_at(0.25)
    assert renorm.passes - passes == len(plan.layers) == 3


def test_repairs_own_training_mode_pass_only_approximates_the_targets(pair):
    """REPAIR's procedure (method="repair", for comparison only): reset layers normalising each batch in a
    training-mode pass, running statistics the mean of per-batch ones. At t = 0 that network is not A (here,
    batches of 32: the mean of per-batch variances is not the variance over the subset), and at t = 0.5 its
    layers reach the targets only to a few percent; the layerwise eval-mode correction (test above) reaches
    them to 1e-4 and leaves A as it is."""
    segment, _ = _renormalizer(pair)
    renorm = renormalize.Renormalizer(segment, renormalize.find_layers(segment.base, include_output=True),
                                      pair["bn"], pair["bn"], method="repair")
    images = pair["data"].test[:16].float().div(255)
    fixed = renorm.weights_at(0.0)
    got, want = _outputs(segment.base, fixed, pair["bn"], images), _outputs(segment.base, segment.weights(0.0),
                                                                          pair["bn"], images)
    assert 1e-4 < (got - want).abs().max() < 0.05
    fixed = renorm.weights_at(0.5)
    recompute_bn(segment.base, fixed, pair["bn"])
    after = renormalize.layer_statistics(segment.base, fixed, pair["bn"], renorm.plan.layers)
    for name, (target_mean, target_std) in renorm.targets(0.5).items():
        assert ((after[name][0] - target_mean).abs() / target_std).max() < 0.2, name
        assert (after[name][1].sqrt() / target_std - 1).abs().max() < 0.2, name
    with pytest.raises(ValueError, match="unknown"):
        renormalize.Renormalizer(segment, renorm.plan, pair["bn"], pair["bn"], method="other")


def test_several_renormalised_points_per_call_give_the_same_numbers(pair):
    """The corrected networks are ordinary weights, so the vmapped engine stacks them like any others."""
    from aecurves import metrics
    from aecurves.losses import MSELoss

    segment, renorm = _renormalizer(pair, include_output=False)
    path = renormalize.RenormalizedPath(segment, renorm)
    test = BatchLoader(pair["data"].test, 32, "cpu")
    one, two = (metrics.evaluate_path(path, [0.0, 0.5, 1.0], pair["bn"], test, MSELoss(), bn_loader=pair["bn"],
                                      points_per_call=k) for k in (1, 3))
    for key in ("te_loss", "tr_loss", "dl"):
        assert one[key] == pytest.approx(two[key], rel=1e-5), key
    plain = metrics.evaluate_path(segment, [0.5], pair["bn"], test, MSELoss(), bn_loader=pair["bn"])
    assert plain["te_loss"][0] != pytest.approx(one["te_loss"][1], rel=1e-3)
