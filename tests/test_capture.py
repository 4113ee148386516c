"""capture.trace: torch.fx's graph where fx can trace the model, else a recording of one run on an example."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from aecurves import capture, renormalize, symmetry
from aecurves.commands import align
from aecurves.errors import UserError
from aecurves.models import ConvAutoencoder, ConvVAE

from ae_models import mlp_autoencoder, upsample_autoencoder

SHAPE_QUERIES = {"size", "dim"}


def _ops(gm: fx.GraphModule) -> list:
    """(op, target) of every node but shape queries, which fx records and a recording reads as plain ints."""
    shape_nodes, ops = set(), []
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in SHAPE_QUERIES \
                or node.op == "call_function" and node.target is getattr and node.args[1] == "shape" \
                or node.op == "call_function" and node.target is operator.getitem and node.args[0] in shape_nodes:
            shape_nodes.add(node)
        else:
            ops.append((node.op, node.target))
    return ops


def _groups(groups) -> list:
    return [(g.name, g.size, sorted(g.entries), g.kind, g.taps) for g in groups]


def _refuse_fx(monkeypatch):
    def refuse(model, example):
        raise RuntimeError("fx refused (test)")
    monkeypatch.setattr(capture, "_by_fx", refuse)


def _close(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)


MODELS = {
    "ConvAutoencoder": lambda: ConvAutoencoder(3, 16, 8, 4),
    "ConvVAE": lambda: ConvVAE(3, 16, 8, 4),
    "mlp_autoencoder": lambda: mlp_autoencoder(3, 16, 8, hidden=12),
    "upsample_autoencoder": lambda: upsample_autoencoder(3, 16, 8, width=4),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_recorder_gives_the_graph_fx_traces(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.rand(2, 3, 16, 16)
    recorded, traced = capture.record(model, x), fx.symbolic_trace(model.eval())
    assert _ops(recorded) == _ops(traced)
    with torch.no_grad():
        assert _close(recorded(x), model(x))
    assert all("tensor_meta" in n.meta for n in recorded.graph.nodes if n.op != "output")


@pytest.mark.parametrize("name", ["ConvAutoencoder", "mlp_autoencoder", "upsample_autoencoder"])
def test_find_groups_on_the_recorded_graph_equals_fx(name, monkeypatch):
    torch.manual_seed(0)
    model, x = MODELS[name](), torch.full((2, 3, 16, 16), 0.5)
    by_fx, pairs = _groups(symmetry.find_groups(model, x)), symmetry.batchnorm_after(model)
    assert by_fx
    _refuse_fx(monkeypatch)
    assert _groups(symmetry.find_groups(model, x)) == by_fx
    assert symmetry.batchnorm_after(model, x) == pairs


class Branchy(nn.Module):
    """conv-BN-ReLU twice, with a residual connection only for inputs wider than 8: fx cannot trace the branch."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.drop = nn.ReLU(), nn.Dropout(0.5)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        y = self.drop(self.act(self.bn2(self.conv2(h))))
        if x.shape[-1] > 8:
            y = y + h
        return torch.sigmoid(self.out(y)).view(x.shape)  # a recording keeps the example's batch size here


def _branchy():
    torch.manual_seed(0)
    model = Branchy()
    with torch.no_grad():  # statistics that are not the identity, so a changed one would show
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _entries(group) -> set:
    return {(e[0], e[1]) for e in group.entries}


