"""VAEs through evaluation (issue 28): eval-curve, plane and the ensembles measure a VAE's objective ("loss") and its
two terms (distortion, rate) apart, the barriers on each; an autoencoder's records stay as they were."""

import copy
import json

import numpy as np
import pytest
import torch

from aecurves import evaluation, metrics, stats
from aecurves.checkpoint import save_checkpoint
from aecurves.commands import ensembles, eval_curve, plane
from aecurves.config import (
    BUILTIN_MODEL,
    CONV_VAE,
    EVAL_BATCH_SIZE,
    EnsemblesConfig,
    EvalCurveConfig,
    PlaneConfig,
    make,
)
from aecurves.curves import Curve, make_segment, recompute_bn
from aecurves.data import BatchLoader, load_data
from aecurves.losses import make_loss
from aecurves.models import build_model, gaussian_kl
from aecurves.records import EvalRecord, PlaneRecord

SIZES = {"channels": 3, "image_size": 16, "latent_dim": 8, "width": 4}
DATA_ARGS = {"dataset": "synthetic", "data_dir": None, "image_size": 16, "limit": 96, "val_fraction": 0.1,
             "use_test": False}
D = 3 * 16 * 16  # values per image: the KL is divided by it in the objective
# subsets larger than the 87 training images: every one is used, in order (the --full protocol)
FAST = {"num_points": 3, "bn_images": 1000, "train_images": 1000, "num_images": 2, "batch_size": 32, "device": "cpu",
        "vgg_weights": "random", "no_progress": True}


def _arch(model: str) -> dict:
    return {"model": model, "model_kwargs": {}, **SIZES}


def _save_endpoint(path, model_name: str, seed: int, kl_weight=None, steps: int = 6):
    """A tiny network of `model_name` trained a few steps on its objective from its own seed, saved as train does."""
    torch.manual_seed(seed)
    model = build_model(_arch(model_name))
    data = load_data(**DATA_ARGS, progress=False)
    objective = make_loss("mse", kl_weight=1.0 if kl_weight is None else kl_weight)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _, x in zip(range(steps), BatchLoader(data.train, 32, "cpu", shuffle=True, seed=seed)):
        loss = objective(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    args = {**DATA_ARGS, **_arch(model_name), "loss": "mse", "seed": seed, "lr": 3e-3, "epochs": 1}
    if kl_weight is not None:
        args["kl_weight"] = kl_weight
    save_checkpoint(path, {"kind": "endpoint", "model": model.state_dict(), "optimizer": {}, "epoch": 1,
                           "args": args, "metrics": []})
    return model


def _resave(src, dst, kl_weight):
    """The checkpoint `src` with another β in its args (the same weights)."""
    state = torch.load(src, weights_only=False)
    state["args"] = {**state["args"], "kl_weight": kl_weight}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, state)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_eval")
    paths = [root / name / "checkpoint.pt" for name in ("a", "b", "c")]
    models = [_save_endpoint(p, CONV_VAE, seed, kl_weight=1.0) for p, seed in zip(paths, (1, 2, 3))]
    return root, paths, models


