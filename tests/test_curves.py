import pytest
import torch
from torch import nn

from aecurves.curves import Bezier, Curve, CurvePoint, PolyChain, make_coefficients
from aecurves.errors import UserError
from aecurves.models import ConvAutoencoder


class AnyNet(nn.Module):
    """Not an autoencoder of ours: every layer kind a user's model may have, none rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 4, 2, 1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        h = torch.relu(self.gn(self.bn(self.conv(x))))
        return self.fc(self.up(h).flatten(1))


def tiny_ae():
    return ConvAutoencoder(3, 32, 16, 8)


def two_nets(cls=AnyNet):
    torch.manual_seed(0)
    a, b = cls(), cls()
    for m in (a, b):  # give BN non-trivial statistics
        m.train()
        m(torch.rand(8, 3, 8, 8) if cls is AnyNet else torch.rand(8, 3, 32, 32))
    return a, b


def curve_between(a, b, kind="bezier", bends=3, fix=(True, True), cls=AnyNet):
    curve = Curve(cls(), kind, bends, *fix)
    curve.set_endpoints(a.state_dict(), b.state_dict())
    curve.init_linear()
    return curve


@pytest.mark.parametrize("cls", [Bezier, PolyChain])
@pytest.mark.parametrize("bends", [2, 3, 4, 6])
def test_coefficients_sum_to_one_and_are_one_hot_at_the_ends(cls, bends):
    c = cls(bends)
    for t in torch.linspace(0, 1, 41).tolist():
        v = c(t)
        assert v.shape == (bends,) and (v >= 0).all()
        assert v.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert c(0.0).tolist() == [1.0] + [0.0] * (bends - 1)
    assert c(1.0).tolist() == [0.0] * (bends - 1) + [1.0]


def test_known_coefficient_values():
    assert Bezier(3)(0.5).tolist() == [0.25, 0.5, 0.25]
    assert PolyChain(3)(0.25).tolist() == [0.5, 0.5, 0.0]
    assert PolyChain(5)(0.5).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert isinstance(make_coefficients("pOlYcHaIn", 3), PolyChain)
    with pytest.raises(UserError):
        make_coefficients("spline", 3)
    with pytest.raises(UserError, match="at least 2"):
        make_coefficients("bezier", 1)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("bends", [2, 3, 5])
def test_curve_ends_are_the_endpoints_bit_for_bit(kind, bends):
    a, b = two_nets()
    curve = curve_between(a, b, kind, bends, fix=(False, False))
    with torch.no_grad():
        for bend in curve.bends[1:-1]:
            bend.add_(torch.randn_like(bend))  # a trained-looking curve, not the segment
    for t, net in ((0.0, a), (1.0, b)):
        state = curve.state_dict_at(t)
        for name, p in net.named_parameters():
            assert torch.equal(state[name], p.detach()), (t, name)
    # inside, every parameter is Σ_k c_k(t) θ_k, and the state dict has the module's own keys
    inside = curve.state_dict_at(0.3)
    assert set(inside) == set(a.state_dict())
    c = curve.coeffs(0.3)
    for name, p in a.named_parameters():
        bends = [curve.unflatten(bend.detach())[name] for bend in curve.bends]
        expected = sum(ck * bend for ck, bend in zip(c.tolist(), bends))
        assert torch.allclose(inside[name], expected, atol=1e-6), name
        if not all(torch.equal(bend, bends[0]) for bend in bends):  # BatchNorm's initial 1s and 0s are shared
            assert not torch.equal(inside[name], p.detach()), name


def test_any_module_runs_and_matches_its_endpoints_output():
    a, b = two_nets()
    curve = curve_between(a, b)
    x = torch.rand(4, 3, 8, 8)
    a.eval(), curve.eval()
    curve.use_endpoint_buffers(0)
    assert torch.equal(curve(x, 0.0), a(x))
    curve.use_endpoint_buffers(1)
    b.eval()
    assert torch.equal(curve(x, 1.0), b(x))


def test_linear_init_puts_bezier_on_the_segment_and_polychain_bends_evenly():
    a, b = two_nets()
    flat_a, flat_b = Curve(AnyNet()).flatten(a.state_dict()), Curve(AnyNet()).flatten(b.state_dict())
    bez = curve_between(a, b, "bezier", 3)
    for t in (0.2, 0.5, 0.9):
        torch.testing.assert_close(bez.flat_at(t), (1 - t) * flat_a + t * flat_b)
    chain = curve_between(a, b, "polychain", 5)
    torch.testing.assert_close(chain.bends[1].detach(), 0.75 * flat_a + 0.25 * flat_b)
    assert torch.equal(chain.flat_at(0.5), chain.bends[2].detach() * 1.0)


def test_fixed_endpoints_never_move_and_only_free_bends_get_gradients():
    a, b = two_nets()
    curve = curve_between(a, b, "bezier", 4, fix=(True, False))
    start = curve.bends[0].detach().clone()
    opt = torch.optim.Adam([p for p in curve.bends if p.requires_grad], lr=1e-2)
    for t in (0.1, 0.5, 0.9):
        opt.zero_grad()
        out = curve(torch.rand(4, 3, 8, 8), t)
        (out.pow(2).mean() + 1e-3 * curve.l2(t)).backward()
        assert curve.bends[0].grad is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in curve.bends[1:])
        opt.step()
    assert torch.equal(curve.bends[0].detach(), start)
    assert curve.num_trainable() == 3 * curve.bends[0].numel()
    assert not any(p.requires_grad for p in curve.base.parameters())


def test_l2_is_the_squared_norm_of_theta_t():
    a, b = two_nets()
    curve = curve_between(a, b)
    expected = sum(w.pow(2).sum() for w in curve.weights(0.3).values())
    assert curve.l2(0.3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_update_bn_recomputes_the_statistics_at_t():
    torch.manual_seed(1)
    a, b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    curve = Curve(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "bezier", 3)
    curve.set_endpoints(a.state_dict(), b.state_dict())
    curve.init_linear()
    batches = [torch.rand(16, 3, 6, 6), torch.rand(16, 3, 6, 6), torch.rand(3, 3, 6, 6)]
    assert curve.update_bn(batches, 0.4) == 35
    w = curve.weights(0.4)
    feats = torch.cat([nn.functional.conv2d(x, w["0.weight"], w["0.bias"]) for x in batches])
    # the mean over all images: a short last batch weighs as much as its images, no more
    torch.testing.assert_close(curve.base[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert curve.base[1].momentum == 0.1  # restored
    assert curve.update_bn(batches, 0.4, num_batches=1) == 16


def test_state_dict_at_loads_into_a_plain_model_and_matches_the_curve():
    a, b = two_nets(tiny_ae)
    curve = curve_between(a, b, cls=tiny_ae)
    x = torch.rand(6, 3, 32, 32)
    curve.update_bn([x], 0.5)
    plain = ConvAutoencoder(3, 32, 16, 8)
    plain.load_state_dict(curve.state_dict_at(0.5))
    plain.eval(), curve.eval()
    torch.testing.assert_close(plain(x), CurvePoint(curve, 0.5)(x))


def test_curve_state_round_trip_through_a_safe_file(tmp_path):
    a, b = two_nets(tiny_ae)
    curve = curve_between(a, b, "polychain", 4, cls=tiny_ae)
    torch.save(curve.curve_state(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    other = Curve(ConvAutoencoder(3, 32, 16, 8), state["curve"], state["num_bends"], state["fix_start"],
                  state["fix_end"])
    other.load_curve_state(state)
    for t in (0.0, 0.37, 1.0):
        assert torch.equal(other.flat_at(t), curve.flat_at(t))
    wrong = Curve(ConvAutoencoder(3, 32, 32, 8), "polychain", 4)
    with pytest.raises(UserError, match="bends of shape"):
        wrong.load_curve_state(state)
