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
