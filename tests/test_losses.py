import pytest
import torch

from aecurves.errors import UserError
from aecurves.losses import VGG_LAYERS, load_vgg_features, make_loss


def test_mse_matches_definition():
    a, b = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    assert make_loss("mse")(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "vgg"])
def test_per_image_losses_average_to_the_loss(name):
    # the bootstrap over held-out images rests on this: the loss is the mean of the images' own losses
    loss = make_loss(name, vgg_weights="random")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 3, 32, 32, generator=gen), torch.rand(5, 3, 32, 32, generator=gen)
    b[2] = a[2]  # one perfect reconstruction
    per = loss.per_image(a, b)
    assert per.shape == (5,) and per[2] == 0 and (per[[0, 1, 3, 4]] > 0).all()
    assert per.mean().item() == pytest.approx(loss(a, b).item(), rel=1e-5)
    assert per[1].item() == pytest.approx(loss(a[1:2], b[1:2]).item(), rel=1e-5)  # each is that image's loss


def test_vgg_random_is_zero_on_equal_inputs_and_positive_otherwise(capsys):
    loss = make_loss("vgg", vgg_weights="random")
    assert "NOT perceptual" in capsys.readouterr().err
    assert loss.perceptual is False
    x = torch.rand(2, 3, 32, 32)
    assert loss(x, x).item() == 0.0
    assert loss(x, torch.rand(2, 3, 32, 32)).item() > 0


def test_vgg_grayscale_is_repeated_to_rgb():
    loss = make_loss("vgg", vgg_weights="random")
    gray, other = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    as_rgb = loss(gray.expand(-1, 3, -1, -1), other.expand(-1, 3, -1, -1)).item()
    assert loss(gray, other).item() == pytest.approx(as_rgb)


def test_vgg_is_frozen_and_stays_in_eval_mode():
    loss = make_loss("vgg", vgg_weights="random")
    loss.train()
    assert not loss.distortion.features.training
    assert not any(p.requires_grad for p in loss.parameters())
    recon = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss(recon, torch.rand(2, 3, 32, 32)).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert len(loss.distortion.features) == VGG_LAYERS["relu4_3"] + 1


def test_random_vgg_does_not_disturb_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    make_loss("vgg", vgg_weights="random")
    assert torch.equal(torch.rand(3), expected)


def test_vgg_weights_from_a_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    net = make_layers(cfgs["D"])  # the layout of vgg16().features; saved as a full vgg16 state dict would be
    torch.save({f"features.{k}": v for k, v in net.state_dict().items()}, tmp_path / "vgg.pth")
    feats = load_vgg_features(str(tmp_path / "vgg.pth"))
    assert torch.equal(feats[21].weight, net[21].weight)
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="vgg16"):
        load_vgg_features(str(tmp_path / "bad.pth"))


def test_missing_vgg_weights_explain_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision must download, and cannot

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        make_loss("vgg")
    msg = str(err.value)
    assert "--vgg-weights" in msg and str(tmp_path) in msg and "vgg16-397923af.pth" in msg
    with pytest.raises(UserError, match="no such file"):
        make_loss("vgg", vgg_weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_are_attempted_once_per_process(monkeypatch):
    from torchvision.models import VGG16_Weights

    from aecurves import losses

    calls = []

    def offline(self, *args, **kwargs):
        calls.append(1)
        raise OSError("offline in this test")

    monkeypatch.setattr(losses, "_IMAGENET_FAILURE", [])
    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    for _ in range(3):
        with pytest.raises(losses.VGGUnavailable) as exc:
            load_vgg_features("imagenet")
    assert len(calls) == 1
    assert "offline in this test" in exc.value.short and "\n" not in exc.value.short
    assert "--vgg-weights PATH" in str(exc.value) and len(exc.value.short) < len(str(exc.value))


# --- the objective: an autoencoder's loss, or a VAE's distortion + β·KL/D ---------------------------------------

@pytest.mark.parametrize("name", ["mse", "vgg"])
def test_an_autoencoders_objective_is_its_loss_bit_for_bit(name):
    objective = make_loss(name, vgg_weights="random", kl_weight=3.0)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 32, 32, generator=gen), torch.rand(3, 3, 32, 32, generator=gen)
    assert torch.equal(objective(a, b), objective.distortion(a, b))
    assert torch.equal(objective.per_image(a, b), objective.distortion.per_image(a, b))
    assert objective.terms(a, b) == {}


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_a_vaes_objective_adds_the_kl_per_image_value(beta):
    objective = make_loss("mse", kl_weight=beta)
    gen = torch.Generator().manual_seed(2)
    recon, x = torch.rand(4, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen)
    kl = torch.tensor([1.0, 2.0, 0.5, 4.0])
    mse = ((recon - x) ** 2).mean()
    d = 3 * 8 * 8
    assert objective((recon, kl), x).item() == pytest.approx((mse + beta * kl.mean() / d).item(), rel=1e-6)
    per = objective.per_image((recon, kl), x)
    assert per.mean().item() == pytest.approx(objective((recon, kl), x).item(), rel=1e-6)
    terms = objective.terms((recon, kl), x)
    assert torch.equal(terms["rate"], kl)
    assert torch.allclose(terms["distortion"], ((recon - x) ** 2).flatten(1).mean(1))
    assert torch.allclose(per, terms["distortion"] + beta * kl / d)


def test_the_objective_trains_both_terms():
    recon = torch.rand(2, 3, 8, 8, requires_grad=True)
    kl = torch.tensor([1.0, 2.0], requires_grad=True)
    make_loss("mse", kl_weight=2.0)((recon, kl), torch.rand(2, 3, 8, 8)).backward()
    assert recon.grad.abs().sum() > 0
    assert torch.allclose(kl.grad, torch.full((2,), 2.0 / (2 * 3 * 8 * 8)))
