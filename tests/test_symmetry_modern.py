"""Alignment of modern blocks (issue 28): GroupNorm, LayerNorm over channels, SiLU/GELU, a VAE's chunked posterior,
attention over channels with one or two heads, ViT blocks with timm's fused qkv or nn.MultiheadAttention. Each
network's groups are checked, a random permutation that keeps the groups' blocks is recovered exactly by weight and
activation matching and keeps the function, and aligning two networks from different seeds keeps B's function."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aecurves.checkpoint import load_checkpoint, save_checkpoint
from aecurves.commands.align import activation_matching, check_same_function
from aecurves.errors import UserError
from aecurves.models import build_model
from aecurves.symmetry import (
    find_groups,
    linear_assignment_blocks,
    permute,
    weight_matching,
)

from conftest import run_cli

TOLERANCE = 1e-5
VAE_ARCH = {"model": "aecurves.models:ConvVAE", "model_kwargs": {}, "channels": 3, "image_size": 16,
            "latent_dim": 8, "width": 4}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and running statistic random (GroupNorm's ones and zeros would hide a wrong axis)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor, state: dict | None = None) -> list[torch.Tensor]:
    if state is not None:
        model = _loaded(model, state)
    with torch.no_grad():
        out = model.eval()(x)
    return list(out) if isinstance(out, tuple) else [out]


def block_perms(groups, seed: int) -> dict:
    """A random permutation of every group that keeps its blocks together (in place where they are fixed)."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for grp in groups:
        m = grp.size // grp.blocks
        outer = torch.arange(grp.blocks) if grp.blocks_fixed else torch.randperm(grp.blocks, generator=g)
        perms[grp.name] = torch.cat([outer[a] * m + torch.randperm(m, generator=g) for a in range(grp.blocks)])
    return perms


# --- networks ------------------------------------------------------------------------------------------------

class GroupNormNet(nn.Module):
    """Residual GroupNorm(4, 16) + SiLU and GroupNorm(1, 16) + GELU(tanh), a LayerNorm over channels on
    [batch, positions, channels], F.pad and a strided conv, then GroupNorm(2, 8) + nn.SiLU; branches on
    self.training."""

    def __init__(self):
        super().__init__()
        self.kwargs = {}
        self.conv_in, self.norm1 = nn.Conv2d(3, 16, 3, 1, 1), nn.GroupNorm(4, 16)
        self.conv_mid, self.norm2 = nn.Conv2d(16, 16, 3, 1, 1), nn.GroupNorm(1, 16)
        self.ln = nn.LayerNorm(16)
        self.conv_down, self.act, self.norm3 = nn.Conv2d(16, 8, 3, 2), nn.SiLU(), nn.GroupNorm(2, 8)
        self.conv_out = nn.ConvTranspose2d(8, 3, 4, 2, 1)

    def forward(self, x):
        h = self.conv_in(x)
        r = self.conv_mid(F.silu(self.norm1(h)))
        h = h + F.gelu(self.norm2(r), approximate="tanh")
        if self.training:  # traced in eval mode: this branch is not in the graph
            h = h * torch.randn(1, device=h.device)
        b, hh, ww = h.shape[0], h.shape[2], h.shape[3]
        t = self.ln(h.view(b, 16, hh * ww).transpose(1, 2))
        h = t.transpose(1, 2).reshape(b, 16, hh, ww)
        h = self.conv_down(F.pad(h, (0, 1, 0, 1)))  # as diffusers' Downsample2D
        return torch.sigmoid(self.conv_out(self.norm3(self.act(h))))


