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
