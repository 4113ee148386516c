"""Permutation groups, permuting, latent maps and weight matching (aecurves.symmetry)."""

import copy
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from aecurves.errors import UserError
from aecurves.models import ConvAutoencoder
from aecurves.symmetry import (
    Entry,
    _matching_cost,
    apply_latent_map,
    batchnorm_after,
    find_groups,
    fold_batchnorm,
    linear_assignment,
    permute,
    weight_matching,
)

from ae_models import UpsampleAutoencoder, mlp_autoencoder


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random norm parameters and running statistics, so a norm layer that is not permuted with its channels
    changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def conv_ae(size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(size)
    model = ConvAutoencoder(channels=3, image_size=size, latent_dim=16, width=8)
    return randomize(model, size), torch.rand(3, 3, size, size)


def mlp_ae() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return mlp_autoencoder(channels=3, image_size=8, latent_dim=8, hidden=16).eval(), torch.rand(3, 3, 8, 8)


def upsample_ae() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    return randomize(UpsampleAutoencoder(3, 16, 8, width=4), 2), torch.rand(3, 3, 16, 16)


# Float32 rounding moves the outputs by about 1e-7; a unit that moves without its statistics, by far more.
TOLERANCE = 1e-6
MODELS = {"conv32": lambda: conv_ae(32), "conv64": lambda: conv_ae(64), "mlp": mlp_ae, "upsample": upsample_ae}


def groups_of(model, x):
    return find_groups(model, torch.zeros(2, *x.shape[1:]))


def random_perms(groups, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.randperm(grp.size, generator=g) for grp in groups}


def output_with(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    with torch.no_grad():
        return other.eval()(x)


def expected_conv_groups(size: int) -> list[tuple[str, int, str]]:
    stages = int(math.log2(size // 4))
    widths = [min(8 * 2**i, 64) for i in range(stages)]
    return ([(f"encoder.{i}.0", w, "hidden") for i, w in enumerate(widths)]
            + [(f"encoder.{stages + 1}", 16, "latent"), ("decoder_input", widths[-1], "hidden")]
            + [(f"decoder.{j}.0", widths[stages - 2 - j], "hidden") for j in range(stages - 1)])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_conv_autoencoder_groups(size):
    model = ConvAutoencoder(channels=3, image_size=size, latent_dim=16, width=8)
    groups = find_groups(model, torch.zeros(2, 3, size, size))
    assert [(g.name, g.size, g.kind) for g in groups] == expected_conv_groups(size)
    by_name = {g.name: set(g.entries) for g in groups}
    stages = int(math.log2(size // 4))
    last, linear = f"encoder.{stages - 1}", f"encoder.{stages + 1}"
    bn = {(f"{last}.1.{k}", 0, 1) for k in ("weight", "bias", "running_mean", "running_var")}
    assert by_name[f"{last}.0"] == {(f"{last}.0.weight", 0, 1), (f"{linear}.weight", 1, 16)} | bn
    assert by_name[linear] == {(f"{linear}.weight", 0, 1), (f"{linear}.bias", 0, 1), ("decoder_input.weight", 1, 1)}
    assert by_name["decoder_input"] == {("decoder_input.weight", 0, 16), ("decoder_input.bias", 0, 16),
                                        ("decoder.0.0.weight", 0, 1)}
    # A transposed convolution writes along axis 1 of its weight and reads along axis 0.
    assert ("decoder.0.0.weight", 1, 1) in by_name["decoder.0.0"]
    assert (f"decoder.{stages - 2}.0.weight", 1, 1) in by_name[f"decoder.{stages - 2}.0"]
    assert (f"decoder.{stages - 1}.weight", 0, 1) in by_name[f"decoder.{stages - 2}.0"]
    # Image channels and the step counter never move.
    touched = {e.name for g in groups for e in g.entries}
    assert "encoder.0.0.weight" in touched and not any("num_batches_tracked" in n for n in touched)
    assert all(e.axis == 0 for g in groups for e in g.entries if e.name == "encoder.0.0.weight")
    assert f"decoder.{stages - 1}.bias" not in touched
    # the tensors that carry each group's units: the writer's output first, as the next layer reads them last
    taps = {g.name: g.taps for g in groups}
    assert taps["encoder.0.0"] == ["encoder_0_0", "encoder_0_1", "encoder_0_2"]  # conv, BN, ReLU
    assert taps[linear] == [f"encoder_{stages + 1}"] and taps["decoder_input"] == ["decoder_input", "relu"]


def test_custom_model_groups():
    mlp = find_groups(mlp_autoencoder(3, 8, 8, hidden=16), torch.zeros(2, 3, 8, 8))
    assert [(g.name, g.size, g.kind) for g in mlp] == [("1", 16, "hidden"), ("3", 8, "latent"), ("4", 16, "hidden")]
    assert set(mlp[1].entries) == {("3.weight", 0, 1), ("3.bias", 0, 1), ("4.weight", 1, 1)}
    assert set(mlp[2].entries) == {("4.weight", 0, 1), ("4.bias", 0, 1), ("6.weight", 1, 1)}

    up = find_groups(UpsampleAutoencoder(3, 16, 8, width=4), torch.zeros(2, 3, 16, 16))
    assert [(g.name, g.size, g.kind) for g in up] == [
        ("encoder.0", 4, "hidden"), ("encoder.3", 8, "hidden"), ("encoder.7", 8, "latent"),
        ("decoder.0", 8, "hidden"), ("decoder.3", 4, "hidden")]
    assert ("encoder.7.weight", 1, 16) in up[1].entries and ("encoder.4.running_var", 0, 1) in up[1].entries
    assert set(up[3].entries) == {("decoder.0.weight", 0, 16), ("decoder.0.bias", 0, 16), ("decoder.3.weight", 1, 1)}
    assert set(up[4].entries) == {("decoder.3.weight", 0, 1), ("decoder.3.bias", 0, 1), ("decoder.7.weight", 1, 1)}


def test_find_groups_leaves_the_model_as_it_was():
    model = ConvAutoencoder(channels=3, image_size=32, latent_dim=16, width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_groups(model, torch.rand(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def random_latent_map(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", list(MODELS) + ["conv128"])
def test_permutations_and_latent_maps_keep_the_function(name):
    model, x = conv_ae(128) if name == "conv128" else MODELS[name]()
    groups = groups_of(model, x)
    state = model.state_dict()
    moved = permute(state, groups, random_perms(groups, seed=3))
    for g in groups:
        if g.kind == "latent":
            moved = apply_latent_map(moved, g, random_latent_map(g.size, seed=4))
    assert moved.keys() == state.keys()
    changed = [k for k in state if not torch.equal(state[k], moved[k])]
    assert len(changed) == len({e.name for g in groups for e in g.entries})  # not a vacuous test
    with torch.no_grad():
        reference = model(x)
    assert (output_with(model, moved, x) - reference).abs().max().item() <= TOLERANCE


def test_a_wrong_axis_or_a_forgotten_entry_changes_the_function():
    """The invariance test can fail: permuting a transposed convolution along the axis a convolution would use
    (decoder.0.0 is 64 -> 64 at size 128, so the shapes still fit), or leaving the running statistics where they
    were, changes the output."""
    model, x = conv_ae(128)
    groups = groups_of(model, x)
    target = next(g for g in groups if g.name == "decoder.0.0")
    perm = random_perms([target], seed=5)
    with torch.no_grad():
        reference = model(x)
    assert (output_with(model, permute(model.state_dict(), groups, perm), x) - reference).abs().max() <= TOLERANCE
    for broken_entries in ([e._replace(axis=0) if e.name == "decoder.0.0.weight" else e for e in target.entries],
                           [e for e in target.entries if "running" not in e.name]):
        broken = [dataclasses.replace(target, entries=broken_entries)]
        moved = permute(model.state_dict(), broken, perm)
        assert (output_with(model, moved, x) - reference).abs().max().item() > 100 * TOLERANCE


def test_a_permutation_matrix_as_latent_map_is_the_permutation():
    model, x = conv_ae(32)
    latent = next(g for g in groups_of(model, x) if g.kind == "latent")
    perm = torch.randperm(latent.size, generator=torch.Generator().manual_seed(6))
    matrix = torch.zeros(latent.size, latent.size)
    matrix[torch.arange(latent.size), perm] = 1
    by_map = apply_latent_map(model.state_dict(), latent, matrix)
    by_perm = permute(model.state_dict(), [latent], {latent.name: perm})
    assert all(torch.allclose(by_map[k], by_perm[k], atol=1e-6) for k in by_perm)
    assert not torch.equal(by_perm["encoder.4.weight"], model.state_dict()["encoder.4.weight"])


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_undoes_a_permutation(name):
    model, x = MODELS[name]()
    groups = groups_of(model, x)
    state_a = model.state_dict()
    perms = random_perms(groups, seed=7)
    state_b = permute(state_a, groups, perms)
    found = weight_matching(state_a, state_b, groups)
    for g in groups:
        assert torch.equal(found[g.name], torch.argsort(perms[g.name])), g.name
    aligned = permute(state_b, groups, found)
    assert all(torch.allclose(aligned[k].float(), state_a[k].float(), atol=1e-6, rtol=0) for k in state_a)


@pytest.mark.parametrize("name", list(MODELS))
def test_aligning_a_model_to_itself_keeps_every_unit(name):
    model, x = MODELS[name]()
    groups = groups_of(model, x)
    found = weight_matching(model.state_dict(), model.state_dict(), groups, seed=3)
    assert {g: p.tolist() for g, p in found.items()} == {g.name: list(range(g.size)) for g in groups}


def test_weight_matching_brings_an_independent_model_closer():
    a, x = conv_ae(32)
    b = randomize(ConvAutoencoder(channels=3, image_size=32, latent_dim=16, width=8), 11)
    groups = groups_of(a, x)
    state_a, state_b = a.state_dict(), b.state_dict()
    aligned = permute(state_b, groups, weight_matching(state_a, state_b, groups))

    def similarity(s):
        names = {e.name for g in groups for e in g.entries}
        return sum((state_a[n].double() * s[n].double()).sum().item() for n in names)

    assert similarity(aligned) > similarity(state_b)
    with torch.no_grad():
        assert (output_with(b, aligned, x) - b(x)).abs().max().item() <= TOLERANCE


class Residual(nn.Module):
    """A residual add joins two convolutions' channels into one group."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_mid = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 6, 3, 1, 1)
        self.bn, self.conv_out = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 3, 1, 1)

    def forward(self, x):
        h = torch.relu(self.conv_in(x))
        h = h + torch.relu(self.bn(self.conv_mid(h)))
        return torch.sigmoid(self.conv_out(h))


class Pinned(nn.Module):
    """conv_a's channels are added to the input's, so they cannot move; conv_b's can."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b, self.conv_c = nn.Conv2d(3, 3, 3, 1, 1), nn.Conv2d(3, 5, 3, 1, 1), nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.conv_c(torch.relu(self.conv_b(torch.relu(self.conv_a(x)) + x)))


def test_residual_add_merges_groups_and_an_input_pins_them():
    model = randomize(Residual(), 8)
    x = torch.rand(2, 3, 8, 8)
    (group,) = groups_of(model, x)
    assert (group.name, group.size) == ("conv_in", 6)
    assert {("conv_mid.weight", 0, 1), ("conv_mid.weight", 1, 1), ("bn.running_mean", 0, 1),
            ("conv_out.weight", 1, 1), ("conv_in.bias", 0, 1)} <= set(group.entries)
    perms = random_perms([group], seed=9)
    with torch.no_grad():
        assert (output_with(model, permute(model.state_dict(), [group], perms), x) - model(x)).abs().max() <= TOLERANCE
    found = weight_matching(model.state_dict(), permute(model.state_dict(), [group], perms), [group])
    assert torch.equal(found["conv_in"], torch.argsort(perms["conv_in"]))

    assert [(g.name, g.size) for g in groups_of(Pinned(), x)] == [("conv_b", 5)]


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(8, 3, 3, 1, 1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


class Matmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(3 * 8 * 8, 16), nn.Linear(16, 3 * 8 * 8)
        self.mix = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        h = torch.relu(self.enc(x.flatten(1))) @ self.mix
        return torch.sigmoid(self.dec(h)).view(x.shape)


class ChannelSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(1, 3, 3, 1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)).cumsum(1)[:, -1:])  # a sum over channels is understood, a cumsum not


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1, groups=2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("model, message", [
    (Cat(), r"node 'cat' \(the function cat\) reads the hidden units of a, b"),
    (Matmul(), r"node 'matmul' \(the function matmul\) reads the hidden units of enc"),
    (ChannelSum(), r"node 'cumsum' \(the tensor method .cumsum\(\)\) reads the hidden units of a"),
    (Grouped(), r"node 'b' \(b: Conv2d\) has groups=2"),
])
def test_unsupported_models_are_refused_by_node(model, message):
    with pytest.raises(UserError, match=message):
        find_groups(model, torch.zeros(2, 3, 8, 8))


def test_permute_and_latent_map_check_their_arguments():
    model, x = mlp_ae()
    groups = groups_of(model, x)
    with pytest.raises(ValueError, match="must reorder 16 units"):
        permute(model.state_dict(), groups, {"1": torch.tensor([0] * 16)})
    with pytest.raises(ValueError, match="unknown groups"):
        permute(model.state_dict(), groups, {"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="not latent"):
        apply_latent_map(model.state_dict(), groups[0], torch.eye(16))
    assert groups[1].entries[0] == Entry("3.weight", 0, 1)


def brute_force(cost: np.ndarray) -> float:
    n = cost.shape[0]
    return min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_linear_assignment_is_optimal(n):
    rng = np.random.default_rng(n)
    for trial in range(20):
        cost = rng.normal(size=(n, n)) if trial % 2 else rng.integers(0, 3, size=(n, n)).astype(float)  # ties
        cols = linear_assignment(cost)
        assert sorted(cols.tolist()) == list(range(n))
        assert cost[np.arange(n), cols].sum() == pytest.approx(brute_force(cost), abs=1e-9)
        best = linear_assignment(cost, maximize=True)
        assert cost[np.arange(n), best].sum() == pytest.approx(-brute_force(-cost), abs=1e-9)


def along_of(groups) -> dict:
    along = {}
    for g in groups:
        for e in g.entries:
            along.setdefault(e.name, []).append((g.name, e.axis, e.block))
    return along


def identity_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm the identity in eval mode: gamma 1, beta 0, mean 0, var + eps = 1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0), m.bias.zero_(), m.running_mean.zero_(), m.running_var.fill_(1.0 - m.eps)
    return model


def test_batchnorm_after_pairs_each_normalised_layer_with_its_norm():
    model, _ = conv_ae(32)
    assert batchnorm_after(model) == {"encoder.0.0": "encoder.0.1", "encoder.1.0": "encoder.1.1",
                                      "encoder.2.0": "encoder.2.1", "decoder.0.0": "decoder.0.1",
                                      "decoder.1.0": "decoder.1.1"}
    assert batchnorm_after(mlp_ae()[0]) == {}  # no BatchNorm at all


def test_the_folded_cost_equals_the_raw_cost_when_batchnorm_is_the_identity():
    a, x = conv_ae(32)
    b = ConvAutoencoder(channels=3, image_size=32, latent_dim=16, width=8)
    identity_batchnorm(a), identity_batchnorm(b)
    groups = groups_of(a, x)
    pairs = batchnorm_after(a)
    along, perms = along_of(groups), random_perms(groups, seed=3)
    folded_a, folded_b = fold_batchnorm(a.state_dict(), a, pairs), fold_batchnorm(b.state_dict(), b, pairs)
    for g in groups:
        raw = _matching_cost(g, a.state_dict(), b.state_dict(), perms, along, normalise=False)
        folded = _matching_cost(g, folded_a, folded_b, perms, along, normalise=False)
        # raw also counts gamma·gamma = 1 and var·var = (1 - eps)^2 for every pair of units of a normalised group
        constant = (1 + (1 - 1e-5) ** 2) if g.name in pairs else 0.0
        assert torch.allclose(raw - folded, torch.full_like(raw, constant), atol=1e-9), g.name


def test_folding_removes_the_scale_that_batchnorm_makes_arbitrary():
    """Scaling a conv's weights and its BN's running std together changes nothing the network computes; the
    folded view is unchanged by it, the raw weights are not."""
    model, x = conv_ae(32)
    pairs = batchnorm_after(model)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.encoder[1][0].weight.mul_(7.0)
        bn = scaled.encoder[1][1]
        bn.running_mean.mul_(7.0)
        bn.running_var.mul_(49.0).add_(48.0 * bn.eps)  # (7σ)² - eps
        assert torch.allclose(scaled(x), model(x), atol=1e-5)
    folded, folded_scaled = fold_batchnorm(model.state_dict(), model, pairs), \
        fold_batchnorm(scaled.state_dict(), scaled, pairs)
    assert all(torch.allclose(folded[k], folded_scaled[k], atol=1e-9) for k in folded)
    assert "encoder.1.1.running_var" not in folded and "encoder.1.1.weight" not in folded


@pytest.mark.parametrize("name", list(MODELS))
def test_normalised_folded_and_mixed_matching_undo_a_permutation(name):
    model, x = MODELS[name]()
    groups = groups_of(model, x)
    perms = random_perms(groups, seed=5)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute(model.state_dict(), groups, perms))
    pairs = batchnorm_after(model)
    fa, fb = fold_batchnorm(model.state_dict(), model, pairs), fold_batchnorm(permuted.state_dict(), permuted, pairs)
    # a unary score that favours the wrong units a little; alpha = 0.3 leaves the weights' cosine in charge
    g0 = torch.Generator().manual_seed(1)
    unary = {g.name: 0.1 * torch.rand(g.size, g.size, generator=g0, dtype=torch.float64) for g in groups}
    for kwargs in ({"normalise": True}, {"normalise": True, "unary": unary, "alpha": 0.3}):
        found = weight_matching(fa, fb, groups, **kwargs)
        for g in groups:
            assert torch.equal(found[g.name], torch.argsort(perms[g.name])), (g.name, kwargs)


def test_mixed_matching_with_alpha_one_is_the_unary_assignment():
    model, x = conv_ae(32)
    groups = groups_of(model, x)
    g0 = torch.Generator().manual_seed(2)
    unary = {g.name: torch.rand(g.size, g.size, generator=g0, dtype=torch.float64) for g in groups}
    found = weight_matching(model.state_dict(), model.state_dict(), groups, unary=unary, alpha=1.0, normalise=True)
    for g in groups:
        assert found[g.name].tolist() == linear_assignment(unary[g.name].numpy(), maximize=True).tolist()


def test_non_finite_matching_scores_name_the_layer_group():
    """Scores that overflow (weights far beyond a trained network's) once reached scipy as a ValueError traceback;
    they are a user error naming the group."""
    model = ConvAutoencoder(channels=3, image_size=16, latent_dim=8, width=4)
    groups = find_groups(model, torch.rand(2, 3, 16, 16))
    state = {k: v.double() for k, v in model.state_dict().items()}
    huge = dict(state, **{"encoder.1.0.weight": state["encoder.1.0.weight"] * 1e300})
    with pytest.raises(UserError, match=r"matching scores of the units of encoder\.[01]\.0 are not finite"):
        weight_matching(huge, huge, groups)  # 1e300 · 1e300 overflows float64; both groups read that tensor
    with pytest.raises(UserError, match="units of decoder_input are not finite"):
        linear_assignment(np.array([[1.0, np.nan], [0.0, 1.0]]), maximize=True, group="decoder_input")
    with pytest.raises(ValueError, match="finite square matrix"):  # a programming error without a group
        linear_assignment(np.ones((2, 3)))
