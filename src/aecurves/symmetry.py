"""Permutation symmetries of an autoencoder, and weight matching (Ainsworth et al., "Git Re-Basin", 2023).

Hidden units can be reordered without changing what a network computes, as long as every layer that writes a
unit and every layer that reads it are reordered together. Two independently trained autoencoders may differ by
such a reordering, and the straight line between them may cross a loss barrier only because of it: aligning one
to the other first asks whether anything else is left.

find_groups traces a model with torch.fx in eval mode (a branch on self.training takes its eval side) and returns
its groups of hidden channels/units, each with the (state-dict key, axis, block[, repeat[, offset]]) entries that
move with it. Every tensor that carries units has a layout: the axis they run along (axis 1 of a conv's tensor,
the last of a Linear's, wherever transpose/permute/view then send it), the block of consecutive indices a unit
owns, the repeats (copies of the layout along the axis), and for attention the axis of its heads. Understood:
  - Conv1d/2d/3d and ConvTranspose1d/2d/3d with groups=1 (a transposed convolution's weight is [in, out, ...],
    so its axes are the other way round), Linear on the last axis of [batch, ..., features], BatchNorm/
    InstanceNorm (weight, bias, running_mean, running_var; num_batches_tracked is a count, not per channel),
    PReLU, LayerNorm (over the units: weight and bias move with them);
  - GroupNorm(G, C): each run of C/G channels has its own statistics, so the group gets `blocks` = G: runs move
    as wholes and channels within their run (GroupNorm(1, C): any permutation). Two GroupNorms with different
    G on the same units are refused;
  - ops that act per element or per channel: activations (SiLU, GELU(approximate=...) included), softmax,
    dropout, F.pad of other axes, upsampling/interpolation and pooling (on axis 1), as modules, torch or F
    functions, or tensor methods;
  - flatten/view/reshape/unflatten that keep the batch axis: a channel then owns a contiguous block of features
    (conv [C, H, W] -> Flatten -> Linear: channel c is in-features c*H*W .. (c+1)*H*W - 1; Linear -> view to
    [C, H, W] -> conv: the Linear's outputs move in blocks of H*W); [B, C, H, W] -> [B, C, HW] -> transpose to
    [B, HW, C]; the last axis split into [heads, C / heads] and merged back;
  - chunk/split of the units' axis into equal pieces (a VAE's [μ, log σ²]): each piece is a repeat, moved by
    the same permutation (Entry.repeat: unit u owns indices u and L + u of the writer's outputs);
    torch.randn_like, and torch.randn of the same shape, are i.i.d. noise that moves with what it meets;
  - sums, means, max/min over the units' axis (a VAE's KL): the same for every order, so the group ends there
    without being pinned; over other axes (not the batch) the units' axis stays;
  - attention: q @ kᵀ (matmul, bmm, baddbmm with beta=0) and F.scaled_dot_product_attention make q's and k's
    units one group; the result of (scores @ v) holds v's units. With heads > 1 the heads stay in place
    (blocks fixed) and units move within their head: moving heads would have to move q/k's and v's heads
    together, one permutation across two groups, which is not expressed here;
  - fused attention projections: a Linear(C, 3C) whose output goes straight to a view [..., 3, heads, C / heads]
    (timm's qkv), then transpose/permute, unbind or indexing of the parts' axis: each part becomes its own
    run of units, its entries covering part of the Linear's axis (Entry.offset), q's and k's then one group as
    above; nn.MultiheadAttention as self-attention (query, key and value one tensor, no masks, no kdim/vdim):
    in_proj's rows hold q and k (one group) and v (with out_proj's columns), each within its head, and
    out_proj writes the output's units (item 0 of its tuple). A transpose may move the batch axis
    ([positions, batch, features] without batch_first) as long as the units do not land on axis 0;
  - element-wise add/sub/mul/div: hidden tensors of two groups become one group (a residual connection); a
    parameter combined with a hidden tensor moves with it; any other tensor that is never permuted (the input,
    a constant) pins the units it meets, which are then no group.
The input's and the output's channels are image channels and are never permuted; a tuple returned pins what it
holds (a [B] KL holds no units). Any other op that a tensor written by a layer reaches (cat, a matmul with a
parameter, a cumsum, a grouped convolution, ...) raises UserError naming the node, even when it would only touch
the output's channels: a group is reported only when every op that writes or reads it is understood, so a
permutation found here can never change the function.

A Linear that writes the code z, read by Linears with nothing in between, is a group of kind "latent": there any
invertible matrix M, not only a permutation, leaves the function unchanged (apply_latent_map). A VAE's posterior
is never one (its chunk makes the group "hidden"): a rotation would change the KL of a diagonal Gaussian.

Matching keeps the blocks: linear_assignment_blocks solves the assignment exactly over block-keeping
permutations (the best assignment within each pair of blocks, then the best assignment of blocks).
"""

import math
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from aecurves import capture
from aecurves.errors import UserError


class Entry(tuple):
    """(name, axis, block): the state-dict key, the tensor axis the group's units run along, and how many
    consecutive indices along it belong to one unit. `repeat`: the axis holds that many copies of the units'
    layout one after another, all moved by the same permutation (a VAE's Linear that writes μ and log σ², then
    chunked in halves: unit u owns indices u and size + u). `offset`: the units' layout starts at this index and
    covers only part of the axis (a fused qkv Linear: q, k and v are three parts of its outputs; the indices
    outside the part do not move). Each extra element is written only when it is not its default, so an entry
    compares equal to the plain tuple (name, axis, block) it always was."""

    def __new__(cls, name: str, axis: int, block: int, repeat: int = 1, offset: int = 0):
        extra = (repeat, offset) if offset else (repeat,) if repeat != 1 else ()
        return super().__new__(cls, (name, axis, block) + extra)

    name = property(lambda self: self[0])
    axis = property(lambda self: self[1])
    block = property(lambda self: self[2])
    repeat = property(lambda self: self[3] if len(self) > 3 else 1)
    offset = property(lambda self: self[4] if len(self) > 4 else 0)

    def _replace(self, **changes) -> "Entry":
        return Entry(**{**{k: getattr(self, k) for k in ("name", "axis", "block", "repeat", "offset")}, **changes})

    def __repr__(self) -> str:
        return f"Entry{tuple(self)!r}"


class TapLayout(NamedTuple):
    """Where a tapped tensor holds its group's units: along `axis`, `block` consecutive indices a unit, `repeat`
    copies (as Entry); with `heads`, the units are split over two axes, attention heads (`heads`) and the
    features within a head (`axis`): unit-index = head * features-per-head + feature. `project`: (weight key,
    bias key or None, offset): the units are not a tensor of the graph (inside nn.MultiheadAttention) but rows
    offset .. offset + size - 1 of that Linear projection of the tapped tensor, whose `axis` it reads."""
    axis: int
    block: int = 1
    repeat: int = 1
    heads: int | None = None
    project: tuple | None = None


@dataclass
class Group:
    """Units that must be permuted together: `size` of them, laid out in every tensor named in `entries`."""
    name: str  # the module that writes the units
    size: int
    entries: list[Entry]
    kind: str = "hidden"  # "latent": a Linear -> Linear code, where any invertible map is a symmetry
    # fx node names of the tensors that carry the units, in forward order, reshapes left out: the first is the
    # writer's output, the last the units as the next layer reads them (e.g. after BatchNorm and ReLU)
    taps: list = field(default_factory=list)
    # The units fall into `blocks` equal runs of consecutive units that a permutation must keep together: the
    # channels of one GroupNorm group (the runs move as wholes, blocks_fixed False) or of one attention head
    # (each run stays where it is, blocks_fixed True: the heads of q/k and of v/out would have to move together).
    blocks: int = 1
    blocks_fixed: bool = False
    tap_layouts: dict = field(default_factory=dict)  # tap name -> TapLayout


