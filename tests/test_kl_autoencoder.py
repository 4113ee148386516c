"""aecurves.models:KLAutoencoder: diffusers' AutoencoderKL as an aecurves VAE (tiny configs, 16 px)."""

import json
import subprocess
import sys

import pytest
import torch

from aecurves.checkpoint import load_checkpoint
from aecurves.config import KL_AUTOENCODER
from aecurves.errors import UserError
from aecurves.models import arch_of, build_model

from conftest import run_cli

pytest.importorskip("diffusers")

TINY_KWARGS = {"block_out_channels": [8, 16], "norm_num_groups": 4}  # 2 blocks: a 16 px image's latent is 8x8


def tiny(latent_dim: int = 64, **kwargs) -> torch.nn.Module:
    return build_model({"model": KL_AUTOENCODER, "channels": 3, "image_size": 16, "latent_dim": latent_dim,
                        "model_kwargs": {**TINY_KWARGS, **kwargs}})


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def moments(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) of the latent, read from the encoder and quant_conv directly, on the [-1, 1] scale."""
    mu, logvar = model.vae.quant_conv(model.vae.encoder(2 * x - 1)).chunk(2, dim=1)
    return mu, logvar


@torch.no_grad()
def test_eval_mode_is_deterministic_with_a_kl_per_image():
    torch.manual_seed(0)
    model = tiny().eval()
    x = images()
    recon, kl = model(x)
    again, kl_again = model(x)
    assert recon.shape == x.shape and kl.shape == (3,)
    assert torch.equal(recon, again) and torch.equal(kl, kl_again)
    assert (kl >= 0).all() and (kl > 0).any()
    # eval mode decodes the posterior's mean, mapped back from [-1, 1] to [0, 1]
    mu, _ = moments(model, x)
    torch.testing.assert_close(recon, (model.vae.decode(mu).sample + 1) / 2)


@torch.no_grad()
def test_training_mode_samples_from_torch_global_rng():
    torch.manual_seed(0)
    model = tiny().train()
    x = images()
    torch.manual_seed(5)
    first, kl_first = model(x)
    second, _ = model(x)
    torch.manual_seed(5)
    repeat, kl_repeat = model(x)
    assert not torch.allclose(first, second)  # a fresh sample each call
    assert torch.equal(first, repeat) and torch.equal(kl_first, kl_repeat)  # the seed fixes it
    model.eval()
    mean_recon, kl_eval = model(x)
    assert not torch.allclose(first, mean_recon)  # training decodes a sample, not the mean
    torch.testing.assert_close(kl_first, kl_eval)  # the KL depends on the posterior only, not on the draw


@torch.no_grad()
def test_kl_is_the_gaussian_kl_of_the_encoder_moments():
    torch.manual_seed(1)
    model = tiny(latent_dim=128).eval()
    x = images(4, seed=1)
    mu, logvar = moments(model, x)
    assert mu.shape == (4, 2, 8, 8)
    by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(model(x)[1], by_hand)


@pytest.mark.parametrize(("blocks", "latent_dim", "latent"), [
    ([8, 16], 64, (1, 8, 8)), ([8, 16], 192, (3, 8, 8)), ([4, 4, 8, 8], 8, (2, 2, 2)), ([8], 256, (1, 16, 16))])
def test_latent_dim_is_honoured_exactly(blocks, latent_dim, latent):
    model = tiny(latent_dim, block_out_channels=blocks)
    assert model.latent_shape == latent and model.vae.config.latent_channels == latent[0]
    with torch.no_grad():
        mu, _ = moments(model, images(2))
    assert mu[0].numel() == latent_dim


def test_default_config_at_64px_is_the_seed_bottleneck():
    from aecurves.kl_autoencoder import KLAutoencoder

    model = KLAutoencoder(channels=3, image_size=64, latent_dim=128)
    assert model.latent_shape == (2, 8, 8)
    config = model.vae.config
    assert tuple(config.block_out_channels) == (32, 64, 128, 128) and config.layers_per_block == 1
    assert config.norm_num_groups == 8 and config.act_fn == "silu" and config.mid_block_add_attention
    assert config.down_block_types == ("DownEncoderBlock2D",) * 4


def test_a_latent_dim_that_does_not_fit_names_the_ones_that_do():
    with pytest.raises(UserError) as err:
        tiny(latent_dim=8)
    message = str(err.value)
    assert "latent_dim 8 does not fit" in message and "multiple of 64" in message
    # the numbers of blocks that would hold 8 numbers at 16 px: [2, 2, 2] and [8, 1, 1]
    assert "4 blocks: latent [2, 2, 2]" in message and "5 blocks: latent [8, 1, 1]" in message
    with pytest.raises(UserError, match="not divisible by 2\\*\\*2 = 4"):
        build_model({"model": KL_AUTOENCODER, "channels": 3, "image_size": 18, "latent_dim": 9,
                     "model_kwargs": {**TINY_KWARGS, "block_out_channels": [4, 4, 4]}})


def test_config_errors_are_clear():
    with pytest.raises(UserError, match="norm_num_groups 4 must divide every block's channels, but not 6"):
        tiny(block_out_channels=[8, 6])
    with pytest.raises(UserError, match="block_out_channels must be a non-empty list of positive ints"):
        tiny(block_out_channels=[])
    with pytest.raises(UserError, match="block_out_channels must be"):
        tiny(block_out_channels=8)
    with pytest.raises(UserError, match="layers_per_block must be a positive int"):
        tiny(layers_per_block=0)
    with pytest.raises(UserError, match="mid_block_add_attention true or false, got 'silu' and 'false'"):
        tiny(mid_block_add_attention="false")  # a string would be truthy
    assert not any(".attentions." in name for name in tiny(mid_block_add_attention=False).state_dict())
    assert any(".attentions." in name for name in tiny().state_dict())


def test_missing_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(UserError, match='pip install "aecurves\\[diffusers\\]"'):
        tiny()


def test_aecurves_imports_without_importing_diffusers():
    code = ("import sys, aecurves, aecurves.models, aecurves.cli, aecurves.kl_autoencoder; "
            "print('diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_train_through_the_cli_and_rebuild_from_the_checkpoint(tmp_path):
    kwargs = {"block_out_channels": [4, 4, 8, 8], "norm_num_groups": 4}  # latent [2, 2, 2] = --latent-dim 8
    assert run_cli("train", "--model", KL_AUTOENCODER, "--model-kwargs", json.dumps(kwargs), "--dataset", "synthetic",
                   "--image-size", 16, "--latent-dim", 8, "--epochs", 1, "--limit", 32, "--batch-size", 16,
                   "--vgg-weights", "random", "--device", "cpu", "--precision", "fp32", "--no-progress",
                   "--out", tmp_path) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt", "endpoint")
    assert state["args"]["model"] == KL_AUTOENCODER and state["args"]["model_kwargs"] == kwargs
    assert state["args"]["width"] is None  # --width belongs to the two convolutional models
    row = state["metrics"][-1]
    assert row["test_loss"] > 0 and row["test_mse"] > 0

    model = build_model(arch_of(state["args"]))
    model.load_state_dict(state["model"])
    held_out = torch.load(tmp_path / "reconstructions.pt")
    from aecurves.commands.train import as_pixels, reconstruct

    # the rebuilt network reconstructs the held-out images as the trained one did when it wrote them
    recon = reconstruct(model, held_out["images"].float().div(255))
    assert torch.equal(as_pixels(recon), held_out["reconstructions"])