def _eval(settings: dict) -> tuple[dict, EvalRecord, dict]:
    result = eval_curve.run(make(EvalCurveConfig, {**FAST, **settings}))
    with open(result["files"]["json"]) as f:
        record = EvalRecord.from_json(json.load(f))
    with np.load(result["files"]["npz"]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return result, record, arrays


@torch.no_grad()
def _rate_by_hand(model, data) -> float:
    """The mean KL on the held-out images of `model` with its BN statistics recomputed on every training image (the
    protocol's at an endpoint), from the posterior's mean and log-variance."""
    model = copy.deepcopy(model)
    recompute_bn(model, dict(model.named_parameters()), BatchLoader(data.train, FAST["batch_size"], "cpu"))
    model.eval()
    mu, logvar = model.posterior(data.test.float().div(255))
    return gaussian_kl(mu, logvar).mean().item()


def test_vae_segment_reports_objective_terms_and_barriers(vaes):
    root, paths, models = vaes
    result, record, arrays = _eval({"segment": [str(paths[0]), str(paths[1])], "out": str(root / "seg"),
                                    "ensemble": 2})
    assert record.vae is True and record.get("vae") is True and record.get("kl_weight") == 1.0
    assert record.get("loss_description") == "mean squared error + 1·KL/D (VAE objective)"
    data = load_data(**DATA_ARGS, progress=False)
    for t_index, model in ((0, models[0]), (-1, models[1])):
        assert arrays["te_rate"][t_index] == pytest.approx(_rate_by_hand(model, data), rel=1e-5)
    for split in ("tr", "te"):
        loss, distortion, rate = (arrays[f"{split}_{m}"] for m in ("loss", "distortion", "rate"))
        assert np.all(rate > 0) and np.all(distortion > 0)
        np.testing.assert_allclose(loss, distortion + rate / D, rtol=1e-6)
        # the MSE loss's distortion is the MSE: one number measured two ways
        np.testing.assert_allclose(distortion, arrays[f"{split}_mse"], rtol=1e-6)
    summary = record.path("segment")
    for split in ("tr", "te"):
        assert summary[f"{split}_barrier"] == pytest.approx(stats.loss_barrier(arrays["ts"], arrays[f"{split}_loss"]))
        for term in ("distortion", "rate"):
            series = record.get("series")[f"{split}_{term}"]
            assert summary[f"{split}_{term}_barrier"] == pytest.approx(stats.loss_barrier(arrays["ts"], series))
            assert summary[f"{split}_{term}_max"] == pytest.approx(max(series))
    # the ensembles: their metrics are the (averaged) reconstructions', and the record says no objective is given
    ensemble = record.get("ensemble")
    assert ensemble["metrics"] == ["mse", "psnr", "ssim"] and "VAE" in ensemble["note"]
    assert all(np.isfinite(v) for entry in ensemble["entries"].values() for k, v in entry.items() if k != "what")
    assert ensemble["entries"]["start"]["mse"] == pytest.approx(arrays["te_mse"][0], rel=1e-5)
    assert ensemble["entries"]["end"]["mse"] == pytest.approx(arrays["te_mse"][-1], rel=1e-5)


def test_kl_weight_moves_the_objective_by_beta_rate_over_d(vaes):
    root, paths, _ = vaes
    runs = {}
    for beta in (0.0, 2.0):
        ends = [root / f"beta{beta:g}" / name / "checkpoint.pt" for name in ("a", "b")]
        for src, dst in zip(paths, ends):
            _resave(src, dst, beta)
        runs[beta] = _eval({"segment": [str(e) for e in ends], "out": str(root / f"seg_beta{beta:g}")})
    (_, rec0, zero), (_, rec2, two) = runs[0.0], runs[2.0]
    assert rec0.get("kl_weight") == 0.0 and rec2.get("kl_weight") == 2.0
    assert rec2.get("loss_description") == "mean squared error + 2·KL/D (VAE objective)"
    for split in ("tr", "te"):
        np.testing.assert_array_equal(zero[f"{split}_rate"], two[f"{split}_rate"])
        np.testing.assert_array_equal(zero[f"{split}_distortion"], two[f"{split}_distortion"])
        np.testing.assert_allclose(zero[f"{split}_loss"], zero[f"{split}_distortion"], rtol=1e-6)
        np.testing.assert_allclose(two[f"{split}_loss"] - zero[f"{split}_loss"], 2.0 * two[f"{split}_rate"] / D,
                                   rtol=1e-4)
    # endpoints of different β: START's is used, and a note says so
    mixed = [root / "beta0" / "a" / "checkpoint.pt", root / "beta2" / "b" / "checkpoint.pt"]
    _, record, arrays = _eval({"segment": [str(e) for e in mixed], "out": str(root / "seg_mixed")})
    assert record.get("kl_weight") == 0.0 and any("different --kl-weight (0 and 2)" in n for n in record.get("notes"))
    np.testing.assert_allclose(arrays["te_loss"], arrays["te_distortion"], rtol=1e-6)


def test_stacked_vae_outputs_match_one_at_a_time(vaes):
    """Several VAEs vmapped in one call (a pair of stacked tensors) give each network's own numbers."""
    _, paths, _ = vaes
    states = [torch.load(p, weights_only=False)["model"] for p in paths[:2]]
    segment = make_segment(build_model(_arch(CONV_VAE)), *states)
    data = load_data(**DATA_ARGS, progress=False)
    loaders = [BatchLoader(images, 32, "cpu") for images in (data.train, data.test)]
    rows = {per_call: metrics.evaluate_points(segment.base, segment.unflatten, segment.flat_at, [0.0, 0.5, 1.0],
                                              *loaders, make_loss("mse", kl_weight=0.5), bn_loader=loaders[0],
                                              points_per_call=per_call)
            for per_call in (1, 3)}
    for one, stacked in zip(rows[1], rows[3]):
        assert set(one["te"]) == {"loss", "distortion", "rate", "mse", "psnr"}
        for split in ("tr", "te"):
            for key, value in one[split].items():
                assert stacked[split][key] == pytest.approx(value, rel=1e-5)


def test_objective_sums_and_per_image_agree_with_objective():
    torch.manual_seed(0)
    x, recon, kl = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4) * 5
    objective = make_loss("mse", kl_weight=3.0)
    sums = metrics.objective_sums(objective, (recon, kl), x, by_image=True)
    assert torch.equal(sums["per_image"], objective.per_image((recon, kl), x))
    assert sums["loss"].item() / 4 == pytest.approx(objective((recon, kl), x).item(), rel=1e-6)
    assert sums["rate"].item() == pytest.approx(kl.sum().item())
    assert sums["distortion"].item() / 4 == pytest.approx(torch.nn.functional.mse_loss(recon, x).item(), rel=1e-6)
    plain = metrics.objective_sums(objective, recon, x, by_image=False)
    assert set(plain) == {"loss", "per_image"} and plain["per_image"] is None


