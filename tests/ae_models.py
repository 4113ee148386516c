"""Autoencoders that are not aecurves' own, for the --model tests: each factory is called as
FACTORY(channels=C, image_size=S, latent_dim=D, **MODEL_KWARGS) and returns images of the input's shape."""

import torch
from torch import nn


def mlp_autoencoder(channels: int, image_size: int, latent_dim: int, hidden: int = 64) -> nn.Module:
    """Fully connected: no convolution, no BatchNorm."""
    pixels = channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim),
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Sigmoid(),
        nn.Unflatten(1, (channels, image_size, image_size)),
    )


class UpsampleAutoencoder(nn.Module):
    """Strided convolutions with BatchNorm down; Upsample + Conv2d with LeakyReLU and Dropout up."""

    def __init__(self, channels: int, image_size: int, latent_dim: int, width: int = 8, dropout: float = 0.1):
        super().__init__()
        side = image_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * side * side, latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * side * side), nn.Unflatten(1, (2 * width, side, side)),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, 1, 1), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


def upsample_autoencoder(channels: int, image_size: int, latent_dim: int, **kwargs) -> nn.Module:
    return UpsampleAutoencoder(channels, image_size, latent_dim, **kwargs)


def not_an_autoencoder(channels: int, image_size: int, latent_dim: int) -> nn.Module:
    """Maps images to codes: refused, since a curve's loss compares outputs with inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, latent_dim))


class ViewingAutoencoder(nn.Module):
    """A convolution, then `.view` of its features: fails on channels_last input (a view of permuted memory), so
    training falls back to contiguous batches."""

    def __init__(self, channels: int, image_size: int, latent_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, 1, 1)
        self.code = nn.Linear(4 * image_size * image_size, latent_dim)
        self.out = nn.Linear(latent_dim, channels * image_size * image_size)

    def forward(self, x):
        h = self.conv(x).view(x.shape[0], -1)
        return torch.sigmoid(self.out(self.code(h))).view(x.shape)


def viewing_autoencoder(channels: int, image_size: int, latent_dim: int) -> nn.Module:
    return ViewingAutoencoder(channels, image_size, latent_dim)
