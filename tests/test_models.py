import pytest
import torch

from aecurves.models import ARCH_KEYS, ConvAutoencoder, build_model, num_parameters


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_range(size, channels):
    model = ConvAutoencoder(channels=channels, image_size=size, latent_dim=128, width=8)
    x = torch.rand(2, channels, size, size)
    z = model.encode(x)
    y = model(x)
    assert z.shape == (2, 128)
    assert y.shape == x.shape
    assert 0.0 <= y.min().item() and y.max().item() <= 1.0


def test_width_scales_parameters_and_config_rebuilds():
    small, big = ConvAutoencoder(width=8), ConvAutoencoder(width=16)
    assert num_parameters(big) > 2 * num_parameters(small)
    rebuilt = build_model(small.config())
    assert set(small.config()) == set(ARCH_KEYS)
    assert rebuilt.state_dict().keys() == small.state_dict().keys()
    assert all(rebuilt.state_dict()[k].shape == v.shape for k, v in small.state_dict().items())


def test_has_batchnorm_and_transposed_convs():
    kinds = {type(m).__name__ for m in ConvAutoencoder().modules()}
    assert {"BatchNorm2d", "ConvTranspose2d", "Conv2d", "Linear"} <= kinds


def test_rejects_sizes_that_do_not_halve_to_4():
    with pytest.raises(ValueError):
        ConvAutoencoder(image_size=48)


FACTORIES = '''
import sys
import torch
from torch import nn


def raises_runtime(**kw):
    raise RuntimeError("CUDA out of memory (pretend)")


def raises_key(**kw):
    return {}["hidden"]


def raises_memory(**kw):
    raise MemoryError


def exits(**kw):
    sys.exit(0)


class Halt(BaseException):
    pass


def raises_base(**kw):
    raise Halt("halt here")


def raises_generator_exit(**kw):
    raise GeneratorExit


def interrupted(**kw):
    raise KeyboardInterrupt


def no_parameters(**kw):
    return nn.Sequential(nn.Identity())


def float64(**kw):
    torch.set_default_dtype(torch.float64)
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (kw["channels"], kw["image_size"], kw["image_size"])),
                         nn.Conv2d(kw["channels"], kw["channels"], 1))
'''


@pytest.mark.parametrize("name, words", [
    ("raises_runtime", "could not be built .*RuntimeError: CUDA out of memory"),
    ("raises_key", "could not be built .*KeyError: 'hidden'"),
    ("raises_memory", "could not be built .*\\(MemoryError\\)"),
    ("exits", "could not be built .*SystemExit: 0"),
    ("raises_base", "could not be built .*Halt: halt here"),  # a BaseException subclass (issue 27, N17)
    ("raises_generator_exit", "could not be built .*\\(GeneratorExit\\)"),
    ("no_parameters", "a network without parameters"),
    ("float64", "changed torch's default dtype"),
])
def test_a_factory_that_fails_is_a_message_naming_it(name, words, tmp_path, capsys):
    from aecurves.errors import UserError

    from conftest import run_cli

    (tmp_path / "factories.py").write_text(FACTORIES)
    spec = f"{tmp_path}/factories.py:{name}"
    arch = {"model": spec, "model_kwargs": {}, "channels": 3, "image_size": 8, "latent_dim": 4}
    with pytest.raises(UserError, match=f"--model {spec} {words}" if "built" in words else words):
        build_model(arch)
    assert torch.get_default_dtype() == torch.float32  # restored for whatever runs next
    assert run_cli("train", "--model", spec, "--dataset", "synthetic", "--image-size", 8, "--limit", 32,
                   "--epochs", 1, "--no-progress", "--device", "cpu", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert spec in err and "Traceback" not in err
    assert torch.get_default_dtype() == torch.float32 and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_model_kwargs_may_not_restate_a_flag():
    from aecurves.config import BUILTIN_MODEL
    from aecurves.errors import UserError

    arch = {"model": BUILTIN_MODEL, "model_kwargs": {"width": 4}, "channels": 3, "image_size": 16, "latent_dim": 8,
            "width": 8}
    with pytest.raises(UserError, match=r"--model-kwargs sets width=4, which --width sets \(to 8\)"):
        build_model(arch)
    # a custom factory has no --width: its own width argument is its kwargs' business
    custom = {**arch, "model": "ae_models:upsample_autoencoder", "width": None}
    assert build_model(custom).encoder[0].out_channels == 4
    with pytest.raises(UserError, match="image_size=32, which --image-size sets"):
        build_model({**custom, "model_kwargs": {"image_size": 32}})


def test_a_factory_interrupted_by_the_user_stays_an_interrupt(tmp_path, capsys):
    """KeyboardInterrupt keeps its meaning (exit 130), unlike the other BaseExceptions a factory may raise."""
    from conftest import run_cli

    (tmp_path / "factories.py").write_text(FACTORIES)
    spec = f"{tmp_path}/factories.py:interrupted"
    with pytest.raises(KeyboardInterrupt):
        build_model({"model": spec, "model_kwargs": {}, "channels": 3, "image_size": 8, "latent_dim": 4})
    assert run_cli("train", "--model", spec, "--dataset", "synthetic", "--image-size", 8, "--limit", 32,
                   "--epochs", 1, "--no-progress", "--device", "cpu", "--out", tmp_path / "run") == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "run").exists()