# --- what the tracer understands -------------------------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Each acts on every element on its own, so it commutes with a permutation along any axis.
_PER_ELEMENT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax)
# These treat axis 1 as channels and the axes after it as space: understood only where the units are on axis 1.
_SPATIAL_MODULES = (
    nn.Upsample, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PER_ELEMENT_FUNCTIONS = {
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp, torch.pow,
    torch.square, torch.sqrt, torch.rsqrt, torch.log, operator.neg, operator.pow, F.relu, F.relu_, F.relu6,
    F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu, F.mish, F.softplus, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.logsigmoid, F.tanh, F.sigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax}
_SPATIAL_FUNCTIONS = {
    F.interpolate, F.upsample, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_PER_ELEMENT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "abs", "neg",
                        "clamp", "clamp_", "clamp_min", "clamp_max", "square", "pow", "sqrt", "rsqrt", "log",
                        "softmax", "log_softmax"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16", "type"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.permute, torch.movedim, torch.swapaxes}
_TRANSPOSE_METHODS = {"transpose", "permute", "movedim", "swapaxes"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split}
_SPLIT_METHODS = {"chunk", "split"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.baddbmm}
_MATMUL_METHODS = {"matmul", "bmm"}
# Draws of i.i.d. noise: a permutation of such a draw is as likely as the draw, so it moves with what it meets.
_NOISE_FUNCTIONS = {torch.randn, torch.randn_like, torch.rand, torch.rand_like}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim"}
_UNDERSTOOD = ("understood: convolutions with groups=1, Linear on the last axis, batch/instance/group/layer norm, "
               "per-element activations, softmax, dropout, pooling, upsampling, flatten/view/unflatten, transpose/"
               "permute, chunk/split, element-wise add/sub/mul/div, sums and means, attention (matmul, "
               "scaled_dot_product_attention, a fused qkv Linear, nn.MultiheadAttention as self-attention)")


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(modules[node.target]).__name__}"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    return f"the function {getattr(node.target, '__name__', node.target)}"


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@dataclass
class _Space:
    """One run of units, as the tracer finds it; merged with others when they meet."""
    name: str
    size: int
    entries: list = field(default_factory=list)  # [name, axis, block, repeat], lists so coarsening can update them
    uses: set = field(default_factory=set)       # kinds of op it went through: decides "latent"
    fixed: bool = False                          # reaches the output or an unpermuted tensor
    taps: list = field(default_factory=list)     # nodes carrying the units (see Group.taps)
    blocks: int = 1                              # see Group.blocks
    blocks_fixed: bool = False
    blocks_by: str = ""                          # what imposed the blocks, for messages
    projected: dict = field(default_factory=dict)  # tap node -> TapLayout, for taps that project (see TapLayout)


class _Layout(NamedTuple):
    """How a tensor holds a space's units: along `axis`, index i is unit (i mod size*block) // block; with `heads`,
    the units are split over the axes `heads` and `axis` (see TapLayout)."""
    space: int
    block: int
    axis: int = 1
    repeat: int = 1
    heads: int | None = None


class _Tracer:
    """Walks the graph once. Every tensor that may be permuted has a _Layout; tensors without one are never
    permuted. The output of chunk/split (a tuple) has the layout each of its pieces will have."""

    def __init__(self, gm: fx.GraphModule, keys: set):
        self.modules = dict(gm.named_modules())
        self.keys = keys
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layout: dict = {}
        self.tuples: dict = {}  # chunk/split node -> the _Layout of every piece
        self.noise: set = set()  # nodes that are a fresh draw of i.i.d. noise
        self.owner: dict = {}  # (key, axis) -> (space id, entry): a module called twice shares its units
        # A tensor whose axis `part` cuts a fused Linear's outputs into parts (qkv): node -> (part axis, the
        # _Layout of each part, with axes counted in the whole tensor)
        self.fused: dict = {}
        self.items: dict = {}  # node of a tuple whose items differ: item index -> its _Layout (unbind, MHA)
        self.parted: set = set()  # (key, axis) whose axis is cut into parts (Entry.offset), for find_groups' check

    # -- spaces -----------------------------------------------------------------------------------------------

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def root(self, node) -> _Space:
        return self.spaces[self.find(self.layouts_of(node)[0].space)]

    def layouts_of(self, node) -> list:
        """Every _Layout a node holds (one for a tensor, one per part or item for a fused tensor or a tuple)."""
        if node in self.layout:
            return [self.layout[node]]
        if node in self.tuples:
            return [self.tuples[node]]
        if node in self.fused:
            return list(self.fused[node][1])
        return list(self.items.get(node, {}).values())

    def holds(self, node) -> bool:
        return bool(self.layouts_of(node)) if isinstance(node, fx.Node) else False

    def new_space(self, name: str, size: int) -> int:
        self.spaces.append(_Space(name, size))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def relayout(self, root: int, **scale) -> None:
        """Multiply the block or repeat of every layout of the space (after coarsen or split_repeats)."""
        def scaled(lay):
            if self.find(lay.space) != root:
                return lay
            return lay._replace(**{k: getattr(lay, k) * v for k, v in scale.items()})

        for table in (self.layout, self.tuples):
            for n, lay in table.items():
                table[n] = scaled(lay)
        for n, (part, lays) in self.fused.items():
            self.fused[n] = (part, tuple(scaled(lay) for lay in lays))
        for n, lays in self.items.items():
            self.items[n] = {i: scaled(lay) for i, lay in lays.items()}

    def coarsen(self, root: int, k: int, node: fx.Node) -> None:
        """Merge every k consecutive units into one: a reshape showed that they can only move together."""
        if k == 1:
            return
        space = self.spaces[root]
        if space.size % k:
            raise UserError(f"symmetry: node '{node.name}' splits the {space.size} units of {space.name} into "
                            f"blocks of {k}, which do not line up; cannot align this model.")
        per = space.size // space.blocks
        if space.blocks > 1 and per % k:
            if k % per or space.blocks_fixed:
                raise UserError(f"symmetry: node '{node.name}' merges the units of {space.name} in blocks of {k}, "
                                f"across the {space.blocks} blocks of {per} that {space.blocks_by} keeps "
                                "together; cannot align this model.")
            space.blocks = 1  # a merged unit holds whole norm groups, which may then move freely
        space.size //= k
        for entry in space.entries:
            entry[2] *= k
        self.relayout(root, block=k)

    def split_repeats(self, root: int, n: int, node: fx.Node) -> None:
        """The units' axis is cut into n equal parts that must move alike: each part becomes a repeat."""
        space = self.spaces[root]
        if space.size % n:
            raise UserError(f"symmetry: node '{node.name}' cuts the {space.size} units of {space.name} into {n} "
                            "parts that do not line up with its units; cannot align this model.")
        if space.blocks > 1:
            if space.blocks % n == 0:
                space.blocks //= n
            elif n % space.blocks == 0:  # every part lies in one block, and parts do not move
                space.blocks = 1
            else:
                raise UserError(f"symmetry: node '{node.name}' cuts the units of {space.name} into {n} parts, "
                                f"across the {space.blocks} blocks that {space.blocks_by} keeps together; "
                                "cannot align this model.")
        space.size //= n
        for entry in space.entries:
            entry[3] *= n
        self.relayout(root, repeat=n)

    def set_blocks(self, root: int, count: int, fixed: bool, by: str) -> None:
        """The space's units fall into `count` runs that must stay together (see Group.blocks)."""
        space = self.spaces[root]
        if count == 1:
            return
        if space.size % count:  # a bug here, not a property of the model: the callers line units up first
            raise RuntimeError(f"symmetry: {by} splits {space.size} units into {count} blocks")
        if space.blocks == 1:
            space.blocks, space.blocks_fixed, space.blocks_by = count, fixed, by
        elif space.blocks != count:
            raise UserError(f"symmetry: {by} and {space.blocks_by} split the {space.size} units of {space.name} into "
                            f"{count} and {space.blocks} blocks that must each stay together; aecurves supports "
                            "one block structure per group, so it cannot align this model (give both the same "
                            "number of groups or heads).")
        else:
            space.blocks_fixed |= fixed  # fixed blocks are a subgroup of moving ones

    def unify(self, la: _Layout, lb: _Layout, node: fx.Node) -> None:
        """The two layouts describe the same axis, so their units must move together."""
        ra, rb = self.find(la.space), self.find(lb.space)
        if ra == rb:
            if (la.block, la.repeat) != (lb.block, lb.repeat):
                raise UserError(f"symmetry: node '{node.name}' meets the units of {self.spaces[ra].name} with "
                                f"themselves at two block sizes ({la.block} and {lb.block}) or repeats "
                                f"({la.repeat} and {lb.repeat}); cannot align this model.")
            return
        if la.repeat != lb.repeat:
            raise UserError(f"symmetry: node '{node.name}' combines {self.spaces[ra].name} and "
                            f"{self.spaces[rb].name}, laid out in {la.repeat} and {lb.repeat} repeats; cannot align "
                            "this model.")
        common = math.lcm(la.block, lb.block)
        self.coarsen(ra, common // la.block, node)
        self.coarsen(rb, common // lb.block, node)
        keep, drop = min(ra, rb), max(ra, rb)
        a, b = self.spaces[keep], self.spaces[drop]
        if a.size != b.size:
            raise UserError(f"symmetry: node '{node.name}' combines {a.name} ({a.size} units) with {b.name} "
                            f"({b.size} units); cannot align this model.")
        self.parent[drop] = keep
        a.entries += b.entries
        a.uses |= b.uses
        a.fixed |= b.fixed
        a.taps += b.taps
        a.projected.update(b.projected)
        self.set_blocks(keep, b.blocks, b.blocks_fixed, b.blocks_by)

    def attach(self, key: str, axis: int, layout: _Layout, node: fx.Node) -> None:
        if key not in self.keys:  # a bias=False, affine=False or stat-less module
            return
        if (key, axis) in self.owner:  # the same weight used twice: both uses share units
            if self.owner[(key, axis)] is None:
                raise UserError(f"symmetry: node '{node.name}' reads {key} a second time, after its axis {axis} "
                                "was cut into parts (a fused qkv projection or nn.MultiheadAttention); a module "
                                "called twice there is not understood, so aecurves cannot align this model.")
            space, entry = self.owner[(key, axis)]
            self.unify(_Layout(space, entry[2], repeat=entry[3]), layout, node)
            return
        entry = [key, axis, layout.block, layout.repeat, 0]
        self.spaces[self.find(layout.space)].entries.append(entry)
        self.owner[(key, axis)] = (layout.space, entry)

    def attach_part(self, key: str, axis: int, space: int, offset: int, node: fx.Node) -> None:
        """`key`'s axis holds the space's units in the part starting at `offset` (Entry.offset)."""
        if key not in self.keys:
            return
        if self.owner.get((key, axis), False) is not False and offset == 0:
            raise UserError(f"symmetry: node '{node.name}' uses {key} a second time (a module called twice); "
                            "with its axis cut into parts (a fused qkv projection or nn.MultiheadAttention) this "
                            "is not understood, so aecurves cannot align this model.")
        self.spaces[self.find(space)].entries.append([key, axis, 1, 1, offset])
        self.owner[(key, axis)] = None
        self.parted.add((key, axis))

    def use(self, node, kind: str) -> None:
        self.root(node).uses.add(kind)

    def carry(self, node: fx.Node, layout: _Layout, use: str | None = None) -> None:
        """`node` holds the units as `layout` says; it is a tap (a tensor whose values the units are)."""
        self.layout[node] = layout
        self.root(node).taps.append(node)
        if use:
            self.use(node, use)

    def unknown(self, node: fx.Node, spaced: list, what: str = "") -> None:
        """An op that a permuted tensor must not reach (one that reads only unpermuted tensors is fine)."""
        if spaced:
            names = ", ".join(sorted({self.root(n).name for n in spaced}))
            raise UserError(f"symmetry: node '{node.name}' ({what or _describe(node, self.modules)}) reads the "
                            f"hidden units of {names}, and aecurves cannot tell how a permutation of them passes "
                            f"through it, so it cannot align this model ({_UNDERSTOOD}).")

    # -- ops ----------------------------------------------------------------------------------------------------

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                for n in node.all_input_nodes:  # what the model returns keeps its order
                    for lay in self.layouts_of(n):
                        self.spaces[self.find(lay.space)].fixed = True
                continue
            spaced = [n for n in node.all_input_nodes if self.holds(n)]
            if any(n in self.fused or n in self.items for n in spaced):
                self.parts_op(node, spaced)
            elif any(n in self.tuples for n in spaced) and node.target is not operator.getitem:
                self.unknown(node, spaced, f"{_describe(node, self.modules)} on the pieces of a chunk/split")
            elif node.op == "call_module":
                self.module(node, self.modules[node.target], spaced)
            else:
                self.function(node, spaced)

    def pass_through(self, node: fx.Node, x, use: str | None, spaced: list, spatial: bool = False) -> None:
        """An op that keeps the units' axis where it is and treats each of its indices on its own: anywhere if
        it acts per element (shape kept), only on the channel axis 1 if it treats the later axes as space."""
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        if x not in self.layout:
            return
        lay, s, o = self.layout[x], _shape(x), _shape(node)
        if spatial:
            ok = lay.axis == 1 and lay.heads is None and o is not None and len(o) >= 2 and o[:2] == s[:2]
        else:
            ok = o == s
        if not ok:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, changing shape {s} to {o} with the "
                                              f"units on axis {lay.axis}")
        self.carry(node, lay, use)

    def module(self, node: fx.Node, m: nn.Module, spaced: list) -> None:
        x = node.args[0] if node.args else None
        t = node.target
        if isinstance(m, _CONVS + _CONV_TRANSPOSES + (nn.Linear,)):
            self.writer(node, m, x, spaced)
        elif isinstance(m, _NORMS):
            self.pass_through(node, x, "norm", spaced, spatial=True)
            if node in self.layout:
                for key in ("weight", "bias", "running_mean", "running_var"):
                    self.attach(f"{t}.{key}", 0, self.layout[node], node)
        elif isinstance(m, nn.GroupNorm):
            self.group_norm(node, m, x, spaced)
        elif isinstance(m, nn.LayerNorm):
            self.layer_norm(node, m, x, spaced)
        elif isinstance(m, nn.PReLU):
            self.pass_through(node, x, "elementwise", spaced, spatial=m.num_parameters > 1)
            if node in self.layout and m.num_parameters > 1:  # one slope per channel
                self.attach(f"{t}.weight", 0, self.layout[node], node)
        elif isinstance(m, nn.Identity):
            self.pass_through(node, x, None, spaced)
        elif isinstance(m, _PER_ELEMENT_MODULES):
            self.pass_through(node, x, "elementwise", spaced)
        elif isinstance(m, _SPATIAL_MODULES):
            self.pass_through(node, x, "elementwise", spaced, spatial=True)
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            self.reshape(node, x, spaced)
        elif isinstance(m, nn.MultiheadAttention):
            self.multihead(node, m, spaced)
        else:
            self.unknown(node, spaced)

    def writer(self, node: fx.Node, m: nn.Module, x, spaced: list) -> None:
        """A Conv/ConvTranspose (on axis 1) or a Linear (on the last axis): reads one space, writes a new one."""
        t = node.target
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced)
        shape, linear = _shape(x), isinstance(m, nn.Linear)
        if linear and (shape is None or len(shape) < 2):
            raise UserError(f"symmetry: node '{node.name}' ({t}: Linear) acts on a tensor of shape {shape}; only "
                            "[batch, ..., features] is understood, so cannot align this model.")
        if not linear and m.groups != 1:
            raise UserError(f"symmetry: node '{node.name}' ({t}: {type(m).__name__}) has groups={m.groups}; "
                            "only groups=1 is understood, so cannot align this model.")
        axis = len(shape) - 1 if linear else 1
        if x in self.layout and (self.layout[x].axis != axis or self.layout[x].heads is not None):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} acting on axis {axis} of a tensor "
                                              f"whose units are on axis {self.layout[x].axis}")
        transposed = isinstance(m, _CONV_TRANSPOSES)
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        kind = ("linear" if len(shape) == 2 else "sequence_linear") if linear else "conv"
        if x in self.layout:
            self.attach(f"{t}.weight", in_axis, self.layout[x], node)
            self.use(x, f"{kind}_in")
        size = m.out_features if linear else m.out_channels
        self.carry(node, _Layout(self.new_space(t, size), 1, axis), f"{kind}_out")
        self.attach(f"{t}.weight", out_axis, self.layout[node], node)
        self.attach(f"{t}.bias", 0, self.layout[node], node)

    def group_norm(self, node: fx.Node, m: nn.GroupNorm, x, spaced: list) -> None:
        """GroupNorm(G, C) normalises each run of C/G channels by its own statistics: a permutation may move
        channels within a run and whole runs, nothing else; GroupNorm(1, C) allows any permutation."""
        if x in self.layout and m.num_groups > 1:
            lay = self.layout[x]
            if lay.axis != 1 or lay.heads is not None or lay.repeat != 1:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)} on units laid out as {lay}")
            per = m.num_channels // m.num_groups
            root = self.find(lay.space)
            if per % lay.block == 0:  # a unit lies inside one norm group
                self.set_blocks(root, m.num_groups, False, f"node '{node.name}' ({node.target}: GroupNorm)")
            elif lay.block % per:  # make every unit hold whole norm groups, which then move freely
                self.coarsen(root, math.lcm(lay.block, per) // lay.block, node)
        self.pass_through(node, x, "norm", spaced, spatial=True)
        if node in self.layout:
            for key in ("weight", "bias"):
                self.attach(f"{node.target}.{key}", 0, self.layout[node], node)

    def layer_norm(self, node: fx.Node, m: nn.LayerNorm, x, spaced: list) -> None:
        """LayerNorm over the last k axes: its statistics are invariant to a permutation inside them and computed
        apart for each unit outside them; its weight and bias are per element of the normalised axes."""
        if x in self.layout and self.layout[x].heads is not None:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} on attention heads")
        self.pass_through(node, x, "norm", spaced)
        if node not in self.layout:
            return
        lay, first = self.layout[node], len(_shape(node)) - len(m.normalized_shape)
        if lay.axis >= first:
            for key in ("weight", "bias"):
                self.attach(f"{node.target}.{key}", lay.axis - first, lay, node)

    def function(self, node: fx.Node, spaced: list) -> None:
        target, method = node.target, node.op == "call_method"
        if (method and target in _METADATA_METHODS) or (
                target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS):
            return  # reads the shape, not the values
        x = node.args[0] if node.args else node.kwargs.get("input")
        if (not method and target in _NOISE_FUNCTIONS) or (method and target in _IDENTITY_METHODS
                                                             and x in self.noise):
            self.noise.add(node)  # the tensor it is "like" gives only its shape
            return
        if not spaced:
            return  # nothing permuted flows in, so nothing permuted flows out

        def known(methods, functions):
            return target in methods if method else target in functions

        if target is operator.getitem and x in self.tuples and isinstance(node.args[1], int):
            self.carry(node, self.tuples[x])
        elif method and target in _IDENTITY_METHODS:
            self.pass_through(node, x, None, spaced)
        elif known(_PER_ELEMENT_METHODS, _PER_ELEMENT_FUNCTIONS) or known((), _SPATIAL_FUNCTIONS):
            others = [n for n in node.all_input_nodes if n is not x and _shape(n) is not None]
            if others:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second tensor input")
            self.pass_through(node, x, "elementwise", spaced, spatial=target in _SPATIAL_FUNCTIONS)
        elif target is F.pad:
            self.pad(node, x, spaced)
        elif known(_RESHAPE_METHODS, _RESHAPE_FUNCTIONS):
            self.reshape(node, x, spaced)
        elif known(_TRANSPOSE_METHODS, _TRANSPOSE_FUNCTIONS):
            self.transpose(node, x, spaced)
        elif known(_SPLIT_METHODS, _SPLIT_FUNCTIONS):
            self.split(node, x, spaced)
        elif known(_REDUCE_METHODS, _REDUCE_FUNCTIONS):
            self.reduce(node, x, spaced)
        elif known(_BINARY_METHODS, _BINARY_FUNCTIONS):
            self.binary(node, spaced)
        elif known(_MATMUL_METHODS, _MATMUL_FUNCTIONS):
            self.matmul(node, spaced)
        elif target is F.scaled_dot_product_attention:
            self.attention(node, spaced)
        else:
            self.unknown(node, spaced)

    def pad(self, node: fx.Node, x, spaced: list) -> None:
        """F.pad pads the last len(pad) / 2 axes, each unit's slice alike, as long as the units' axes are not
        among them (diffusers' Downsample2D pads the spatial axes before its strided conv)."""
        pad = _arg(node, 1, "pad")
        if any(n is not x for n in spaced) or not isinstance(pad, (list, tuple)):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a hidden or traced padding")
        lay, n = self.layout[x], len(_shape(x))
        first = n - len(pad) // 2  # the first padded axis
        if lay.axis >= first or (lay.heads is not None and lay.heads >= first) or first < 1:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} padding the units' axis")
        self.carry(node, lay, "elementwise")

    def reshape(self, node: fx.Node, x, spaced: list) -> None:
        """A view keeps the row-major order of the elements behind the batch axis, so where the units go follows
        from the two shapes."""
        shape_only = node.op == "call_method" and node.target in ("view_as", "reshape_as")  # reads args[1]'s shape
        if any(n is not x for n in spaced) and not shape_only:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        if x not in self.layout:
            return
        lay, s, o = self.layout[x], _shape(x), _shape(node)
        if o is None or len(o) < 2 or o[0] != s[0]:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, reshaping {s} to {o} across the "
                                              "batch axis")
        if lay.heads is None and lay.axis == len(s) - 1 >= 2 and len(o) >= 5 and o[-3] > 1 and \
                o[-3] * o[-2] * o[-1] == s[-1] and math.prod(o[1:-3]) == math.prod(s[1:-1]):
            return self.fuse(node, x, lay, o)  # [..., parts * heads * per head] -> [..., parts, heads, per head]
        new = self.reshape_channels(node, lay, s, o) if lay.axis == 1 and lay.heads is None else \
            self.reshape_sequence(node, lay, s, o)
        if new is None:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, reshaping {s} to {o} with the "
                                              f"units on axis {lay.axis}" + ("" if lay.heads is None else
                                                                             f" and heads on axis {lay.heads}"))
        self.layout[node] = new
        if o != s:
            self.use(node, "reshape")

    def reshape_channels(self, node: fx.Node, lay: _Layout, s: tuple, o: tuple) -> _Layout:
        """Units on axis 1: feature f is at axis-1 index f // (product of the later dims) before and after, so
        the blocks follow from the two shapes."""
        r_in, r_out = math.prod(s[2:]), math.prod(o[2:])
        features = r_in * lay.block  # features per unit
        # A channel of the output must lie inside one unit: else merge units until it does.
        self.coarsen(self.find(lay.space), r_out // math.gcd(features, r_out), node)
        lay = self.layout[node.args[0]] if node.args[0] in self.layout else lay
        return lay._replace(block=r_in * lay.block // r_out)

    def reshape_sequence(self, node: fx.Node, lay: _Layout, s: tuple, o: tuple) -> _Layout | None:
        """Units on a later axis (a sequence's features, [batch, positions, channels], or attention heads): the
        axes before the units' may be reshaped freely; the units' axis, last, may be split into [heads, features
        per head] or merged back; anything else is not understood (None)."""
        if lay.heads is not None:  # merge [..., heads, features] back into [..., heads * features]
            if lay.heads == lay.axis - 1 == len(s) - 2 and o[-1] == s[-2] * s[-1] and \
                    math.prod(o[1:-1]) == math.prod(s[1:-2]):
                return lay._replace(axis=len(o) - 1, heads=None)
            return None
        tail = len(s) - lay.axis  # the units' axis and the axes after it stay as they are
        axis = len(o) - tail
        if axis >= 1 and o[axis:] == s[lay.axis:] and math.prod(o[1:axis]) == math.prod(s[1:lay.axis]):
            return lay._replace(axis=axis)
        if tail == 1 and len(o) >= 3 and o[-2] * o[-1] == s[-1] and math.prod(o[1:-2]) == math.prod(s[1:-1]):
            heads, per_head = o[-2], o[-1]  # [..., C] -> [..., heads, C / heads]
            if lay.repeat != 1 or per_head % lay.block:
                return None
            self.set_blocks(self.find(lay.space), heads, True, f"node '{node.name}' (splitting into {heads} heads)")
            return lay._replace(axis=len(o) - 1, heads=len(o) - 2)
        return None

    def order(self, node: fx.Node, x, spaced: list) -> list | None:
        """The axis order of a transpose/permute/movedim (output axis i is input axis order[i]), or None after
        refusing it. The units may not land on axis 0, which reshapes keep as the batch axis."""
        n = len(_shape(x))
        name = node.target if node.op == "call_method" else node.target.__name__
        args = list(node.args[1:])
        order = list(range(n))
        try:
            if name in ("transpose", "swapaxes"):
                d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
                order[d0 % n], order[d1 % n] = order[d1 % n], order[d0 % n]
            elif name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else \
                    args or node.kwargs.get("dims")
                order = [d % n for d in dims]
            else:  # movedim
                source, dest = _arg(node, 1, "source") % n, _arg(node, 2, "destination") % n
                order.remove(source)
                order.insert(dest, source)
        except TypeError:  # a dimension that is not a plain int
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with dimensions {args}")
        units = {a for lay in self.layouts_of(x) for a in (lay.axis, lay.heads) if a is not None}
        if sorted(order) != list(range(n)) or order[0] in units:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} moving the units to axis 0")
        return order

    def fuse(self, node: fx.Node, x, lay: _Layout, o: tuple) -> None:
        """A Linear's outputs viewed as [..., parts, heads, per head] (timm's qkv: one Linear(C, 3C) writes q, k and
        v): each part is a run of units of its own, so the writer's space becomes `parts` spaces whose entries are
        parts of its axis (Entry.offset); each part's heads stay in place, as for separate projections."""
        root, (parts, heads) = self.find(lay.space), o[-3:-1]
        space = self.spaces[root]
        holders = [n for table in (self.layout, self.tuples) for n, held in table.items()
                   if self.find(held.space) == root]
        fresh = (holders == [x] and len(x.users) == 1 and (lay.block, lay.repeat, space.blocks) == (1, 1, 1)
                 and not space.fixed and space.uses <= {"linear_out", "sequence_linear_out"}
                 and all(e[2:] == [1, 1, 0] for e in space.entries))
        if not fresh:
            return self.unknown(node, [x], f"{_describe(node, self.modules)}, cutting the units of {space.name} into "
                                           f"{parts} parts, understood only right after the Linear that writes them")
        entries, space.entries, space.taps, space.fixed = space.entries, [], [], True  # its units live on in parts
        for key, axis, *_ in entries:
            self.owner.pop((key, axis), None)
        labels = "qkv" if parts == 3 else [str(p) for p in range(parts)]
        per, lays = space.size // parts, []
        for p in range(parts):
            new = self.new_space(f"{space.name}[{labels[p]}]", per)
            for key, axis, *_ in entries:
                self.attach_part(key, axis, new, p * per, node)
            self.spaces[new].uses.add("sequence_linear_out")
            self.set_blocks(new, heads, True, f"node '{node.name}' (splitting into {heads} heads)")
            lays.append(_Layout(new, 1, axis=len(o) - 1, heads=len(o) - 2))
        self.fused[node] = (len(o) - 3, tuple(lays))

    def parts_op(self, node: fx.Node, spaced: list) -> None:
        """An op on a fused tensor (see fuse) or on a tuple whose items hold different units (an unbind of the
        parts, nn.MultiheadAttention's output): transposes and copies of the first, indexing or unbinding of its
        parts' axis, indexing of the second; nothing else."""
        x, method, target = (node.args[0] if node.args else None), node.op == "call_method", node.target
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        index = node.args[1] if target is operator.getitem and len(node.args) > 1 else None
        if x in self.items:
            if not isinstance(index, int) or index < 0:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)} on the items of a tuple")
            if index in self.items[x]:  # the others (attention weights) hold no units
                self.carry(node, self.items[x][index])
            return
        part, lays = self.fused[x]

        def drop(lay):  # the layout once the parts' axis is gone
            return lay._replace(axis=lay.axis - (lay.axis > part),
                                heads=None if lay.heads is None else lay.heads - (lay.heads > part))

        if method and target in _IDENTITY_METHODS:
            self.fused[node] = self.fused[x]
        elif target in (_TRANSPOSE_METHODS if method else _TRANSPOSE_FUNCTIONS):
            order = self.order(node, x, spaced)
            if order is not None:
                self.fused[node] = (order.index(part), tuple(
                    lay._replace(axis=order.index(lay.axis),
                                 heads=None if lay.heads is None else order.index(lay.heads)) for lay in lays))
        elif isinstance(index, int) and part == 0 and -len(lays) <= index < len(lays):
            self.carry(node, drop(lays[index]))
        elif (target == "unbind" if method else target is torch.unbind) and \
                isinstance(_arg(node, 1, "dim", 0), int) and _arg(node, 1, "dim", 0) % len(_shape(x)) == part:
            self.items[node] = {i: drop(lay) for i, lay in enumerate(lays)}
        else:
            self.unknown(node, spaced, f"{_describe(node, self.modules)} on a projection cut into parts (understood: "
                                       "transpose/permute, and unbind or indexing of the parts' axis)")

    def multihead(self, node: fx.Node, m: nn.MultiheadAttention, spaced: list) -> None:
        """nn.MultiheadAttention as self-attention, a leaf of the graph: in_proj_weight [3E, E] reads the input's
        units on axis 1 and writes q and k (rows u and E + u, one permutation) and v (rows 2E + u), each within its
        head; out_proj reads v's units and writes the output's, item 0 of the tuple it returns."""
        t, what = node.target, f"node '{node.name}' ({node.target}: MultiheadAttention)"
        q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        layouts = [self.layout.get(a) for a in (q, k, v)]
        same = q is k is v or (None not in layouts and len({(self.find(la.space), la.block, la.axis, la.heads)
                                                            for la in layouts}) == 1)
        masked = _arg(node, 3, "key_padding_mask") is not None or _arg(node, 5, "attn_mask") is not None or \
            bool(_arg(node, 7, "is_causal", False))
        problem = ("kdim or vdim other than embed_dim" if not m._qkv_same_embed_dim else
                   "add_bias_kv" if m.bias_k is not None else "add_zero_attn" if m.add_zero_attn else
                   "an attention mask" if masked else
                   None if same else "a key or value other than its query (cross-attention)")
        if problem:
            raise UserError(f"symmetry: {what} has {problem}; aecurves understands nn.MultiheadAttention only as "
                            "self-attention (query, key and value the same tensor) without masks, extra key/value "
                            "biases or kdim/vdim, so it cannot align this model.")
        last, lay = len(_shape(q)) - 1, layouts[0]
        if lay is not None and (lay.axis != last or lay.heads is not None):
            return self.unknown(node, spaced, f"{what} reading units on axis {lay.axis}, not its last")
        embed, bias = m.embed_dim, f"{t}.in_proj_bias" if f"{t}.in_proj_bias" in self.keys else None
        qk, vs = self.new_space(f"{t}.in_proj[q]", embed), self.new_space(f"{t}.in_proj[v]", embed)
        for space, offsets in ((qk, (0, embed)), (vs, (2 * embed,))):
            for offset in offsets:
                for key in ("in_proj_weight", "in_proj_bias"):
                    self.attach_part(f"{t}.{key}", 0, space, offset, node)
            self.set_blocks(space, m.num_heads, True, f"{what} ({m.num_heads} heads)")
            self.spaces[space].uses.add("attention")
            self.spaces[space].taps.append(q)  # their values: the projection of the query (TapLayout.project)
            self.spaces[space].projected[q] = TapLayout(last, project=(f"{t}.in_proj_weight", bias, offsets[0]))
        if lay is not None:
            self.attach(f"{t}.in_proj_weight", 1, lay, node)
            self.use(q, "attention")
        out = _Layout(self.new_space(f"{t}.out_proj", embed), 1, axis=last)
        self.attach(f"{t}.out_proj.weight", 1, _Layout(vs, 1), node)
        for key, axis in (("out_proj.weight", 0), ("out_proj.bias", 0)):
            self.attach(f"{t}.{key}", axis, out, node)
        self.spaces[out.space].uses.add("attention")
        self.items[node] = {0: out}  # item 1, the attention weights (or None), holds no units

    def transpose(self, node: fx.Node, x, spaced: list) -> None:
        """transpose/permute/movedim: the units' axis goes where the axis order sends it (the batch axis may move
        too: nn.MultiheadAttention without batch_first reads [positions, batch, features])."""
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        order = self.order(node, x, spaced)
        if order is None:
            return
        lay = self.layout[x]
        heads = None if lay.heads is None else order.index(lay.heads)
        self.carry(node, lay._replace(axis=order.index(lay.axis), heads=heads), "transpose")

    def split(self, node: fx.Node, x, spaced: list) -> None:
        """chunk/split into pieces. Along another axis every piece keeps the layout; along the units' axis the
        pieces must be equal, and each becomes a copy (repeat) that moves by the same permutation (μ and log σ²
        of a VAE's posterior: unit u of both halves is latent dimension u)."""
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        lay, s = self.layout[x], _shape(x)
        name = node.target if node.op == "call_method" else node.target.__name__
        how = _arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections",
                   node.kwargs.get("split_size"))
        dim = _arg(node, 2, "dim", 0)
        if not isinstance(dim, int) or not isinstance(how, (int, list, tuple)):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with arguments {node.args[1:]}")
        dim %= len(s)
        length = s[dim]
        if name == "chunk":
            how = -(-length // how)  # torch.chunk's piece size
        sizes = list(how) if isinstance(how, (list, tuple)) else [how] * (length // how) + [length % how] * bool(
            length % how)
        if dim == lay.heads:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} splitting attention heads")
        if dim == lay.axis:
            parts = len(sizes)
            if len(set(sizes)) != 1 or lay.heads is not None or (lay.repeat > 1 and lay.repeat % parts):
                return self.unknown(node, spaced, f"{_describe(node, self.modules)}, cutting the units' axis into "
                                                  f"pieces of {sizes}")
            if lay.repeat == 1:
                self.split_repeats(self.find(lay.space), parts, node)
                lay = self.layout[x]
            lay = lay._replace(repeat=lay.repeat // parts)
            self.use(x, "chunk")
        self.tuples[node] = lay

    def reduce(self, node: fx.Node, x, spaced: list) -> None:
        """A sum/mean/max over the units' axis is the same for every order of the units: the space ends there
        without being pinned (a VAE's KL). Over other axes the units' axis stays, only not the batch axis."""
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        lay, n = self.layout[x], len(_shape(x))
        dim, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
        dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        if dim is not None and not all(isinstance(d, int) for d in dims):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} over dimensions {dim}")
        dims = set(range(n)) if dim is None else {d % n for d in dims}
        if lay.axis in dims:  # heads (if any) not reduced stay where they are: nothing moves them
            self.use(x, "reduced")
            return
        if 0 in dims or lay.heads in dims:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} over the batch axis or the heads")
        shift = (lambda a: a) if keep else (lambda a: a - sum(d < a for d in dims))
        heads = None if lay.heads is None else shift(lay.heads)
        self.carry(node, lay._replace(axis=shift(lay.axis), heads=heads), "elementwise")

    def binary(self, node: fx.Node, spaced: list) -> None:
        out = _shape(node)
        if out is None or len(out) < 2:
            return self.unknown(node, spaced)
        parts, others = [], []
        for a in node.args[:2]:
            s = _shape(a)
            if s is None:
                continue  # a number
            offset = len(out) - len(s)
            if a in self.layout:
                lay = self.layout[a]
                parts.append((a, lay.axis + offset, None if lay.heads is None else lay.heads + offset))
            elif a in self.noise and s != out:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)}, broadcasting random noise of "
                                                  f"shape {s} to {out}")
            elif a not in self.noise:
                others.append((a, s, offset))
        if not parts:
            return
        axis, heads = parts[0][1:]
        if any(p[1:] != (axis, heads) for p in parts) or any(_shape(p[0])[p[1] - axis + self.layout[p[0]].axis]
                                                              != out[axis] for p in parts):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, meeting hidden tensors with their "
                                              "units on different axes")
        for a, _, _ in parts[1:]:
            self.unify(self.layout[parts[0][0]], self.layout[a], node)
        lay = self.layout[parts[0][0]]._replace(axis=axis, heads=heads)
        pinned = False
        for a, s, offset in others:
            if axis - offset < 0 or s[axis - offset] == 1:
                continue  # the same value for every unit
            if heads is not None:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)}, meeting attention heads with "
                                                  f"a tensor of shape {s}")
            if a.op == "get_attr" and a.target in self.keys:
                self.attach(a.target, axis - offset, lay, node)  # a parameter moves with the units
            else:
                pinned = True
        self.carry(node, lay, "elementwise")
        if pinned:
            self.root(node).fixed = True

    def matmul(self, node: fx.Node, spaced: list) -> None:
        """a @ b over the last axis of a and the last but one of b (attention's scores and their use of v): two
        spaces contracted with each other must be one (q and k); a space on a's rows or b's columns is the
        output's. A space contracted against anything else, or two spaces both kept, is not understood."""
        baddbmm = node.target is torch.baddbmm
        a, b = node.args[1:3] if baddbmm else node.args[:2]
        if any(n is not a and n is not b for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} adding a hidden tensor")
        out = _shape(node)
        la, lb = self.layout.get(a), self.layout.get(b)
        n = len(out)
        if any(len(_shape(t)) != n for t, lay in ((a, la), (b, lb)) if lay is not None):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, broadcasting a hidden tensor")
        if la is not None and lb is not None:
            if la.axis != n - 1 or lb.axis != n - 2 or la.heads != lb.heads:
                return self.unknown(node, spaced)
            self.unify(la, lb, node)  # a's features and b's rows are summed over together: one permutation
            self.use(a, "attention")
            return
        if la is not None and la.axis == n - 2:
            new = la
        elif lb is not None and lb.axis == n - 1:
            new = lb
        else:
            return self.unknown(node, spaced)
        if baddbmm and node.kwargs.get("beta", 1) != 0:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} adding a tensor to hidden units")
        self.carry(node, new, "attention")

    def attention(self, node: fx.Node, spaced: list) -> None:
        """scaled_dot_product_attention(q, k, v): q and k are summed over their last axis together (one
        permutation); the output holds v's last axis."""
        q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        if any(n not in (q, k, v) for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a hidden attention mask")
        lq, lk, lv = (self.layout.get(t) for t in (q, k, v))
        n = len(_shape(node))
        if (lq is None) != (lk is None) or (lq is not None and (lq.axis != n - 1 or lk.axis != n - 1
                                                                 or lq.heads != lk.heads)):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}: its query and key must carry the "
                                              "same units on their last axis")
        if lv is not None and (lv.axis != n - 1 or len(_shape(v)) != n):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with units off the value's last axis")
        if lq is not None:
            self.unify(lq, lk, node)
            self.use(q, "attention")
        if lv is not None:
            self.carry(node, lv, "attention")

    def groups(self) -> list[Group]:
        found = []
        for i, space in enumerate(self.spaces):
            if self.find(i) != i or space.fixed:
                continue
            entries = [Entry(*e) for e in space.entries]
            latent = space.uses == {"linear_in", "linear_out"} and all(e.block == 1 and e.repeat == 1 for e in entries)
            layouts = {n.name: space.projected.get(n) or TapLayout(lay.axis, lay.block, lay.repeat, lay.heads)
                       for n, lay in ((n, self.layout.get(n)) for n in space.taps)}
            found.append(Group(space.name, space.size, entries, "latent" if latent else "hidden",
                               [n.name for n in space.taps], space.blocks, space.blocks_fixed, layouts))
        return found


