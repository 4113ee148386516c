"""VAEs through training (issue 28): train, train-curve and fge minimise distortion + β·KL/D with β = --kl-weight,
record β in their checkpoints and read it back, and report the objective's two terms."""

import json
import shutil

import pytest
import torch

from aecurves import training
from aecurves.checkpoint import load_checkpoint, save_checkpoint
from aecurves.config import CONV_VAE
from aecurves.data import BatchLoader, load_run_data
from aecurves.losses import make_loss
from aecurves.models import ConvAutoencoder, ConvVAE, build_model

from conftest import run_cli

SIZE = 16
D = 3 * SIZE * SIZE  # the values per image the KL is divided by
SMALL = ["--dataset", "synthetic", "--image-size", SIZE, "--limit", 96, "--width", 4, "--latent-dim", 8,
         "--batch-size", 16, "--lr", "3e-3", "--precision", "fp32", "--no-progress"]
VAE = [*SMALL, "--model", CONV_VAE]
BETA = 2.0


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def args_of(path):
    return load_checkpoint(path, "endpoint")["args"]


def rewrite_args(src, dst, **changes):
    """A copy of the endpoint `src` at `dst` with its args changed (a value None: the key removed, as in a
    checkpoint written before that setting existed)."""
    state = load_checkpoint(src, "endpoint")
    for k, v in changes.items():
        state["args"].pop(k, None) if v is None else state["args"].__setitem__(k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, state)
    return dst


@pytest.fixture(scope="module")
def vae_endpoints(tmp_path_factory):
    """Two ConvVAE endpoints trained with β = 2 from seeds 1 and 2."""
    root = tmp_path_factory.mktemp("vae-endpoints")
    for seed in (1, 2):
        assert run_cli("train", *VAE, "--epochs", 2, "--kl-weight", BETA, "--seed", seed, "--num-images", 0,
                       "--out", root / f"seed{seed}") == 0
    return root / "seed1/checkpoint.pt", root / "seed2/checkpoint.pt"


def assert_adds_up(row, prefix, beta):
    """The row's objective is its distortion + β·rate/D (to float32 rounding of the sums)."""
    assert row[f"{prefix}rate"] > 0
    assert row[f"{prefix}loss"] == pytest.approx(row[f"{prefix}distortion"] + beta * row[f"{prefix}rate"] / D,
                                                 rel=1e-6, abs=0)


# --- the training loop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mse", "vgg"])
def test_objective_and_terms_is_the_objective_bit_for_bit(name):
    """train, train-curve and fge take a VAE's terms from the computation of its objective: that objective must be
    losses.Objective's exactly, and the terms its distortion and mean KL."""
    loss_fn = make_loss(name, "random", kl_weight=0.7)
    gen = torch.Generator().manual_seed(0)
    recon = torch.rand(3, 3, SIZE, SIZE, generator=gen, requires_grad=True)
    x, kl = torch.rand(3, 3, SIZE, SIZE, generator=gen), torch.rand(3, generator=gen) * 50
    objective, terms = training.objective_and_terms(loss_fn, (recon, kl), x)
    assert torch.equal(objective, loss_fn((recon, kl), x)) and objective.requires_grad
    assert torch.equal(terms[0], loss_fn.distortion(recon, x).detach()) and torch.equal(terms[1], kl.mean())
    by_image = loss_fn.terms((recon, kl), x)
    assert terms[0].item() == pytest.approx(by_image["distortion"].mean().item(), rel=1e-6)
    # an autoencoder: its loss, no terms
    objective, terms = training.objective_and_terms(loss_fn, recon, x)
    assert torch.equal(objective, loss_fn.distortion(recon, x)) and terms is None


