"""The convolutional autoencoder: a plain nn.Module, so curves can run it through functional_call."""

import math

import torch
from torch import nn

# Settings that fix the architecture; a checkpoint records them and loading compares them.
ARCH_KEYS = ("channels", "image_size", "latent_dim", "width")


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvAutoencoder(nn.Module):
    """Strided convolutions down to 4x4, a linear bottleneck of `latent_dim`, transposed convolutions back.

    With image_size 64 and width 32 the encoder's channels are 32-64-128-256 (each stage halves the
    side), the decoder mirrors them, and the output passes through a sigmoid so it lies in [0, 1].
    """

    def __init__(self, channels: int = 3, image_size: int = 64, latent_dim: int = 128, width: int = 32):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.channels, self.image_size, self.latent_dim, self.width = channels, image_size, latent_dim, width
        stages = int(math.log2(image_size // 4))
        widths = [min(width * 2**i, width * 8) for i in range(stages)]

        enc, cin = [], channels
        for w in widths:
            enc.append(_down(cin, w))
            cin = w
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(cin * 16, latent_dim))

        self.decoder_input = nn.Linear(latent_dim, cin * 16)
        dec = [_up(widths[i], widths[i - 1]) for i in range(stages - 1, 0, -1)]
        dec.append(nn.ConvTranspose2d(widths[0], channels, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)
        self._bottom = (cin, 4, 4)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in ARCH_KEYS}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_input(z).view(z.shape[0], *self._bottom)
        return torch.sigmoid(self.decoder(torch.relu(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def build_model(config: dict) -> ConvAutoencoder:
    return ConvAutoencoder(**{k: config[k] for k in ARCH_KEYS})


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