def test_autoencoder_records_have_no_terms(tmp_path):
    ends = [tmp_path / name / "checkpoint.pt" for name in ("a", "b")]
    for seed, path in zip((1, 2), ends):
        _save_endpoint(path, BUILTIN_MODEL, seed, steps=2)
    _, record, arrays = _eval({"segment": [str(e) for e in ends], "out": str(tmp_path / "seg")})
    assert record.vae is False and record.get("vae") is False and record.get("kl_weight") is None
    assert record.get("loss_description") == "mean squared error"
    keys = list(arrays) + list(record.path("segment")) + list(record.get("series"))
    assert not [k for k in keys if "distortion" in k or "rate" in k]
    # the loss of an autoencoder is its MSE, as before VAEs
    np.testing.assert_allclose(arrays["te_loss"], arrays["te_mse"], rtol=1e-6)
    # a file written before VAEs (no "vae") reads as an autoencoder's
    old = record.to_json()
    del old["vae"], old["kl_weight"]
    assert EvalRecord.from_json(old).vae is False


def test_plane_of_vaes_has_term_grids(vaes):
    root, paths, _ = vaes
    result = plane.run(make(PlaneConfig, {"points": [str(p) for p in paths], "out": str(root / "plane"), "grid": 2,
                                          "curve_points": 2, "bn_images": 1000, "train_images": 1000,
                                          "batch_size": 32, "device": "cpu", "no_progress": True}))
    with open(result["files"]["json"]) as f:
        record = PlaneRecord.from_json(json.load(f))
    assert record.vae is True and record.get("kl_weight") == 1.0
    assert "VAE objective" in record.get("loss_description")
    with np.load(result["files"]["npz"]) as npz:
        for split in ("tr", "te"):
            loss, distortion, rate = (npz[f"{split}_{m}"] for m in ("loss", "distortion", "rate"))
            assert loss.shape == distortion.shape == rate.shape == (2, 2) and np.all(rate > 0)
            np.testing.assert_allclose(loss, distortion + rate / D, rtol=1e-6)
            bends = npz[f"bend_{split}_rate"]
            assert bends.shape == (3,) and record.summary[f"{split}_rate_start"] == pytest.approx(bends[0])
    assert record.get("bends")[0]["te_rate"] > 0


