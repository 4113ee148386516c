"""The evaluation protocol's building blocks: subsets, per-image MSE, the shared evaluate()."""

import numpy as np
import pytest
import torch

from aecurves.data import BatchLoader
from aecurves.errors import UserError
from aecurves.losses import MSELoss
from aecurves.metrics import evaluate, fixed_subset, per_image_mse, psnr_from_mse, stratified_subset
from aecurves.ssim import ssim_per_image


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


# ----------------------------------------------------------------------------------------------------------
# the engine: several networks per call give one network at a time's numbers


def _segment_and_loaders():
    from aecurves.curves import make_segment
    from aecurves.models import ConvAutoencoder

    torch.manual_seed(0)
    a, b = ConvAutoencoder(image_size=16, width=4, latent_dim=8), ConvAutoencoder(image_size=16, width=4, latent_dim=8)
    segment = make_segment(ConvAutoencoder(image_size=16, width=4, latent_dim=8), a.state_dict(), b.state_dict())
    images = _images(40, 16, seed=3)
    return segment, BatchLoader(images[:24], 10, "cpu"), BatchLoader(images[24:], 7, "cpu")  # short last batches


@pytest.mark.parametrize("per_call", [2, 3, 5])
def test_several_points_per_call_equal_one_at_a_time(per_call):
    from aecurves.metrics import evaluate_points

    segment, train_loader, test_loader = _segment_and_loaders()
    ts = [0.0, 0.3, 0.5, 0.8, 1.0]  # 5 points: chunks of 2 and 3 leave a short last chunk
    seen = {}

    def run(n):
        seen[n] = {}
        return evaluate_points(segment.base, segment.unflatten, segment.flat_at, ts, train_loader, test_loader,
                               MSELoss(), bn_loader=train_loader, ssim=True, per_image=True, points_per_call=n,
                               on_point=lambda t, net: seen[n].setdefault(t, net(test_loader.images[:3]
                                                                                 .float().div(255))))

    one, many = run(1), run(per_call)
    for t, r1, rn in zip(ts, one, many):
        assert set(r1) == set(rn) == {"tr", "te"}
        for split in ("tr", "te"):
            for m in ("loss", "mse", "psnr", "ssim"):
                assert rn[split][m] == pytest.approx(r1[split][m], rel=1e-5, abs=0), (t, split, m)
        np.testing.assert_allclose(rn["te"]["per_image_mse"], r1["te"]["per_image_mse"], rtol=1e-5)
        # each point's network, handed to on_point, carries that point's BN statistics
        torch.testing.assert_close(seen[per_call][t], seen[1][t], rtol=1e-5, atol=1e-6)
    # and the points differ from each other (the test would pass trivially on equal networks)
    assert (seen[1][0.3] - seen[1][0.8]).abs().max() > 1e-3 and one[1]["te"]["loss"] != one[3]["te"]["loss"]


def test_the_engine_equals_evaluate_after_recompute_bn():
    from aecurves.curves import NetworkAt, recompute_bn
    from aecurves.metrics import evaluate_points

    segment, train_loader, test_loader = _segment_and_loaders()
    weights = segment.weights(0.4)
    recompute_bn(segment.base, weights, train_loader)
    expected = evaluate(NetworkAt(segment.base, weights), test_loader, MSELoss())
    got = evaluate_points(segment.base, segment.unflatten, segment.flat_at, [0.2, 0.4], train_loader, test_loader,
                          MSELoss(), bn_loader=train_loader, points_per_call=2)[1]["te"]
    for m in ("loss", "mse", "psnr"):
        assert got[m] == pytest.approx(expected[m], rel=1e-5, abs=0)


class ViewsItsFeatures(torch.nn.Module):
    """A model whose forward needs contiguous activations: .view of a convolution's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.out = torch.nn.Linear(4 * 16 * 16, 3 * 16 * 16)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return torch.sigmoid(self.out(h.view(x.shape[0], -1))).view(x.shape)


def test_protocol_batches_are_channels_last_and_fall_back_for_a_model_that_cannot_take_them():
    from aecurves.curves import make_segment
    from aecurves.metrics import protocol_loaders

    images = _images(12, 16)
    segment, train_loader, _ = _segment_and_loaders()
    before = {n: b.clone() for n, b in segment.base.named_buffers()}
    protocol = protocol_loaders(segment, images, images[:5], 8, 8, True, 4, "cpu", "channels_last")
    batch = next(iter(protocol.test_loader))
    assert protocol.memory_format == "channels_last" and not protocol.notes
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    assert torch.equal(batch, images[:4].float() / 255)  # the same values
    # the probe ran the model in training mode without touching its BatchNorm statistics
    assert all(torch.equal(b, before[n]) for n, b in segment.base.named_buffers())

    torch.manual_seed(0)
    viewer = make_segment(ViewsItsFeatures(), ViewsItsFeatures().state_dict(), ViewsItsFeatures().state_dict())
    protocol = protocol_loaders(viewer, images, images[:5], 8, 8, True, 4, "cpu", "channels_last")
    assert protocol.memory_format == "contiguous" and "channels_last" in protocol.notes[0]
    assert next(iter(protocol.test_loader)).is_contiguous()
