"""The one rule for "a layer's output is read only by BatchNorm" (capture.read_only_by_batchnorm), on a table of small
models whose answer is known, and how its two users apply it: --renormalize covers exactly those layers
(renormalize.find_layers), alignment folds the BatchNorm into those that one BatchNorm with running statistics reads
(symmetry.batchnorm_after)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aecurves import capture, renormalize, symmetry


class Net(nn.Module):
    """Named modules and a forward function of (self, x): one small model per row of the table."""

    def __init__(self, forward, **modules):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.run = forward

    def forward(self, x):
        return self.run(self, x)


class MyNorm(nn.BatchNorm2d):
    """A user's BatchNorm."""


def conv(c_in=3, c_out=4):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def bn(c=4, **kwargs):
    return nn.BatchNorm2d(c, **kwargs)


def functional_bn(m, x):
    return F.batch_norm(m.conv(x), m.mean, m.var)


def with_stats():
    model = Net(functional_bn, conv=conv())
    model.register_buffer("mean", torch.zeros(4))
    model.register_buffer("var", torch.ones(4))
    return model


IMAGE = (2, 3, 8, 8)
# name: (model, input shape, read_only_by_batchnorm's answer, batchnorm_after's answer)
TABLE = {
    "BN right after a conv": (lambda: Net(lambda m, x: m.bn(m.conv(x)), conv=conv(), bn=bn()), IMAGE,
                              {"conv": ("bn",)}, {"conv": "bn"}),
    "conv, ReLU, then BN": (lambda: Net(lambda m, x: m.bn(torch.relu(m.conv(x))), conv=conv(), bn=bn()), IMAGE,
                            {}, {}),
    "read by BN and by a residual sum": (lambda: Net(lambda m, x: (lambda h: m.bn(h) + h)(m.conv(x)),
                                                     conv=conv(), bn=bn()), IMAGE, {}, {}),
    "read by BN and by a ReLU": (lambda: Net(lambda m, x: (lambda h: m.bn(h) + torch.relu(h))(m.conv(x)),
                                             conv=conv(), bn=bn()), IMAGE, {}, {}),
    "read by two BatchNorms": (lambda: Net(lambda m, x: (lambda h: m.bn1(h) + m.bn2(h))(m.conv(x)),
                                           conv=conv(), bn1=bn(), bn2=bn()), IMAGE,
                               {"conv": ("bn1", "bn2")}, {}),  # one weight cannot take two BatchNorms' scales
    "conv then GroupNorm": (lambda: Net(lambda m, x: m.gn(m.conv(x)), conv=conv(), gn=nn.GroupNorm(2, 4)), IMAGE,
                            {}, {}),
    "conv then InstanceNorm with running statistics": (
        lambda: Net(lambda m, x: m.norm(m.conv(x)), conv=conv(), norm=nn.InstanceNorm2d(4, track_running_stats=True)),
        IMAGE, {}, {}),
    "BN in eval mode": (lambda: Net(lambda m, x: m.bn(m.conv(x)), conv=conv(), bn=bn()).eval(), IMAGE,
                        {"conv": ("bn",)}, {"conv": "bn"}),
    "BN without running statistics": (lambda: Net(lambda m, x: m.bn(m.conv(x)), conv=conv(),
                                                  bn=bn(track_running_stats=False)), IMAGE,
                                      {"conv": ("bn",)}, {}),  # it normalises by each batch: nothing to fold
    # a BatchNorm defined outside torch.nn is no leaf module for torch.fx: traced into, it is functional batch_norm
    "a subclass of BatchNorm2d": (lambda: Net(lambda m, x: m.bn(m.conv(x)), conv=conv(), bn=MyNorm(4)), IMAGE,
                                  {}, {}),
    "BN given its input by keyword": (lambda: Net(lambda m, x: m.bn(input=m.conv(x)), conv=conv(), bn=bn()), IMAGE,
                                      {"conv": ("bn",)}, {"conv": "bn"}),
    "shape queries read no data": (lambda: Net(lambda m, x: (lambda h: m.bn(h).view(h.shape).view(h.size(0), -1))(
        m.conv(x)), conv=conv(), bn=bn()), IMAGE, {"conv": ("bn",)}, {"conv": "bn"}),
    "BN on a reshaped output": (lambda: Net(lambda m, x: m.bn(m.conv(x).flatten(2).mean(2)), conv=conv(),
                                            bn=nn.BatchNorm1d(4)), IMAGE, {}, {}),
    "functional batch_norm": (with_stats, IMAGE, {}, {}),  # no BatchNorm module to recompute or fold
    "Linear then BatchNorm1d": (lambda: Net(lambda m, x: m.bn(m.fc(x.flatten(1))), fc=nn.Linear(192, 5),
                                            bn=nn.BatchNorm1d(5)), IMAGE, {"fc": ("bn",)}, {"fc": "bn"}),
    "ConvTranspose then BN": (lambda: Net(lambda m, x: m.bn(m.up(x)), up=nn.ConvTranspose2d(3, 4, 2, 2), bn=bn()),
                              IMAGE, {"up": ("bn",)}, {"up": "bn"}),
    "Conv1d and Conv3d": (lambda: Net(lambda m, x: m.bn3(m.c3(x.unsqueeze(2))).sum() + m.bn1(m.c1(x.flatten(2))).sum(),
                                      c1=nn.Conv1d(3, 4, 1), bn1=nn.BatchNorm1d(4), c3=nn.Conv3d(3, 4, 1),
                                      bn3=nn.BatchNorm3d(4)), IMAGE,
                          {"c3": ("bn3",), "c1": ("bn1",)}, {"c1": "bn1", "c3": "bn3"}),
    "called twice, BN after each call": (lambda: Net(lambda m, x: m.bn(m.conv(m.bn(m.conv(m.stem(x))))),
                                                     stem=conv(), conv=conv(4, 4), bn=bn()), IMAGE,
                                         {"conv": ("bn",)}, {"conv": "bn"}),
    "called twice, BN after one call only": (lambda: Net(lambda m, x: torch.relu(m.conv(m.bn(m.conv(m.stem(x))))),
                                                         stem=conv(), conv=conv(4, 4), bn=bn()), IMAGE, {}, {}),
    "an unused output": (lambda: Net(lambda m, x: (m.dead(x), m.bn(m.conv(x)))[1], conv=conv(), dead=conv(), bn=bn()),
                         IMAGE, {"conv": ("bn",)}, {"conv": "bn"}),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_the_rule_finds_exactly_the_layers_only_batchnorm_reads(name):
    make, shape, want, _ = TABLE[name]
    model = make()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    found = capture.read_only_by_batchnorm(capture.trace(model, x))  # torch.fx's graph where it traces
    assert found == want
    assert list(found) == list(want)  # in forward order
    # a recording of one run (the graph of a model fx cannot trace) gives the same answer
    assert capture.read_only_by_batchnorm(capture.record(model, x)) == want


@pytest.mark.parametrize("name", list(TABLE))
def test_renormalize_covers_and_alignment_folds_by_the_same_rule(name):
    make, shape, want, folded = TABLE[name]
    model = make()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    plan = renormalize.find_layers(model, include_output=True, example=x)
    assert plan.covered == list(want)
    assert not set(plan.covered) & (set(plan.names) | set(plan.skipped))  # a covered layer is never corrected
    assert symmetry.batchnorm_after(model, x) == folded


def test_a_layer_read_by_batchnorm_at_one_call_only_is_called_twice_for_renormalize():
    make = TABLE["called twice, BN after one call only"][0]
    plan = renormalize.find_layers(make(), include_output=True)
    assert "called 2 times" in plan.skipped["conv"] and plan.covered == []
