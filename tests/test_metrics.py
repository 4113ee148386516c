"""The evaluation protocol's building blocks: subsets, per-image MSE, the shared evaluate()."""

import pytest
import torch

from aecurves.data import BatchLoader
from aecurves.errors import UserError
from aecurves.losses import MSELoss
from aecurves.metrics import evaluate, fixed_subset, per_image_mse, psnr_from_mse, ssim_per_image, \
    stratified_subset


def test_fixed_subsets_are_nested_sorted_and_seeded():
    images = torch.arange(1000)
    small, large = fixed_subset(images, 100), fixed_subset(images, 300)
    assert set(small.tolist()) <= set(large.tolist()) and torch.equal(small, small.sort().values)
    assert torch.equal(small, fixed_subset(images, 100)) and not torch.equal(small, fixed_subset(images, 100, seed=1))
    assert fixed_subset(images, 1000) is images and fixed_subset(images, None) is images


def test_stratified_subset_takes_one_image_per_stratum_and_follows_the_mean():
    gen = torch.Generator().manual_seed(0)
    scores = torch.empty(10_000).exponential_(generator=gen)  # skewed, like per-image losses
    images = torch.arange(10_000)
    sub = stratified_subset(images, 100, scores)
    assert len(sub) == 100 and torch.equal(sub, sub.sort().values)
    ranks = torch.empty(10_000, dtype=torch.long)
    ranks[torch.argsort(scores, stable=True)] = torch.arange(10_000)
    assert sorted((ranks[sub] // 100).tolist()) == list(range(100))  # exactly one per stratum of 100
    # a per-image quantity that depends on the score (plus noise) is estimated far better than by random subsets
    value = scores + 0.1 * torch.randn(10_000, generator=gen)
    err = lambda idx: abs(value[idx].mean() / value.mean() - 1).item()  # noqa: E731
    strat = [err(stratified_subset(images, 100, scores, seed=s)) for s in range(50)]
    rand = [err(fixed_subset(images, 100, seed=s)) for s in range(50)]
    assert sum(strat) < sum(rand) / 4
    assert stratified_subset(images, 10_000, scores) is images
    with pytest.raises(ValueError):
        stratified_subset(images, 10, scores[:5])


class Zeros(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_evaluate_and_per_image_mse_by_hand():
    values = torch.tensor([0, 51, 102, 153, 204, 255], dtype=torch.uint8)  # 0, 0.2, ..., 1 after /255
    images = values.view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    loader = BatchLoader(images, 4, "cpu")  # a batch of 4 and a batch of 2
    mse = per_image_mse(Zeros(), loader)
    expected = (torch.arange(6.0) / 5) ** 2
    assert torch.allclose(mse, expected, atol=1e-6)
    got = evaluate(Zeros(), loader, MSELoss())
    assert got["mse"] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert got["loss"] == pytest.approx(got["mse"], rel=1e-6)  # MSE loss, batches weighted by their size
    assert got["psnr"] == pytest.approx(psnr_from_mse(expected).mean().item(), rel=1e-5)
    assert evaluate(torch.nn.Identity(), loader, MSELoss())["mse"] == 0.0
    assert "ssim" not in got  # SSIM only when asked for
    with pytest.raises(UserError, match="empty"):
        evaluate(Zeros(), BatchLoader(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), 4, "cpu"), MSELoss())


class Darker(torch.nn.Module):
    """A clearly different image: contrast halved, plus a fixed pattern."""

    def forward(self, x):
        pattern = torch.linspace(0, 0.2, x.shape[-1]).expand_as(x)
        return 0.5 * x + pattern


def _images(n=7, side=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, side // 4, side // 4, generator=gen).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return (smooth * 255).to(torch.uint8)


def test_ssim_of_an_image_with_itself_is_one():
    loader = BatchLoader(_images(), 4, "cpu")
    got = evaluate(torch.nn.Identity(), loader, MSELoss(), ssim=True)
    assert got["ssim"] == pytest.approx(1.0, abs=1e-6) and got["mse"] == 0.0


def test_ssim_of_a_different_pair_is_torchmetrics_value():
    from torchmetrics.functional.image import structural_similarity_index_measure

    images = _images(7, 32)
    got = evaluate(Darker(), BatchLoader(images, 4, "cpu"), MSELoss(), ssim=True)  # batches of 4 and 3
    x = images.float() / 255
    # torchmetrics' defaults are Wang et al.'s (Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03): only the range is set
    expected = structural_similarity_index_measure(Darker()(x), x, data_range=1.0).item()  # mean over images
    assert got["ssim"] < 0.95
    assert got["ssim"] == pytest.approx(expected, rel=1e-6)
    per_image = ssim_per_image(Darker()(x), x)
    assert per_image.shape == (7,) and got["ssim"] == pytest.approx(per_image.mean().item(), rel=1e-6)


@pytest.mark.parametrize("shape", [(5, 3, 64, 64), (3, 1, 11, 11), (4, 3, 20, 13)])
def test_ssim_per_image_equals_torchmetrics_on_every_image(shape):
    # our matrix form of the window must be torchmetrics' padded depthwise convolution, image by image, on any
    # size, including the window's own and non-square ones (a wrong reflection would show at the borders)
    from torchmetrics.functional.image import structural_similarity_index_measure

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen)
    recon = (x + 0.2 * torch.randn(shape, generator=gen)).clamp(0, 1)
    expected = structural_similarity_index_measure(recon, x, data_range=1.0, reduction="none")
    got = ssim_per_image(recon, x)
    assert got.shape == (shape[0],) and expected.min() < 0.9
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_ssim_needs_images_as_large_as_its_window():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError, match="at least 11x11"):
        ssim_per_image(x, x)
    assert ssim_per_image(torch.rand(2, 1, 11, 11), torch.rand(2, 1, 11, 11)).shape == (2,)  # exactly the window