def test_losses_for_uses_the_checkpoint_kl_weight():
    assert evaluation.checkpoint_kl_weight({}) == 1.0
    assert evaluation.checkpoint_kl_weight({"kl_weight": None}) == 1.0
    assert evaluation.checkpoint_kl_weight({"kl_weight": 0.25}) == 0.25
    loss_fn, _ = evaluation.losses_for("mse", "random", [], perceptual=False, kl_weight=0.25)
    assert loss_fn.kl_weight == 0.25


def test_ensembles_stage_averages_vae_reconstructions(vaes):
    """The study's ensembles stage on VAEs: a lone network's entry is its reconstruction's MSE, measured as
    metrics.evaluate measures it (BN statistics recomputed on every training image), and the record says VAE."""
    root, paths, models = vaes
    result = ensembles.run(make(EnsemblesConfig, {"networks": [str(p) for p in paths[:2]], "out": str(root / "ens"),
                                                  "averages": {"a": [0], "both": [0, 1]}, "bn_images": 1000,
                                                  "device": "cpu", "no_progress": True}))
    with open(root / "ens" / "ensembles.json") as f:
        record = json.load(f)
    assert record["vae"] is True and any("no rate" in n for n in record["notes"])
    data = load_data(**DATA_ARGS, progress=False)
    model = copy.deepcopy(models[0])
    recompute_bn(model, dict(model.named_parameters()), BatchLoader(data.train, EVAL_BATCH_SIZE, "cpu"))
    alone = metrics.evaluate(model, BatchLoader(data.test, EVAL_BATCH_SIZE, "cpu"), make_loss("mse"))
    assert result["averages"]["a"]["mse"] == pytest.approx(alone["mse"], rel=1e-5)
    assert alone["distortion"] == pytest.approx(alone["mse"], rel=1e-6) and alone["rate"] > 0
    assert np.isfinite(result["averages"]["both"]["mse"]) and set(result["averages"]["both"]) >= {"mse", "psnr"}


def test_vae_curve_and_its_segment_both_have_terms(vaes):
    root, paths, models = vaes
    torch.manual_seed(0)
    curve = Curve(build_model(_arch(CONV_VAE)), "bezier", 3)
    curve.set_endpoints(models[0].state_dict(), models[1].state_dict())
    curve.init_linear()
    with torch.no_grad():
        curve.bends[1].add_(0.05 * torch.randn_like(curve.bends[1]))
    args = {**DATA_ARGS, "loss": "mse", "kl_weight": 0.5, "init_start": str(paths[0]), "init_end": str(paths[1]),
            "curve": "Bezier", "num_bends": 3, "fix_start": True, "fix_end": True, "seed": 1}
    ckpt = root / "curve" / "checkpoint.pt"
    save_checkpoint(ckpt, {"kind": "curve", "curve": curve.curve_state(), "model_config": _arch(CONV_VAE),
                           "optimizer": {}, "epoch": 1, "args": args, "metrics": []})
    _, record, arrays = _eval({"ckpt": str(ckpt)})
    assert record.vae and record.get("kl_weight") == 0.5
    for prefix in ("", "segment_"):
        np.testing.assert_allclose(arrays[prefix + "te_loss"],
                                   arrays[prefix + "te_distortion"] + 0.5 * arrays[prefix + "te_rate"] / D, rtol=1e-6)
    for name in ("curve", "segment"):
        assert {"te_rate_barrier", "tr_distortion_barrier", "te_rate_int"} <= set(record.path(name))
    # the curve and its segment share their ends: the same networks, the same numbers there
    for t in (0, -1):
        assert arrays["te_rate"][t] == pytest.approx(arrays["segment_te_rate"][t], rel=1e-5)