CONV_BN = {("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("bn1.running_mean", 0),
           ("bn1.running_var", 0)}
CONV_BN2 = {(name.replace("1", "2"), axis) for name, axis in CONV_BN}


def test_a_branch_on_the_input_shape_is_captured_where_fx_fails():
    model, x = _branchy().eval(), torch.full((2, 3, 16, 16), 0.5)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    gm = capture.trace(model, x)
    with torch.no_grad():
        assert _close(gm(x), model(x))
    assert ("call_function", operator.add) in _ops(gm)  # the wide input's branch, recorded
    # the residual joins both convolutions' channels into one group
    [group] = symmetry.find_groups(model, x)
    assert group.size == 8
    assert _entries(group) == CONV_BN | CONV_BN2 | {("conv2.weight", 1), ("out.weight", 1)}
    # a narrow input takes the other branch: two groups
    narrow = symmetry.find_groups(model, torch.full((2, 3, 8, 8), 0.5))
    assert [_entries(g) for g in narrow] == [CONV_BN | {("conv2.weight", 1)}, CONV_BN2 | {("out.weight", 1)}]
    assert symmetry.batchnorm_after(model, x) == {"conv1": "bn1", "conv2": "bn2"}
    assert renormalize.find_layers(model, include_output=True, example=x).names == ["out"]


def test_without_an_example_a_model_fx_cannot_trace_is_refused():
    with pytest.raises(UserError, match="no example input"):
        renormalize.find_layers(_branchy())


def test_unit_activations_capture_each_batch_size():
    model, x = _branchy(), torch.rand(5, 3, 16, 16)
    [group] = symmetry.find_groups(model, x[:2])
    tap = next(n for n in capture.trace(model, x[:2]).graph.nodes if n.name == group.taps[0])
    assert tap.target == "conv1"  # the writer's output
    # batches of 3 and 2: each needs its own recording (Branchy's last view is to the batch's shape)
    acts = align._unit_activations(model, [group], [x[:3], x[3:]], "pre")
    seen = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    want = seen[0].transpose(0, 1).reshape(8, -1).double()
    assert acts[group.name].shape == (8, 5 * 16 * 16)
    assert torch.allclose(acts[group.name], want, atol=1e-6)


def test_capture_leaves_the_rng_the_batchnorm_statistics_and_the_modes_alone():
    model = _branchy()
    model.train()
    model.drop.eval()  # a mixed state, restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for traceable in (False, True):
        net = model if not traceable else ConvAutoencoder(3, 16, 8, 4).train()
        torch.manual_seed(123)
        state = torch.get_rng_state()
        capture.trace(net, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(torch.get_rng_state(), state)
        assert all(m.training for m in net.modules() if m is not model.drop)
    assert not model.drop.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class Operators(nn.Module):
    """Python operators, methods, functions and a chunk, as fx records them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        h = self.conv(x)
        if h.shape[1] == 4:  # fx cannot trace this
            h = 2 - h * self.scale
        h += x.mean(1, keepdim=True)
        a, b = h.chunk(2, dim=1)
        h = torch.cat([F.relu(b), a], dim=1).view(x.shape[0], 4, -1)
        return h.view(x.shape[0], 4, x.shape[2], x.shape[3])[:, :3]


def test_operators_methods_and_functions_get_fx_targets():
    model, x = Operators(), torch.rand(2, 3, 8, 8)
    gm = capture.trace(model, x)
    nodes = [(n.op, n.target) for n in gm.graph.nodes]
    assert nodes == [
        ("placeholder", "x"), ("call_module", "conv"), ("get_attr", "scale"),
        ("call_function", operator.mul), ("call_function", operator.sub), ("call_method", "mean"),
        ("call_function", operator.add), ("call_method", "chunk"), ("call_function", operator.getitem),
        ("call_function", operator.getitem), ("call_function", F.relu), ("call_function", torch.cat),
        ("call_method", "view"), ("call_method", "view"), ("call_function", operator.getitem), ("output", "output")]
    sub = next(n for n in gm.graph.nodes if n.target is operator.sub)
    assert sub.args[0] == 2  # 2 - h: reflected back into fx's order
    with torch.no_grad():
        assert _close(gm(x), model(x))


class ItemScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) * float(x.mean())  # a value the recorder cannot see: baked in as a constant


def test_a_value_the_recorder_cannot_see_is_refused_naming_both_reasons():
    with pytest.raises(UserError) as info:
        capture.trace(ItemScaled(), torch.full((2, 3, 8, 8), 0.5), "aligning")
    message = str(info.value)
    assert "torch.fx cannot trace it" in message
    assert "differs from the model's" in message and "second input" in message
    assert "tuple of tensors" in message  # what the user can do


# --- diffusers' AutoencoderKL ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        latent_channels=2, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2)


class KLWrapper(nn.Module):
    """Images -> (reconstruction, kl) as aecurves' VAEs return them, decoding the posterior's mode."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior.kl()


def test_diffusers_autoencoder_kl_is_captured(diffusers_vae):
    model, x = KLWrapper(diffusers_vae), torch.rand(2, 3, 16, 16)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    gm = capture.trace(model, x)
    with torch.no_grad():
        want = model.eval()(x)
        assert _close(gm(x), want)
    assert want[1].shape == (2,)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(model.named_modules())
    norms = {name for name, m in modules.items() if isinstance(m, nn.GroupNorm)}
    qkv = {name for name in modules if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")}
    assert len(norms) > 4 and len(qkv) == 6
    assert norms | qkv <= called
    assert all(isinstance(modules[name], nn.Linear) for name in qkv)
    assert any(n.op == "call_function" and n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)


def test_a_dataclass_output_is_refused(diffusers_vae):
    with pytest.raises(UserError, match="returns DecoderOutput, not a tensor or a tuple of tensors"):
        capture.trace(diffusers_vae, torch.rand(2, 3, 16, 16))


def test_find_groups_on_diffusers_autoencoder_kl(diffusers_vae):
    """Every op of AutoencoderKL is understood through the recording: GroupNorm's blocks, the attention's q/k and
    v/o groups, quant_conv's μ/log σ² halves (tests/test_symmetry_modern.py permutes and aligns it)."""
    groups = {g.name: g for g in symmetry.find_groups(KLWrapper(diffusers_vae), torch.rand(2, 3, 16, 16))}
    assert any(g.blocks > 1 for g in groups.values())  # norm_num_groups 4: channels move within their group
    attention = sorted(name for name in groups if name.endswith(("to_q", "to_v")))
    assert attention == [f"vae.{part}.mid_block.attentions.0.{layer}" for part in ("decoder", "encoder")
                         for layer in ("to_q", "to_v")]  # the encoder's and the decoder's mid-block


def test_aecurves_kl_autoencoder_is_captured(diffusers_vae):
    kl_autoencoder = pytest.importorskip("aecurves.kl_autoencoder")
    torch.manual_seed(0)
    model = kl_autoencoder.KLAutoencoder(3, 16, 128, block_out_channels=(8, 16), norm_num_groups=4).eval()
    x = torch.rand(2, 3, 16, 16)
    gm = capture.trace(model, x)
    with torch.no_grad():
        assert _close(gm(x), model(x))
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