class AttentionNet(nn.Module):
    """A conv, then an attention block written like diffusers' (AutoencoderKL's mid block): GroupNorm ->
    view/transpose to [batch, positions, channels] -> to_q/to_k/to_v -> heads -> attention -> to_out ->
    transpose/reshape back -> residual add, divided by rescale_output_factor. `form`: sdpa, explicit (q @ kᵀ ·
    scale, softmax, @ v) or baddbmm (diffusers' get_attention_scores, heads folded into the batch)."""

    def __init__(self, heads: int = 1, form: str = "sdpa", channels: int = 8):
        super().__init__()
        self.kwargs = {"heads": heads, "form": form, "channels": channels}
        self.heads, self.form, self.c = heads, form, channels
        self.conv_in, self.group_norm = nn.Conv2d(3, channels, 3, 1, 1), nn.GroupNorm(2, channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.conv_out = nn.Conv2d(channels, 3, 1)
        self.rescale_output_factor = 2.0

    def forward(self, x):
        h = self.conv_in(x)
        residual, c, d = h, self.c, self.c // self.heads
        b, hh, ww = h.shape[0], h.shape[2], h.shape[3]
        t = h.view(b, c, hh * ww).transpose(1, 2)
        t = self.group_norm(t.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        if self.form == "baddbmm":  # heads == 1: diffusers' head_to_batch_dim
            q, k, v = (u.reshape(b, -1, 1, c).permute(0, 2, 1, 3).reshape(b, -1, c) for u in (q, k, v))
            empty = torch.empty(b, q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
            scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=d ** -0.5)
            o = torch.bmm(scores.softmax(dim=-1), v)
            o = o.reshape(b, 1, -1, c).permute(0, 2, 1, 3).reshape(b, -1, c)
        else:
            q, k, v = (u.view(b, -1, self.heads, d).transpose(1, 2) for u in (q, k, v))
            if self.form == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v)
            else:
                o = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5, dim=-1) @ v
            o = o.transpose(1, 2).reshape(b, -1, self.heads * d)
        o = self.to_out[1](self.to_out[0](o))
        o = o.transpose(-1, -2).reshape(b, c, hh, ww)
        return torch.sigmoid(self.conv_out((o + residual) / self.rescale_output_factor))


class ConvPosterior(nn.Module):
    """As diffusers' AutoencoderKL after its quant_conv: a conv writes [μ, log σ²] as 2L channels, split on dim 1,
    log σ² clamped, the KL summed over dims [1, 2, 3]; the decoder reads μ (eval mode) or a sample (training)."""

    def __init__(self):
        super().__init__()
        self.kwargs = {}
        self.enc, self.quant_conv = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 2 * 4, 1)
        self.post_quant_conv, self.dec = nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 3, 4, 2, 1)

    def forward(self, x):
        mean, logvar = torch.split(self.quant_conv(F.silu(self.enc(x))), 4, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape) if self.training else mean
        kl = 0.5 * torch.sum(torch.pow(mean, 2) + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3])
        return torch.sigmoid(self.dec(self.post_quant_conv(z))), kl