def images(n=48, seed=0):
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_an_autoencoders_epoch_is_the_plain_loop_bit_for_bit_with_no_terms():
    """The loop before VAEs existed, written out: the same mean loss and weights, bit for bit, and no terms."""
    loader = BatchLoader(images(), 16, "cpu", shuffle=True, seed=3)
    torch.manual_seed(5)
    model = ConvAutoencoder(3, SIZE, 8, 4)
    reference = ConvAutoencoder(3, SIZE, 8, 4)
    reference.load_state_dict(model.state_dict())
    loss_fn = make_loss("mse", kl_weight=3.0)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, reference)]
    epoch = training.train_one_epoch(model, loss_fn, opts[0], loader, "cpu", "fp32", 1, progress=False)

    reference.train()
    loader.set_epoch(1)
    total, seen = torch.zeros(()), 0
    for x in loader:
        loss = loss_fn.distortion(reference(x), x)
        opts[1].zero_grad(set_to_none=True)
        loss.backward()
        opts[1].step()
        total += loss.detach() * x.shape[0]
        seen += x.shape[0]
    stats = torch.stack([total, torch.tensor(float(seen))])
    assert epoch.loss == (stats[0] / stats[1]).item() and epoch.seen == seen == 48 and epoch.terms == {}
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_vae_samples_its_latent_in_training_and_reports_its_terms():
    """From the same weights and batches, two epochs under different global seeds differ for a VAE (its z is
    sampled) and not for an autoencoder (nothing random but the seeded shuffling)."""
    loader = BatchLoader(images(), 16, "cpu", shuffle=True, seed=3)
    for cls, random in ((ConvVAE, True), (ConvAutoencoder, False)):
        torch.manual_seed(0)
        start = cls(3, SIZE, 8, 4).state_dict()
        results = []
        for seed in (1, 2):
            model = cls(3, SIZE, 8, 4)
            model.load_state_dict(start)
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            results.append(training.train_one_epoch(model, make_loss("mse", kl_weight=BETA), opt, loader, "cpu",
                                                    "fp32", 1, progress=False))
        assert (results[0].loss != results[1].loss) is random, cls.__name__
        if random:
            for r in results:
                assert set(r.terms) == {"distortion", "rate"}
                assert r.loss == pytest.approx(r.terms["distortion"] + BETA * r.terms["rate"] / D, rel=1e-6)
        else:
            assert results[0].terms == results[1].terms == {}


# --- train --------------------------------------------------------------------------------------------------------