# --- VAEs: the (reconstruction, kl) contract ----------------------------------------------------------------------

VAE_ARCH = {"model": "aecurves.models:ConvVAE", "model_kwargs": {}, "channels": 3, "image_size": 16,
            "latent_dim": 8, "width": 4}


def test_conv_vae_samples_in_training_and_decodes_the_mean_in_eval():
    from aecurves.models import ConvVAE, gaussian_kl

    vae = build_model(VAE_ARCH)
    assert isinstance(vae, ConvVAE) and vae.encoder[-1].out_features == 16
    x = torch.rand(3, 3, 16, 16)
    vae.eval()
    recon, kl = vae(x)
    assert recon.shape == x.shape and kl.shape == (3,) and (kl >= 0).all()
    assert torch.equal(vae(x)[0], recon)  # eval mode: deterministic
    mu, logvar = vae.posterior(x)
    assert torch.equal(recon, vae.decode(mu))
    by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(kl, by_hand) and torch.allclose(gaussian_kl(mu, logvar), by_hand)
    vae.train()
    torch.manual_seed(0)
    first = vae(x)[0]
    assert not torch.allclose(first, vae(x)[0])  # a fresh z each call
    torch.manual_seed(0)
    assert torch.equal(first, vae(x)[0])  # from torch's global RNG: seeded runs repeat
    assert vae.config()["model"] == "aecurves.models:ConvVAE"
    assert build_model(vae.config()).state_dict().keys() == vae.state_dict().keys()


VAE_FACTORIES = '''
import torch
from torch import nn


class Wrapped(nn.Module):
    def __init__(self, out, **kw):
        super().__init__()
        self.conv = nn.Conv2d(kw["channels"], kw["channels"], 1)
        self.out = out

    def forward(self, x):
        y = self.conv(x)
        kl = y.flatten(1).mean(1)
        return {"three": (y, kl, kl), "short_kl": (y, kl[:1]), "int_kl": (y, kl.long()), "dict": {"x": y},
                "noisy": (y + torch.randn_like(y), kl), "list": [y, kl]}[self.out]


def three(**kw): return Wrapped("three", **kw)
def short_kl(**kw): return Wrapped("short_kl", **kw)
def int_kl(**kw): return Wrapped("int_kl", **kw)
def dict_out(**kw): return Wrapped("dict", **kw)
def noisy(**kw): return Wrapped("noisy", **kw)
def list_out(**kw): return Wrapped("list", **kw)
'''


@pytest.mark.parametrize("name, words", [
    ("three", r"to a tuple of 3 \(shape \(2, 3, 8, 8\), shape \(2,\), shape \(2,\)\)"),
    ("short_kl", r"to a tuple of 2 \(shape \(2, 3, 8, 8\), shape \(1,\)\)"),
    ("int_kl", "to a tuple of 2"),
    ("dict_out", "to a dict"),
    ("noisy", "two different outputs for the same images in eval mode"),
])
def test_a_network_that_breaks_the_contract_is_refused_before_any_work(name, words, tmp_path):
    from aecurves.errors import UserError

    (tmp_path / "vaes.py").write_text(VAE_FACTORIES)
    arch = {"model": f"{tmp_path}/vaes.py:{name}", "model_kwargs": {}, "channels": 3, "image_size": 8,
            "latent_dim": 4}
    with pytest.raises(UserError, match=words):
        build_model(arch)
    assert build_model({**arch, "model": f"{tmp_path}/vaes.py:list_out"}) is not None  # a list of two is a pair


def test_width_is_a_setting_of_both_convolutional_models_only():
    from aecurves.errors import UserError

    assert build_model({**VAE_ARCH, "width": 8}).encoder[0][0].out_channels == 8
    with pytest.raises(UserError, match="--model-kwargs sets width=4, which --width sets"):
        build_model({**VAE_ARCH, "model_kwargs": {"width": 4}})