@torch.no_grad()
def find_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The model's permutation groups, in the order the forward pass writes them. `example` is an input batch
    (e.g. [2, channels, image_size, image_size]) from which the shapes of the traced tensors are read; the model
    runs on it once in eval mode, so BatchNorm statistics are not touched."""
    # torch.fx, else a recording of one run on `example`; both in eval mode, as it runs (a VAE decodes μ)
    gm = capture.trace(model, example, "aligning")
    state = model.state_dict()
    tracer = _Tracer(gm, set(state))
    tracer.run(gm.graph)
    groups = tracer.groups()
    for g in groups:  # a mismatch here is a bug in this module, not in the model
        for e in g.entries:
            length, extent = state[e.name].shape[e.axis], e.repeat * g.size * e.block
            if length < e.offset + extent or (length != extent and (e.name, e.axis) not in tracer.parted):
                raise RuntimeError(f"symmetry: group {g.name} ({e.repeat} x {g.size} x {e.block}) does not fit "
                                   f"{e.name} "
                                   f"{tuple(state[e.name].shape)} along axis {e.axis}")
    return groups


# --- applying permutations and latent maps ---------------------------------------------------------------------

def _index(perm: torch.Tensor, block: int, repeat: int = 1, offset: int = 0, length: int | None = None) -> torch.Tensor:
    """Unit permutation -> index along the axis: unit i's block of indices takes unit perm[i]'s block, in each of
    the `repeat` copies of the units' layout; with `offset` and the axis' `length`, the layout is the part
    starting at `offset` and every index outside it stays."""
    index = perm if block == 1 else (perm[:, None] * block + torch.arange(block)).reshape(-1)
    if repeat != 1:
        index = (torch.arange(repeat)[:, None] * index.numel() + index).reshape(-1)
    if length is None or (offset == 0 and index.numel() == length):
        return index
    full = torch.arange(length)
    full[offset:offset + index.numel()] = offset + index
    return full


def unit_rows(value: torch.Tensor, layout: TapLayout, size: int, state: dict | None = None) -> torch.Tensor:
    """[size, samples]: each unit's values in a tensor laid out as `layout` (a Group's tap_layouts), its block,
    repeats and every other axis (the batch's too) together in one row."""
    if layout.project is not None:  # the units are a projection of the tapped tensor (see TapLayout)
        if state is None:
            raise ValueError("unit_rows: a projected tap layout needs the model's state dict")
        weight, bias, offset = layout.project
        w = state[weight][offset:offset + size].to(value)
        b = None if bias is None else state[bias][offset:offset + size].to(value)
        value = F.linear(value.movedim(layout.axis, -1), w, b).movedim(-1, layout.axis)
    if layout.heads is not None:  # [.., heads, .., per head, ..] -> [batch, heads * per head, ..]
        value = value.movedim((layout.heads, layout.axis), (1, 2)).flatten(1, 2)
    else:
        value = value.movedim(layout.axis, 1)
    return value.reshape(value.shape[0], layout.repeat, size, -1).permute(2, 0, 1, 3).reshape(size, -1)


def _check_perm(perm, group: Group) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (group.size,) or not torch.equal(perm.sort().values, torch.arange(group.size)):
        raise ValueError(f"the permutation for group {group.name} must reorder {group.size} units, got "
                         f"{tuple(perm.shape)} {perm.tolist() if perm.numel() <= 16 else ''}")
    if group.blocks > 1:  # each run of units must come from one run (the same one, for fixed blocks)
        source = perm.reshape(group.blocks, -1) // (group.size // group.blocks)
        if not (source == source[:, :1]).all() or (group.blocks_fixed and not torch.equal(
                source[:, 0], torch.arange(group.blocks))):
            raise ValueError(f"the permutation for group {group.name} must keep its {group.blocks} blocks of "
                             f"{group.size // group.blocks} units together" + (" and in place" if
                                                                              group.blocks_fixed else ""))
    return perm


def permute(state: dict, groups: list[Group], perms: dict) -> dict:
    """A new state dict in which unit i of every group is the old unit perms[group.name][i], moved in every
    tensor of the group. Groups without a permutation stay as they are; tensors that no permutation touches
    are the same objects as in `state`."""
    known = {g.name for g in groups}
    if set(perms) - known:
        raise ValueError(f"permutations given for unknown groups: {sorted(set(perms) - known)}")
    out = dict(state)
    for g in groups:
        if g.name not in perms:
            continue
        perm = _check_perm(perms[g.name], g)
        for e in g.entries:
            index = _index(perm, e.block, e.repeat, e.offset, out[e.name].shape[e.axis])
            out[e.name] = out[e.name].index_select(e.axis, index.to(out[e.name].device))
    return out


def apply_latent_map(state: dict, group: Group, matrix: torch.Tensor) -> dict:
    """A new state dict in which the latent code is z' = M z: the Linears that write it become M W and M b, the
    ones that read it W M^-1, so the function is unchanged for any invertible M. With a permutation matrix
    (M[i, perm[i]] = 1) this is permute(state, [group], {group.name: perm})."""
    if group.kind != "latent":
        raise ValueError(f"group {group.name} is {group.kind}, not latent: only a permutation leaves it unchanged")
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (group.size, group.size):
        raise ValueError(f"the latent map of group {group.name} must be {group.size} x {group.size}, got "
                         f"{tuple(m.shape)}")
    inverse = torch.linalg.inv(m)  # raises on a singular M
    out = dict(state)
    for e in group.entries:  # a latent group holds only Linears: axis 0 writes z, axis 1 reads it
        w = out[e.name]
        new = m @ w.double().cpu() if e.axis == 0 else w.double().cpu() @ inverse
        out[e.name] = new.to(dtype=w.dtype, device=w.device)
    return out


# --- weight matching -------------------------------------------------------------------------------------------

def linear_assignment(cost, maximize: bool = False, group: str | None = None) -> np.ndarray:
    """The column for each row of a square cost matrix that minimises (or maximises) the total (scipy's
    linear_sum_assignment, a shortest-augmenting-path Hungarian method). `group`: the layer group whose units the
    matrix scores, named when its scores are not finite."""
    c = np.asarray(cost, dtype=np.float64)
    if group is not None and c.ndim == 2 and not np.isfinite(c).all():
        raise UserError(f"symmetry: the matching scores of the units of {group} are not finite (NaN or inf): the "
                        "two networks' weights or activations there overflow (weights far beyond a trained "
                        "network's), so no permutation can be chosen. Check the endpoints (a finite but huge "
                        "weight still overflows float32 in the forward pass); nothing was written.")
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.isfinite(c).all():
        raise ValueError(f"linear_assignment takes a finite square matrix, got shape {c.shape}")
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    out = np.empty(c.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def linear_assignment_blocks(cost, blocks: int = 1, fixed: bool = False, maximize: bool = False,
                             group: str | None = None) -> np.ndarray:
    """linear_assignment restricted to permutations that keep `blocks` equal runs of units together (Group.blocks),
    solved exactly: the best assignment within every pair of runs (a, b) gives that pair's total, and an
    assignment of runs over those totals picks the pairs (fixed: each run stays in place, so only pairs (a, a))."""
    c = np.asarray(cost, dtype=np.float64)
    if blocks == 1:
        return linear_assignment(c, maximize, group)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.isfinite(c).all():
        return linear_assignment(c, maximize, group)  # refused there, naming the group when given
    n = c.shape[0]
    if n % blocks:
        raise ValueError(f"linear_assignment_blocks: {n} units do not fall into {blocks} equal blocks")
    m = n // blocks
    sub = c.reshape(blocks, m, blocks, m)  # [row block, row, column block, column]
    inner, totals = {}, np.zeros((blocks, blocks))
    for a in range(blocks):
        for b in ([a] if fixed else range(blocks)):
            inner[a, b] = linear_assignment(sub[a, :, b, :], maximize)
            totals[a, b] = sub[a, np.arange(m), b, inner[a, b]].sum()
    outer = np.arange(blocks) if fixed else linear_assignment(totals, maximize)
    out = np.empty(n, dtype=np.int64)
    for a, b in enumerate(outer):
        out[a * m:(a + 1) * m] = b * m + inner[a, b]
    return out


def assign(cost, group: Group, maximize: bool = True) -> np.ndarray:
    """The assignment of `group`'s units that a cost/score matrix over them asks for, keeping its blocks."""
    return linear_assignment_blocks(cost, group.blocks, group.blocks_fixed, maximize, group.name)


def _rows(w: torch.Tensor, axis: int, size: int, repeat: int = 1, offset: int = 0, block: int = 1) -> torch.Tensor:
    """One row per unit: the unit's block along `axis` (in every repeat, within the part of repeat * size * block
    indices starting at `offset`) and everything along the other axes."""
    w = w.movedim(axis, 0)[offset:offset + repeat * size * block]
    return w.reshape(repeat, size, -1).transpose(0, 1).reshape(size, -1)


def weight_matching(state_a: dict, state_b: dict, groups: list[Group], iters: int = 100, seed: int = 0,
                    init: dict | None = None, normalise: bool = False, unary: dict | None = None,
                    alpha: float = 0.0) -> dict[str, torch.Tensor]:
    """Permutations that make B's weights as close as possible to A's: permute(state_b, groups, result) is B
    reordered to match A, computing the same function as B.

    The cost of matching B's unit j to A's unit i is the inner product of the two units' weights: every tensor of
    the group, sliced along the group's axis (the "row" of a unit), with the other groups' axes as B is currently
    permuted. Only tensors present in both states count, so a caller may leave some out or pass a rewritten view
    (fold_batchnorm). normalise: each unit's row, all its tensors together, is divided by its norm first, so the
    cost is a cosine similarity in [-1, 1] and no unit counts more for being larger. unary: a fixed [n, n] score
    per group (e.g. the activations' correlation); the assignment then maximises alpha * unary + (1 - alpha) * cost.

    Coordinate ascent as in Ainsworth et al.: each sweep visits the groups in a random order and solves a linear
    assignment for one with the others held; it stops after a sweep in which no group's total improved. It starts
    from the identity, or from `init` (permutations by group name)."""
    perms = {g.name: torch.arange(g.size) for g in groups}
    perms.update({k: v.clone() for k, v in (init or {}).items() if k in perms})  # e.g. activation matching's
    along: dict[str, list] = {}  # tensor name -> [(group name, axis, block)]
    for g in groups:
        for e in g.entries:
            along.setdefault(e.name, []).append((g.name, e.axis, e.block, e.repeat, e.offset))
    names = set(along) & set(state_a) & set(state_b)  # the tensors that count, in float64 once
    state_a = {n: state_a[n].detach().double().cpu() for n in names}
    state_b = {n: state_b[n].detach().double().cpu() for n in names}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        improved = False
        for k in torch.randperm(len(groups), generator=generator).tolist():
            g = groups[k]
            cost = _matching_cost(g, state_a, state_b, perms, along, normalise)
            if unary is not None and g.name in unary:
                cost = alpha * torch.as_tensor(unary[g.name], dtype=torch.float64) + (1 - alpha) * cost
            new = torch.as_tensor(assign(cost.numpy(), g))
            old_total = cost[torch.arange(g.size), perms[g.name]].sum().item()
            new_total = cost[torch.arange(g.size), new].sum().item()
            # Accept strict gains only, so ties cannot make it cycle.
            if new_total > old_total + 1e-12 * max(1.0, abs(old_total)):
                perms[g.name] = new
                improved = True
        if not improved:
            break
    return perms


def _matching_cost(g: Group, state_a: dict, state_b: dict, perms: dict, along: dict,
                   normalise: bool) -> torch.Tensor:
    """[n, n]: A's unit i against B's unit j, as weight_matching defines it (a sum over the group's tensors of the
    units' inner products; normalised, divided by the norms of the units' whole rows)."""
    cost = torch.zeros(g.size, g.size, dtype=torch.float64)
    norms_a, norms_b = torch.zeros(g.size, dtype=torch.float64), torch.zeros(g.size, dtype=torch.float64)
    for e in g.entries:
        if e.name not in state_a or e.name not in state_b:
            continue
        wb = state_b[e.name].double()
        for name, axis, block, *more in along[e.name]:  # more: (repeat, offset), when not the defaults
            if (name, axis) != (g.name, e.axis):  # the other axes (parts) as B is currently permuted
                wb = wb.index_select(axis, _index(perms[name], block, *more, length=wb.shape[axis]))
        ra, rb = (_rows(w, e.axis, g.size, e.repeat, e.offset, e.block) for w in (state_a[e.name].double(), wb))
        cost += ra @ rb.T
        if normalise:  # a row's norm does not depend on how the other axes are ordered
            norms_a += ra.square().sum(dim=1)
            norms_b += rb.square().sum(dim=1)
    if normalise:
        cost /= torch.outer(norms_a.sqrt().clamp_min(1e-12), norms_b.sqrt().clamp_min(1e-12))
    return cost


# --- BatchNorm folded into the layer before it ----------------------------------------------------------------

def batchnorm_after(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """{layer: its BatchNorm} for every Conv/ConvTranspose/Linear whose output only BatchNorm reads
    (capture.read_only_by_batchnorm, the rule --renormalize uses too), where fold_batchnorm can fold it: one
    BatchNorm module alone (two would want two scales of one weight), keeping running statistics (one without
    them normalises by each batch's, which no weight can hold). `example`: find_groups' input, needed for a model
    that torch.fx cannot trace (capture.trace)."""
    gm = capture.trace(model, example, "aligning")  # find_groups captured it already, so this cannot fail
    modules = dict(gm.named_modules())
    return {layer: norms[0] for layer, norms in capture.read_only_by_batchnorm(gm).items()
            if len(norms) == 1 and modules[norms[0]].running_var is not None}


def fold_batchnorm(state: dict, model: nn.Module, pairs: dict[str, str]) -> dict:
    """The weights as eval mode computes with them: a layer followed by BatchNorm computes, per output channel,
    s * (W x + b - mean) + beta with s = gamma / sqrt(var + eps). Its weight becomes W * s (so the arbitrary
    scale that BatchNorm removes is gone), and the effective bias s * (b - mean) + beta takes the place of the
    BatchNorm's bias; the BatchNorm's scale and running statistics and the layer's own bias are left out (they are
    folded in). A view for weight_matching only: the function is not represented by it."""
    modules = dict(model.named_modules())
    out = {k: v.detach().double().cpu() for k, v in state.items()}
    for layer, bn in pairs.items():
        norm = modules[bn]
        var, mean = out[f"{bn}.running_var"], out[f"{bn}.running_mean"]
        gamma = out.get(f"{bn}.weight", torch.ones_like(var))
        beta = out.get(f"{bn}.bias", torch.zeros_like(var))
        s = gamma / torch.sqrt(var + norm.eps)
        w = out[f"{layer}.weight"]
        out_axis = 1 if isinstance(modules[layer], _CONV_TRANSPOSES) else 0
        shape = [1] * w.dim()
        shape[out_axis] = -1
        out[f"{layer}.weight"] = w * s.reshape(shape)
        bias = out.pop(f"{layer}.bias", torch.zeros_like(var))
        out[f"{bn}.bias"] = s * (bias - mean) + beta
        for key in ("weight", "running_mean", "running_var"):
            out.pop(f"{bn}.{key}", None)
    return out