class TimmAttention(nn.Module):
    """timm's ViT Attention: one Linear writes q, k and v, reshaped to [3, batch, heads, positions, per head].
    `form`: sdpa with unbind, or explicit (q · scale @ kᵀ, softmax, @ v) with qkv[0], qkv[1], qkv[2]."""

    def __init__(self, dim: int, num_heads: int, form: str = "sdpa"):
        super().__init__()
        self.num_heads, self.head_dim, self.form = num_heads, dim // num_heads, form
        self.scale = self.head_dim ** -0.5
        self.qkv, self.q_norm, self.k_norm = nn.Linear(dim, dim * 3), nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.form == "sdpa" else (qkv[0], qkv[1], qkv[2])
        q, k = self.q_norm(q), self.k_norm(k)
        if self.form == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class ViTNet(nn.Module):
    """A ViT block between a patch embedding and its transposed convolution: LayerNorm -> attention -> residual ->
    LayerNorm -> MLP -> residual. `attention`: timm's (TimmAttention, `form`) or nn.MultiheadAttention called as
    attn(t, t, t) with batch_first True (need_weights False) or False (need_weights True)."""

    def __init__(self, attention: str = "timm", form: str = "sdpa", batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.patch, self.norm1, self.norm2 = nn.Conv2d(3, 32, 4, 4), nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = TimmAttention(32, 4, form) if attention == "timm" else \
            nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.out = nn.ConvTranspose2d(32, 3, 4, 4)

    def attend(self, t):
        if isinstance(self.attn, TimmAttention):
            return self.attn(t)
        if not self.batch_first:  # [positions, batch, features]
            t = t.transpose(0, 1)
        o = self.attn(t, t, t, need_weights=not self.batch_first)[0]
        return o if self.batch_first else o.transpose(0, 1)

    def forward(self, x):
        b, _, hh, ww = x.shape
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attend(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return torch.sigmoid(self.out(t.transpose(1, 2).reshape(b, 32, hh // 4, ww // 4)))


def vae(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(build_model(VAE_ARCH), seed)


def kl_autoencoder(seed: int) -> nn.Module:
    """aecurves' KLAutoencoder (diffusers' AutoencoderKL: residual GroupNorm blocks, SiLU, a mid-block with attention,
    quant_conv's μ/log σ² split), tiny; torch.fx cannot trace it, so its graph is a recording (capture.trace)."""
    pytest.importorskip("diffusers", reason="KLAutoencoder needs diffusers (the test extra installs it)")
    torch.manual_seed(seed)
    return randomize(build_model(KL_ARCH), seed)


KL_ARCH = {"model": "aecurves.models:KLAutoencoder", "channels": 3, "image_size": 16, "latent_dim": 128,
           "model_kwargs": {"block_out_channels": [8, 16], "norm_num_groups": 4}}


NETWORKS = {
    "kl-autoencoder": kl_autoencoder,
    "groupnorm": lambda seed: randomize(GroupNormNet(), seed),
    "vae": vae,
    "conv-posterior": lambda seed: randomize(ConvPosterior(), seed),
    "attention-1-head": lambda seed: randomize(AttentionNet(1), seed),
    "attention-2-heads": lambda seed: randomize(AttentionNet(2), seed),
    "attention-explicit-2-heads": lambda seed: randomize(AttentionNet(2, "explicit"), seed),
    "attention-baddbmm": lambda seed: randomize(AttentionNet(1, "baddbmm"), seed),
    "vit-timm": lambda seed: randomize(ViTNet("timm"), seed),
    "vit-timm-explicit": lambda seed: randomize(ViTNet("timm", "explicit"), seed),
    "vit-multihead": lambda seed: randomize(ViTNet("multihead"), seed),
    "vit-multihead-sequence-first": lambda seed: randomize(ViTNet("multihead", batch_first=False), seed),
}


def example(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- the groups found --------------------------------------------------------------------------------------------

def test_groupnorm_keeps_its_groups_together_and_layernorm_moves_with_the_channels():
    model = NETWORKS["groupnorm"](1).train()
    groups = {g.name: g for g in find_groups(model, example())}
    assert model.training  # traced in eval mode, then put back
    assert {n: (g.size, g.blocks, g.blocks_fixed) for n, g in groups.items()} == {
        "conv_in": (16, 4, False), "conv_down": (8, 2, False)}
    entries = set(groups["conv_in"].entries)
    assert {("norm1.weight", 0, 1), ("norm2.bias", 0, 1), ("ln.weight", 0, 1), ("ln.bias", 0, 1),
            ("conv_mid.weight", 0, 1), ("conv_mid.weight", 1, 1), ("conv_down.weight", 1, 1)} <= entries
    assert {("norm3.weight", 0, 1), ("conv_out.weight", 0, 1)} <= set(groups["conv_down"].entries)


def test_a_vae_posterior_moves_both_halves_with_one_permutation_and_is_not_a_latent():
    model = vae(1)
    groups = {g.name: g for g in find_groups(model, example())}
    latent = groups["encoder.3"]  # the Linear that writes [μ, log σ²]
    assert latent.size == 8 and latent.kind == "hidden"  # an invertible map would change the KL
    assert set(latent.entries) == {("encoder.3.weight", 0, 1, 2), ("encoder.3.bias", 0, 1, 2),
                                   ("decoder_input.weight", 1, 1)}
    assert latent.entries[0].repeat == 2 and latent.tap_layouts[latent.taps[0]].repeat == 2
    state = model.state_dict()
    moved = permute(state, [latent], {"encoder.3": torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])})
    w, w2 = state["encoder.3.weight"], moved["encoder.3.weight"]
    assert torch.equal(w2[0], w[1]) and torch.equal(w2[8], w[9]) and torch.equal(w2[9], w[8])  # μ and log σ² alike
    groups = {g.name: g for g in find_groups(randomize(ConvPosterior(), 0).train(), example())}
    assert set(groups["quant_conv"].entries) == {("quant_conv.weight", 0, 1, 2), ("quant_conv.bias", 0, 1, 2),
                                                 ("post_quant_conv.weight", 1, 1)}
    assert groups["enc"].size == 8 and groups["quant_conv"].size == 4


def test_attention_pairs_query_with_key_and_value_with_output_keeping_heads_in_place():
    for heads in (1, 2):
        groups = {g.name: g for g in find_groups(randomize(AttentionNet(heads), 0), example())}
        assert set(groups) == {"conv_in", "to_q", "to_v"}
        assert (groups["conv_in"].blocks, groups["conv_in"].blocks_fixed) == (2, False)  # GroupNorm(2, 8)
        assert (groups["to_q"].blocks, groups["to_v"].blocks) == ((heads, heads) if heads > 1 else (1, 1))
        assert groups["to_q"].blocks_fixed == groups["to_v"].blocks_fixed == (heads > 1)
        assert set(groups["to_q"].entries) == {("to_q.weight", 0, 1), ("to_q.bias", 0, 1), ("to_k.weight", 0, 1),
                                               ("to_k.bias", 0, 1)}
        assert set(groups["to_v"].entries) == {("to_v.weight", 0, 1), ("to_v.bias", 0, 1),
                                               ("to_out.0.weight", 1, 1)}
        assert {("to_q.weight", 1, 1), ("to_out.0.weight", 0, 1), ("to_out.0.bias", 0, 1),
                ("conv_out.weight", 1, 1)} <= set(groups["conv_in"].entries)
    with pytest.raises(ValueError, match="keep its 2 blocks of 4 units together and in place"):
        permute({}, [groups["to_q"]], {"to_q": torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])})  # moves a head


def test_fused_qkv_and_multihead_attention_pair_q_with_k_and_v_with_the_output_as_parts_of_one_axis():
    for net, qkv, proj in ((ViTNet("timm"), "attn.qkv", "attn.proj"),
                           (ViTNet("multihead"), "attn.in_proj", "attn.out_proj")):
        groups = {g.name: g for g in find_groups(randomize(net, 0), example())}
        assert set(groups) == {"patch", f"{qkv}[q]", f"{qkv}[v]", "mlp.0"}
        w, b = ("attn.qkv.weight", "attn.qkv.bias") if qkv == "attn.qkv" else ("attn.in_proj_weight",
                                                                               "attn.in_proj_bias")
        q, v = groups[f"{qkv}[q]"], groups[f"{qkv}[v]"]
        assert (q.size, q.blocks, q.blocks_fixed) == (v.size, v.blocks, v.blocks_fixed) == (32, 4, True)
        assert set(q.entries) == {(w, 0, 1), (w, 0, 1, 1, 32), (b, 0, 1), (b, 0, 1, 1, 32)}  # q's and k's rows
        assert set(v.entries) == {(w, 0, 1, 1, 64), (b, 0, 1, 1, 64), (f"{proj}.weight", 1, 1)}
        assert {(w, 1, 1), (f"{proj}.weight", 0, 1), (f"{proj}.bias", 0, 1)} <= set(groups["patch"].entries)
        state = net.state_dict()
        perm = torch.cat([torch.randperm(8, generator=torch.Generator().manual_seed(h)) + 8 * h for h in range(4)])
        moved = permute(state, [v], {v.name: perm})[w]
        assert torch.equal(moved[:64], state[w][:64]) and torch.equal(moved[64:], state[w][64:][perm])
        moved = permute(state, [q], {q.name: perm})[w]
        assert torch.equal(moved[32:64], state[w][32:64][perm]) and torch.equal(moved[64:], state[w][64:])


# --- permuted copies: the same function, recovered exactly -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_block_permuted_copy_is_the_same_function_and_weight_matching_recovers_it(name):
    model, x = NETWORKS[name](3), example()
    groups = find_groups(model, x)
    perms = block_perms(groups, seed=5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    state = model.state_dict()
    permuted = permute(state, groups, perms)
    for p, q in zip(outputs(model, x), outputs(model, x, permuted)):
        assert (p - q).abs().max() <= TOLERANCE * max(1.0, float(p.abs().max()))
    found = weight_matching(state, permuted, groups)
    for g in groups:
        assert torch.equal(found[g.name], torch.argsort(perms[g.name])), g.name
    acts = activation_matching(model, _loaded(model, permuted), groups, [x])  # the taps' layouts read right
    for g in groups:
        assert torch.equal(acts[g.name], torch.argsort(perms[g.name])), g.name


def _loaded(model: nn.Module, state: dict) -> nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other.eval()


def test_a_permutation_that_breaks_a_groupnorm_group_changes_the_function():
    """The block structure is needed: a swap of two channels of different norm groups changes the output."""
    model, x = NETWORKS["groupnorm"](3), example()
    groups = find_groups(model, x)
    (conv_in,) = [g for g in groups if g.name == "conv_in"]
    unconstrained = conv_in.__class__(**{**conv_in.__dict__, "blocks": 1})
    swap = torch.arange(16)
    swap[[0, 4]] = swap[[4, 0]]  # channel 0 is in norm group 0, channel 4 in group 1
    with pytest.raises(ValueError, match="keep its 4 blocks"):
        permute(model.state_dict(), [conv_in], {"conv_in": swap})
    state = permute(model.state_dict(), [unconstrained], {"conv_in": swap})
    assert (outputs(model, x)[0] - outputs(model, x, state)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_aligning_a_network_from_another_seed_keeps_its_function(name):
    a, b, x = NETWORKS[name](1), NETWORKS[name](2), example()
    groups = find_groups(b, x)
    perms = activation_matching(a, b, groups, [x, example(1)])
    perms = weight_matching(a.state_dict(), b.state_dict(), groups, init=perms, normalise=True)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    aligned = permute(b.state_dict(), groups, perms)
    for p, q in zip(outputs(b, x), outputs(b, x, aligned)):
        assert (p - q).abs().max() <= TOLERANCE * max(1.0, float(p.abs().max()))


# --- what stays refused, and what is now understood --------------------------------------------------------------

class TwoGroupNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.n2, self.n4, self.out = nn.Conv2d(3, 8, 3, 1, 1), nn.GroupNorm(2, 8), nn.GroupNorm(4, 8), \
            nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.out(self.n2(h) + self.n4(h))


class Noise(nn.Module):
    """A posterior sampled always: randn_like is i.i.d. noise and moves with μ; randn of another shape is refused."""

    def __init__(self, shape=None):
        super().__init__()
        self.enc, self.dec, self.shape = nn.Linear(3 * 16 * 16, 2 * 4), nn.Linear(4, 3 * 16 * 16), shape

    def forward(self, x):
        mu, logvar = torch.chunk(self.enc(x.flatten(1)), 2, dim=-1)
        shapes = {"same": lambda: mu.shape, "row": lambda: (1, mu.shape[1])}
        eps = torch.randn_like(mu) if self.shape is None else torch.randn(shapes.get(self.shape, lambda: self.shape)())
        z = mu + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * eps
        kl = 0.5 * torch.sum(torch.pow(mu, 2) + logvar.exp() - 1.0 - logvar, dim=1)
        return self.dec(z).view(x.shape), kl


class ChannelSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(1, 3, 3, 1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)).sum(1, keepdim=True)), self.a(x).mean(0)


def test_two_group_norms_with_different_counts_are_refused_naming_both():
    with pytest.raises(UserError, match=r"node 'n4' \(n4: GroupNorm\) and node 'n2' \(n2: GroupNorm\) split the 8 "
                                        r"units of conv into 4 and 2 blocks"):
        find_groups(TwoGroupNorms(), example())


def test_noise_like_the_mean_moves_with_it_and_noise_of_another_shape_is_refused():
    (group,) = find_groups(Noise(), example())
    assert group.name == "enc" and group.size == 4 and set(group.entries) == {
        ("enc.weight", 0, 1, 2), ("enc.bias", 0, 1, 2), ("dec.weight", 1, 1)}
    assert [g.name for g in find_groups(Noise("same"), example())] == ["enc"]  # torch.randn(μ.shape)
    with pytest.raises(UserError, match="broadcasting random noise of shape \\(1, 4\\) to \\(4, 4\\)"):
        find_groups(Noise("row"), example())
    # A shape known when tracing makes torch.fx draw once and keep the tensor: a constant, which pins the units.
    assert find_groups(Noise((4, 4)), example()) == []


def test_a_sum_over_the_units_ends_their_group_without_pinning_it_and_a_batch_mean_pins_it():
    with pytest.raises(UserError, match=r"node 'mean' .* over the batch axis"):
        find_groups(ChannelSum(), example())

    class Summed(ChannelSum):
        def forward(self, x):
            return self.out(torch.relu(self.a(x)).sum(1, keepdim=True))

    (group,) = find_groups(Summed(), example())
    model = randomize(Summed(), 2)
    state = permute(model.state_dict(), [group], {"a": torch.tensor([3, 1, 0, 2])})
    other = Summed()
    other.load_state_dict(state)
    with torch.no_grad():
        assert (model(example()) - other.eval()(example())).abs().max() <= TOLERANCE


# --- the block-exact assignment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, blocks, fixed", [(6, 2, False), (6, 3, False), (6, 2, True), (6, 3, True),
                                              (4, 4, False), (8, 2, False)])
def test_the_block_assignment_is_the_best_permutation_that_keeps_the_blocks(n, blocks, fixed):
    rng = np.random.default_rng(n * 10 + blocks)
    m = n // blocks

    def allowed(p):
        source = np.asarray(p).reshape(blocks, m) // m
        return (source == source[:, :1]).all() and (not fixed or (source[:, 0] == np.arange(blocks)).all())

    admissible = [p for p in itertools.permutations(range(n)) if allowed(p)]
    assert len(admissible) == (1 if fixed else math.factorial(blocks)) * math.factorial(m) ** (
        blocks if not fixed else blocks)
    for trial in range(10):
        cost = rng.normal(size=(n, n)) if trial % 2 else rng.integers(0, 3, size=(n, n)).astype(float)  # ties
        for maximize in (False, True):
            got = linear_assignment_blocks(cost, blocks, fixed, maximize=maximize)
            assert allowed(got) and sorted(got.tolist()) == list(range(n))
            totals = [cost[np.arange(n), list(p)].sum() for p in admissible]
            want = max(totals) if maximize else min(totals)
            assert cost[np.arange(n), got].sum() == pytest.approx(want, abs=1e-9)


def test_the_block_assignment_gives_up_the_unconstrained_optimum_to_keep_blocks():
    cost = np.zeros((4, 4))
    cost[0, 2] = cost[1, 1] = cost[2, 0] = cost[3, 3] = 1.0  # the best permutation mixes the blocks {0,1}, {2,3}
    assert linear_assignment_blocks(cost, 1, maximize=True).tolist() == [2, 1, 0, 3]
    got = linear_assignment_blocks(cost, 2, maximize=True)
    assert cost[np.arange(4), got].sum() == 2.0 and {tuple(sorted(got[:2])), tuple(sorted(got[2:]))} == {
        (0, 1), (2, 3)}
    with pytest.raises(UserError, match="scores of the units of g are not finite"):
        linear_assignment_blocks(np.full((4, 4), np.nan), 2, group="g")


# --- align on VAE endpoints ------------------------------------------------------------------------------------

DATA_ARGS = {"dataset": "synthetic", "data_dir": None, "image_size": 16, "limit": 96, "val_fraction": 0.1,
             "use_test": False}


@pytest.fixture(scope="module")
def vae_endpoints(tmp_path_factory):
    """Two ConvVAE endpoints from seeds 1 and 2 (random weights, as an endpoint checkpoint records them)."""
    root = tmp_path_factory.mktemp("vae_align")
    paths = []
    for seed in (1, 2):
        model = vae(seed)
        args = {**DATA_ARGS, **VAE_ARCH, "loss": "mse", "seed": seed, "lr": 1e-3, "epochs": 1, "kl_weight": 1.0}
        paths.append(root / f"seed{seed}.pt")
        save_checkpoint(paths[-1], {"kind": "endpoint", "model": model.state_dict(), "optimizer": {}, "epoch": 1,
                                    "args": args, "metrics": []})
    return paths


@pytest.mark.parametrize("latent", ["orthogonal", "linear"])
def test_align_refuses_an_invertible_latent_map_on_a_vae(vae_endpoints, tmp_path, capsys, latent):
    a, b = vae_endpoints
    out = tmp_path / "aligned.pt"
    code = run_cli("align", "--init_start", a, "--init_end", b, "--out", out, "--latent", latent, "--images", 32,
                   "--no-progress")
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"--latent {latent}" in err and "VAE" in err and "--latent permutation" in err


def test_align_on_vaes_keeps_b_function_and_records_it(vae_endpoints, tmp_path, capsys):
    a, b = vae_endpoints
    out = tmp_path / "aligned.pt"
    assert run_cli("align", "--init_start", a, "--init_end", b, "--out", out, "--images", 32, "--no-progress") == 0
    assert "(a VAE: permutation only)" in capsys.readouterr().out
    aligned, original = load_checkpoint(out, "endpoint"), load_checkpoint(b, "endpoint")
    assert aligned["aligned_to"]["vae"] is True and aligned["aligned_to"]["units_moved"] > 0
    assert aligned["aligned_to"]["groups"]["encoder.3"] == 8
    nets = [build_model(VAE_ARCH) for _ in range(2)]
    for net, state in zip(nets, (original["model"], aligned["model"])):
        net.load_state_dict(state)
    x = example()
    for p, q in zip(outputs(nets[0], x), outputs(nets[1], x)):
        assert (p - q).abs().max() <= TOLERANCE * max(1.0, float(p.abs().max()))
    assert check_same_function(VAE_ARCH, original["model"], aligned["model"], None, x, "cpu") <= TOLERANCE


class CrossAttention(nn.Module):
    """nn.MultiheadAttention whose key and value are another group's units (or of another width: kdim)."""

    def __init__(self, kdim: int | None = None):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(3, kdim or 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        u = self.b(t)
        return self.out(self.attn(self.a(t), u, u, need_weights=False)[0]).transpose(1, 2).reshape(x.shape)


class FusedOutputReused(TimmAttention):
    """The fused qkv output also read as a whole: its parts cannot be permuted apart."""

    def forward(self, x):
        y = self.qkv(x)
        q, k, v = y.reshape(*x.shape[:2], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.proj(o) + y.sum(-1, keepdim=True)


class Tokens(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed, self.attention = nn.Linear(3, 8), attention

    def forward(self, x):
        return self.attention(self.embed(x.flatten(2).transpose(1, 2)))


def test_cross_attention_and_other_multihead_forms_are_refused_naming_the_module():
    with pytest.raises(UserError, match=r"node 'attn' \(attn: MultiheadAttention\) has a key or value other than "
                                        r"its query \(cross-attention\)"):
        find_groups(CrossAttention(), example())
    with pytest.raises(UserError, match=r"\(attn: MultiheadAttention\) has kdim or vdim other than embed_dim"):
        find_groups(CrossAttention(kdim=4), example())

    class Masked(ViTNet):
        def attend(self, t):
            mask = torch.zeros(t.shape[1], t.shape[1], dtype=torch.bool)
            return self.attn(t, t, t, need_weights=False, attn_mask=mask)[0]

    with pytest.raises(UserError, match=r"\(attn: MultiheadAttention\) has an attention mask"):
        find_groups(Masked("multihead"), example())


def test_a_fused_projection_read_whole_as_well_as_in_parts_is_refused():
    with pytest.raises(UserError, match=r"cutting the units of attention.qkv into 3 parts, understood only right "
                                        "after the Linear"):
        find_groups(Tokens(FusedOutputReused(8, 2)), example())
    (group,) = [g for g in find_groups(Tokens(TimmAttention(8, 2)), example()) if g.name == "attention.qkv[v]"]
    assert group.blocks == 2 and ("attention.proj.weight", 1, 1) in group.entries
