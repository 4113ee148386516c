"""diffusers' AutoencoderKL (the VAE of latent diffusion) as an aecurves VAE: `--model aecurves.models:KLAutoencoder`.

Built from its config alone, with fresh random weights: nothing is downloaded. diffusers is imported only when the
network is built (the `diffusers` extra), so aecurves itself imports without it.
"""

import torch
from torch import nn

from aecurves.errors import UserError

DEFAULT_BLOCKS = (32, 64, 128, 128)


def _autoencoder_kl_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError('--model aecurves.models:KLAutoencoder needs diffusers, which is not installed here; '
                        'install it with: pip install "aecurves[diffusers]" (or pip install "diffusers>=0.30").'
                        ) from None
    return AutoencoderKL


def latent_channels(image_size: int, latent_dim: int, block_out_channels) -> int:
    """The latent's channels that make [channels, s, s] hold exactly latent_dim numbers, s = image_size/2**(k-1)
    for k blocks (each block but the last halves the side). A ValueError says what fits when nothing does."""
    blocks = len(block_out_channels)
    side, rest = divmod(image_size, 2 ** (blocks - 1))
    if rest or side == 0:
        raise ValueError(f"image_size {image_size} is not divisible by 2**{blocks - 1} = {2 ** (blocks - 1)}: each of "
                         f"the {blocks} blocks of block_out_channels but the last halves the image's side; use "
                         f"fewer blocks or an image_size that is a multiple of {2 ** (blocks - 1)}")
    if latent_dim % (side * side):
        raise ValueError(f"latent_dim {latent_dim} does not fit: with image_size {image_size} and {blocks} blocks "
                         f"in block_out_channels the latent is [channels, {side}, {side}], so latent_dim must be a "
                         f"multiple of {side * side} (e.g. {', '.join(str(side * side * c) for c in (1, 2, 4))}); "
                         "or change the number of blocks in block_out_channels "
                         f"({_fitting_blocks(image_size, latent_dim)})")
    return latent_dim // (side * side)


def _fitting_blocks(image_size: int, latent_dim: int) -> str:
    """Which numbers of blocks would hold latent_dim exactly, in words."""
    fits, blocks = [], 1
    while image_size % 2 ** (blocks - 1) == 0:
        side = image_size // 2 ** (blocks - 1)
        if latent_dim % (side * side) == 0:
            fits.append(f"{blocks} blocks: latent [{latent_dim // (side * side)}, {side}, {side}]")
        blocks += 1
    return "; ".join(fits) if fits else f"no number of blocks holds latent_dim {latent_dim} at image_size {image_size}"


def _check_config(block_out_channels, layers_per_block, norm_num_groups, act_fn, mid_block_add_attention) -> tuple:
    """block_out_channels as a tuple of ints, the other settings checked (JSON may bring anything)."""
    if not isinstance(act_fn, str) or not isinstance(mid_block_add_attention, bool):
        raise ValueError(f"act_fn must be a string (e.g. \"silu\") and mid_block_add_attention true or false, got "
                         f"{act_fn!r} and {mid_block_add_attention!r}")
    if (not isinstance(block_out_channels, (list, tuple)) or not block_out_channels
            or not all(_is_count(c) for c in block_out_channels)):
        raise ValueError(f"block_out_channels must be a non-empty list of positive ints (one per block, e.g. "
                         f"{list(DEFAULT_BLOCKS)}), got {block_out_channels!r}")
    for name, value in (("layers_per_block", layers_per_block), ("norm_num_groups", norm_num_groups)):
        if not _is_count(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    uneven = [c for c in block_out_channels if c % norm_num_groups]
    if uneven:
        raise ValueError(f"norm_num_groups {norm_num_groups} must divide every block's channels, but not "
                         f"{', '.join(map(str, uneven))} of block_out_channels {list(block_out_channels)}: GroupNorm "
                         "splits each block's channels into that many groups; choose a norm_num_groups that "
                         "divides them all or channels that are multiples of it")
    return tuple(block_out_channels)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class KLAutoencoder(nn.Module):
    """diffusers.AutoencoderKL, fresh weights, as a VAE that maps images in [0, 1] to (reconstruction, kl).

    Defaults: block_out_channels (32, 64, 128, 128), layers_per_block 1, norm_num_groups 8, act_fn "silu",
    mid_block_add_attention True; one DownEncoderBlock2D / UpDecoderBlock2D per entry of block_out_channels. The
    latent is [latent_dim / s², s, s], s = image_size / 2**(len(block_out_channels) - 1) (64 px and the defaults:
    s = 8, 2 channels, latent_dim 128). Images go in as 2x − 1 (AutoencoderKL's [-1, 1]) and come back as
    (decoded + 1) / 2. Training mode decodes a sample of the posterior (torch's global RNG, so seeded runs repeat),
    eval mode its mode (the mean); kl is each image's KL divergence from N(0, I) in nats, summed over the latent.
    """

    def __init__(self, channels: int = 3, image_size: int = 64, latent_dim: int = 128, *,
                 block_out_channels=DEFAULT_BLOCKS, layers_per_block: int = 1, norm_num_groups: int = 8,
                 act_fn: str = "silu", mid_block_add_attention: bool = True):
        super().__init__()
        blocks = _check_config(block_out_channels, layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        side = image_size // 2 ** (len(blocks) - 1)
        self.latent_shape = (latent_channels(image_size, latent_dim, blocks), side, side)
        self.vae = _autoencoder_kl_class()(
            in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(blocks),
            up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=self.latent_shape[0],
            norm_num_groups=norm_num_groups, sample_size=image_size,
            mid_block_add_attention=mid_block_add_attention)

    def posterior(self, x: torch.Tensor):
        """The latent's DiagonalGaussianDistribution for images x in [0, 1]."""
        return self.vae.encode(2 * x - 1).latent_dist

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.posterior(x)
        z = dist.sample() if self.training else dist.mode()
        return (self.vae.decode(z).sample + 1) / 2, dist.kl()