def test_a_vae_train_run_records_its_objective_and_terms(vae_endpoints, tmp_path, capsys):
    out = tmp_path / "vae"
    assert run_cli("train", *VAE, "--epochs", 2, "--kl-weight", BETA, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"β = --kl-weight {BETA:g} (a VAE)" in printed
    header = next(line for line in printed.splitlines() if "train_loss" in line).split()
    assert header[header.index("train_loss") + 1: header.index("train_loss") + 3] == ["distortion", "rate"]
    history = rows(out)
    for row in history:
        assert_adds_up(row, "train_", BETA)
        assert_adds_up(row, "test_", BETA)
        assert f"{row['train_rate']:9.2f}".strip() in printed
    state = load_checkpoint(out / "checkpoint.pt", "endpoint")
    assert state["args"]["kl_weight"] == BETA and state["metrics"] == history

    # the held-out objective by hand: eval mode (z = μ), MSE + β·KL/D over the test images
    model = build_model({**state["args"], "channels": 3})
    model.load_state_dict(state["model"])
    model.eval()
    x = load_run_data(state["args"]).test.float().div(255)
    with torch.no_grad():
        recon, kl = model(x)
    mse = (recon - x).pow(2).mean().item()
    assert history[-1]["test_distortion"] == pytest.approx(mse, rel=1e-5)
    assert history[-1]["test_rate"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert history[-1]["test_loss"] == pytest.approx(mse + BETA * kl.mean().item() / D, rel=1e-5)


def test_an_autoencoder_run_records_and_prints_no_terms(tmp_path, capsys):
    assert run_cli("train", *SMALL, "--epochs", 1, "--kl-weight", 5, "--out", tmp_path) == 0
    printed = capsys.readouterr().out
    assert "distortion" not in printed and "β" not in printed
    (row,) = rows(tmp_path)
    assert not {"train_distortion", "train_rate", "test_distortion", "test_rate"} & set(row)
    assert row["test_loss"] == pytest.approx(row["test_mse"], rel=1e-6)  # the MSE loss, no KL whatever β


def test_beta_shapes_the_training_of_a_vae(tmp_path):
    """The same seed with β = 0 and β = 1: different weights, and the KL penalty keeps the rate far lower."""
    for beta in (0, 1):
        assert run_cli("train", *VAE, "--epochs", 2, "--kl-weight", beta, "--num-images", 0,
                       "--out", tmp_path / str(beta)) == 0
    free, penalised = (load_checkpoint(tmp_path / f"{b}/checkpoint.pt", "endpoint") for b in (0, 1))
    assert not torch.equal(free["model"]["encoder.0.0.weight"], penalised["model"]["encoder.0.0.weight"])
    rate_free, rate_penalised = free["metrics"][-1]["train_rate"], penalised["metrics"][-1]["train_rate"]
    assert rate_penalised < 0.5 * rate_free, (rate_penalised, rate_free)
    assert free["metrics"][-1]["train_loss"] == free["metrics"][-1]["train_distortion"]  # β = 0: no KL at all


def test_resume_and_init_keep_the_kl_weight_and_refuse_another_as_they_do_a_loss(vae_endpoints, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(vae_endpoints[0].parent, run)
    assert run_cli("train", *VAE, "--epochs", 3, "--resume", "--out", run) == 0
    assert args_of(run / "checkpoint.pt")["kl_weight"] == BETA
    assert_adds_up(rows(run)[-1], "train_", BETA)
    before = (run / "checkpoint.pt").read_bytes()
    for flag, message in (("--kl-weight", "kl_weight=2.0 vs kl_weight=3.0"), ("--loss", "loss='mse' vs loss='vgg'")):
        value = 3 if flag == "--kl-weight" else "vgg"
        assert run_cli("train", *VAE, "--epochs", 4, "--resume", flag, value, "--out", run) == 2
        assert message in capsys.readouterr().err
        assert run_cli("train", "--init", vae_endpoints[0], flag, value, "--epochs", 1, "--no-progress",
                       "--out", tmp_path / "init-other") == 2
        assert message in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before and not (tmp_path / "init-other").exists()
    assert run_cli("train", "--init", vae_endpoints[0], "--epochs", 1, "--no-progress", "--num-images", 0,
                   "--out", tmp_path / "init") == 0
    assert args_of(tmp_path / "init/checkpoint.pt")["kl_weight"] == BETA


def test_a_checkpoint_from_before_kl_weight_reads_as_beta_1(vae_endpoints, tmp_path, capsys):
    """Not as this run's --kl-weight, nor as None: as 1, what every run was trained with before the flag."""
    run = tmp_path / "run"
    shutil.copytree(vae_endpoints[0].parent, run)
    rewrite_args(vae_endpoints[0], run / "checkpoint.pt", kl_weight=None)
    assert run_cli("train", *VAE, "--epochs", 3, "--resume", "--kl-weight", 2, "--out", run) == 2
    assert "kl_weight=1.0 vs kl_weight=2" in capsys.readouterr().err
    assert run_cli("train", *VAE, "--epochs", 3, "--resume", "--out", run) == 0
    assert args_of(run / "checkpoint.pt")["kl_weight"] == 1.0
    assert_adds_up(rows(run)[-1], "train_", 1.0)

    old = [rewrite_args(p, tmp_path / f"old{i}.pt", kl_weight=None) for i, p in enumerate(vae_endpoints)]
    assert run_cli("train-curve", "--init_start", old[0], "--init_end", old[1], "--epochs", 1, "--batch-size", 16,
                   "--bn-images", 16, "--no-progress", "--out", tmp_path / "curve") == 0
    assert load_checkpoint(tmp_path / "curve/checkpoint.pt", "curve")["args"]["kl_weight"] == 1.0
    assert_adds_up(rows(tmp_path / "curve")[0], "train_", 1.0)
    assert run_cli("fge", "--ckpt", old[0], "--epochs", 2, "--cycle", 2, "--bn-images", 16, "--num-images", 0,
                   "--no-progress", "--out", tmp_path / "fge") == 0
    assert json.loads((tmp_path / "fge/fge.json").read_text())["config"]["kl_weight"] == 1.0


# --- train-curve and fge -----------------------------------------------------------------------------------------

CURVE = ["--epochs", 1, "--batch-size", 16, "--bn-images", 16, "--no-progress"]


def test_a_curve_between_vaes_minimises_their_objective(vae_endpoints, tmp_path, capsys):
    a, b = vae_endpoints
    out = tmp_path / "curve"
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"β = --kl-weight {BETA:g}" in printed and "distortion" in printed
    state = load_checkpoint(out / "checkpoint.pt", "curve")
    assert state["args"]["kl_weight"] == BETA and state["args"]["loss"] == "mse"
    (row,) = rows(out)
    assert_adds_up(row, "train_", BETA)  # the KL at θ(t), sampled, is in the curve's training loss
    assert_adds_up({k[len("mid_"):]: v for k, v in row.items() if k.startswith("mid_")}, "test_", BETA)
    assert row["mid_test_distortion"] == pytest.approx(row["mid_test_mse"], rel=1e-6)
    before = (out / "checkpoint.pt").read_bytes()  # --resume keeps β, as it keeps the loss
    assert run_cli("train-curve", "--resume", "--kl-weight", 3, *CURVE, "--epochs", 2, "--out", out) == 2
    assert "kl_weight=2.0 vs kl_weight=3.0" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before

    # an explicit --kl-weight wins, as --loss does
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--kl-weight", 0,
                   "--out", tmp_path / "beta0") == 0
    (row,) = rows(tmp_path / "beta0")
    assert row["train_loss"] == row["train_distortion"] and row["train_rate"] > 0
    assert load_checkpoint(tmp_path / "beta0/checkpoint.pt", "curve")["args"]["kl_weight"] == 0


def test_a_curve_between_endpoints_of_different_kl_weights_needs_one_given(vae_endpoints, tmp_path, capsys):
    a = vae_endpoints[0]
    b = rewrite_args(vae_endpoints[1], tmp_path / "half.pt", kl_weight=0.5)
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--out", tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "different KL weights (--kl-weight 2 and 0.5)" in err and "--kl-weight 0.5 to say which" in err
    assert not (tmp_path / "refused").exists()
    assert run_cli("train-curve", "--init_start", a, "--init_end", b, *CURVE, "--kl-weight", 0.5,
                   "--out", tmp_path / "chosen") == 0
    assert load_checkpoint(tmp_path / "chosen/checkpoint.pt", "curve")["args"]["kl_weight"] == 0.5
    assert_adds_up(rows(tmp_path / "chosen")[0], "train_", 0.5)


def test_fge_on_a_vae_trains_its_objective_and_records_the_terms(vae_endpoints, tmp_path, capsys):
    flags = ["--ckpt", vae_endpoints[0], "--epochs", 2, "--cycle", 2, "--bn-images", 16, "--num-images", 0,
             "--no-progress"]
    assert run_cli("fge", *flags, "--out", tmp_path / "fge") == 0
    assert f"β = --kl-weight {BETA:g}" in capsys.readouterr().out
    record = json.loads((tmp_path / "fge/fge.json").read_text())
    assert record["config"]["kl_weight"] == record["kl_weight"] == record["endpoint"]["kl_weight"] == BETA
    for row in record["epochs"]:
        assert_adds_up(row, "train_", BETA)
        assert_adds_up(row, "test_", BETA)
    assert record["epochs"] == rows(tmp_path / "fge")
    # --kl-weight overrides the endpoint's: with 0 the objective is the distortion itself
    assert run_cli("fge", *flags, "--kl-weight", 0, "--out", tmp_path / "beta0") == 0
    for row in rows(tmp_path / "beta0"):
        assert row["train_loss"] == row["train_distortion"] and row["train_rate"] > 0
    assert json.loads((tmp_path / "beta0/fge.json").read_text())["config"]["kl_weight"] == 0
