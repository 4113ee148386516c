"""Permutation symmetries of an autoencoder, and weight matching (Ainsworth et al., "Git Re-Basin", 2023).

Hidden units can be reordered without changing what a network computes, as long as every layer that writes a
unit and every layer that reads it are reordered together. Two independently trained autoencoders may differ by
such a reordering, and the straight line between them may cross a loss barrier only because of it: aligning one
to the other first asks whether anything else is left.

find_groups traces a model with torch.fx and returns its groups of hidden channels/units, each with the
(state-dict key, axis, block) entries that move with it. Understood:
  - Conv1d/2d/3d and ConvTranspose1d/2d/3d with groups=1 (a transposed convolution's weight is [in, out, ...],
    so its axes are the other way round), Linear on [batch, features], BatchNorm/InstanceNorm (weight, bias,
    running_mean, running_var; num_batches_tracked is a count, not per channel), PReLU;
  - ops that act per element or per channel: activations, dropout, upsampling/interpolation, pooling,
    reductions over spatial axes, as modules, torch or F functions, or tensor methods;
  - flatten/view/reshape/unflatten that keep the batch axis: a channel then owns a contiguous block of features
    (conv [C, H, W] -> Flatten -> Linear: channel c is in-features c*H*W .. (c+1)*H*W - 1; Linear -> view to
    [C, H, W] -> conv: the Linear's outputs move in blocks of H*W);
  - element-wise add/sub/mul/div: hidden tensors of two groups become one group (a residual connection); a
    parameter combined with a hidden tensor moves with it; any other tensor that is never permuted (the input,
    say) pins the units it meets, which are then no group.
The input's and the output's channels are image channels and are never permuted. Any other op that a tensor
written by a layer reaches (cat, matmul, a sum over channels, a transpose, a grouped convolution, ...) raises
UserError naming the node, even when it would only touch the output's channels: a group is reported only when
every op that writes or reads it is understood, so a permutation found here can never change the function.

A Linear that writes the code z, read by Linears with nothing in between, is a group of kind "latent": there any
invertible matrix M, not only a permutation, leaves the function unchanged (apply_latent_map).
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
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from aecurves.errors import UserError


class Entry(NamedTuple):
    name: str   # key in the state dict
    axis: int   # the tensor axis the group's units run along
    block: int  # consecutive indices along `axis` that belong to one unit


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


# --- what the tracer understands -------------------------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Each acts on every element (or every channel's plane) on its own, so it commutes with a channel permutation.
_PER_ELEMENT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Upsample,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PER_ELEMENT_FUNCTIONS = {
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp,
    torch.square, operator.neg, F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.elu, F.selu, F.celu, F.silu,
    F.mish, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid, F.tanh, F.sigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.interpolate, F.upsample,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_PER_ELEMENT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp",
                        "clamp_", "clamp_min", "clamp_max", "square"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim"}
_UNDERSTOOD = ("understood: convolutions with groups=1, Linear, batch/instance norm, per-element activations, "
               "dropout, pooling, upsampling, flatten/view/unflatten, element-wise add/sub/mul/div")


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(modules[node.target]).__name__}"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    return f"the function {getattr(node.target, '__name__', node.target)}"


@dataclass
class _Space:
    """One run of units along some tensors' axis 1, as the tracer finds it; merged with others when they meet."""
    name: str
    size: int
    entries: list = field(default_factory=list)  # [name, axis, block], lists so coarsening can update blocks
    uses: set = field(default_factory=set)       # kinds of op it went through: decides "latent"
    fixed: bool = False                          # reaches the output or an unpermuted tensor
    taps: list = field(default_factory=list)     # nodes carrying the units (see Group.taps)


class _Tracer:
    """Walks the graph once. Every tensor that may be permuted has a layout (space id, block): its axis 1 index i
    belongs to unit i // block of the space. Tensors without a layout are never permuted."""

    def __init__(self, gm: fx.GraphModule, keys: set):
        self.modules = dict(gm.named_modules())
        self.keys = keys
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layout: dict = {}
        self.owner: dict = {}  # (key, axis) -> (space id, entry): a module called twice shares its units

    # -- spaces -----------------------------------------------------------------------------------------------

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def root(self, node) -> _Space:
        return self.spaces[self.find(self.layout[node][0])]

    def new_space(self, name: str, size: int) -> int:
        self.spaces.append(_Space(name, size))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def coarsen(self, root: int, k: int, node: fx.Node) -> None:
        """Merge every k consecutive units into one: a reshape showed that they can only move together."""
        if k == 1:
            return
        space = self.spaces[root]
        if space.size % k:
            raise UserError(f"symmetry: node '{node.name}' splits the {space.size} units of {space.name} into "
                            f"blocks of {k}, which do not line up; cannot align this model.")
        space.size //= k
        for entry in space.entries:
            entry[2] *= k
        for n, (s, b) in self.layout.items():
            if self.find(s) == root:
                self.layout[n] = (s, b * k)

    def unify(self, la: tuple, lb: tuple, node: fx.Node) -> None:
        """The two layouts describe the same axis, so their units must move together."""
        ra, rb = self.find(la[0]), self.find(lb[0])
        if ra == rb:
            if la[1] != lb[1]:
                raise UserError(f"symmetry: node '{node.name}' meets the units of {self.spaces[ra].name} with "
                                f"themselves at two block sizes ({la[1]} and {lb[1]}); cannot align this model.")
            return
        common = math.lcm(la[1], lb[1])
        self.coarsen(ra, common // la[1], node)
        self.coarsen(rb, common // lb[1], node)
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

    def attach(self, key: str, axis: int, layout: tuple, node: fx.Node) -> None:
        if key not in self.keys:  # a bias=False, affine=False or stat-less module
            return
        if (key, axis) in self.owner:  # the same weight used twice: both uses share units
            space, entry = self.owner[(key, axis)]
            self.unify((space, entry[2]), layout, node)
            return
        entry = [key, axis, layout[1]]
        self.spaces[self.find(layout[0])].entries.append(entry)
        self.owner[(key, axis)] = (layout[0], entry)

    def use(self, node, kind: str) -> None:
        self.root(node).uses.add(kind)

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
                    if n in self.layout:
                        self.root(n).fixed = True
                continue
            spaced = [n for n in node.all_input_nodes if n in self.layout]
            if node.op == "call_module":
                self.module(node, self.modules[node.target], spaced)
            else:
                self.function(node, spaced)

    def pass_through(self, node: fx.Node, x, use: str | None, spaced: list) -> None:
        """An op that keeps axis 1 where it is and treats each of its indices on its own."""
        if any(n is not x for n in spaced):
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        if x not in self.layout:
            return
        s, o = _shape(x), _shape(node)
        if o is None or len(o) < 2 or o[:2] != s[:2]:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, changing shape {s} to {o}")
        self.layout[node] = self.layout[x]
        self.root(node).taps.append(node.name)
        if use:
            self.use(node, use)

    def module(self, node: fx.Node, m: nn.Module, spaced: list) -> None:
        x = node.args[0] if node.args else None
        t = node.target
        if isinstance(m, _CONVS + _CONV_TRANSPOSES + (nn.Linear,)):
            if any(n is not x for n in spaced):
                return self.unknown(node, spaced)
            if isinstance(m, nn.Linear):
                shape = _shape(x)
                if shape is None or len(shape) != 2:
                    raise UserError(f"symmetry: node '{node.name}' ({t}: Linear) acts on a tensor of shape "
                                    f"{shape}; only [batch, features] is understood, so cannot align this model.")
            elif m.groups != 1:
                raise UserError(f"symmetry: node '{node.name}' ({t}: {type(m).__name__}) has groups={m.groups}; "
                                "only groups=1 is understood, so cannot align this model.")
            transposed = isinstance(m, _CONV_TRANSPOSES)
            in_axis, out_axis = (0, 1) if transposed else (1, 0)
            kind = "linear" if isinstance(m, nn.Linear) else "conv"
            if x in self.layout:
                self.attach(f"{t}.weight", in_axis, self.layout[x], node)
                self.use(x, f"{kind}_in")
            size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            self.layout[node] = (self.new_space(t, size), 1)
            self.root(node).taps.append(node.name)
            self.attach(f"{t}.weight", out_axis, self.layout[node], node)
            self.attach(f"{t}.bias", 0, self.layout[node], node)
            self.use(node, f"{kind}_out")
        elif isinstance(m, _NORMS):
            self.pass_through(node, x, "norm", spaced)
            if node in self.layout:
                for key in ("weight", "bias", "running_mean", "running_var"):
                    self.attach(f"{t}.{key}", 0, self.layout[node], node)
        elif isinstance(m, nn.PReLU):
            self.pass_through(node, x, "elementwise", spaced)
            if node in self.layout and m.num_parameters > 1:  # one slope per channel
                self.attach(f"{t}.weight", 0, self.layout[node], node)
        elif isinstance(m, nn.Identity):
            self.pass_through(node, x, None, spaced)
        elif isinstance(m, _PER_ELEMENT_MODULES):
            self.pass_through(node, x, "elementwise", spaced)
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            self.reshape(node, x, spaced)
        else:
            self.unknown(node, spaced)

    def function(self, node: fx.Node, spaced: list) -> None:
        target, method = node.target, node.op == "call_method"
        if (method and target in _METADATA_METHODS) or (
                target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS):
            return  # reads the shape, not the values
        if not spaced:
            return  # nothing permuted flows in, so nothing permuted flows out
        x = node.args[0] if node.args else node.kwargs.get("input")
        if method and target in _IDENTITY_METHODS:
            self.pass_through(node, x, None, spaced)
        elif (target in _PER_ELEMENT_METHODS) if method else (target in _PER_ELEMENT_FUNCTIONS):
            others = [n for n in node.all_input_nodes if n is not x and _shape(n) is not None]
            if others:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second tensor input")
            self.pass_through(node, x, "elementwise", spaced)
        elif (target in _RESHAPE_METHODS) if method else (target in _RESHAPE_FUNCTIONS):
            self.reshape(node, x, spaced)
        elif (target in _REDUCE_METHODS) if method else (target in _REDUCE_FUNCTIONS):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            ndim = len(_shape(x) or ())
            dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
            if dim is None or not all(isinstance(d, int) for d in dims) or {d % ndim for d in dims} & {0, 1}:
                return self.unknown(node, spaced, f"{_describe(node, self.modules)} over the batch or channel axis")
            self.pass_through(node, x, "elementwise", spaced)
        elif (target in _BINARY_METHODS) if method else (target in _BINARY_FUNCTIONS):
            self.binary(node, spaced)
        else:
            self.unknown(node, spaced)

    def reshape(self, node: fx.Node, x, spaced: list) -> None:
        """A view keeps the row-major order of the features behind the batch axis: feature f is at axis-1 index
        f // (product of the later dims) before and after, so the blocks follow from the two shapes."""
        shape_only = node.op == "call_method" and node.target in ("view_as", "reshape_as")  # reads args[1]'s shape
        if any(n is not x for n in spaced) and not shape_only:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)} with a second hidden input")
        if x not in self.layout:
            return
        s, o = _shape(x), _shape(node)
        if o is None or len(o) < 2 or o[0] != s[0]:
            return self.unknown(node, spaced, f"{_describe(node, self.modules)}, reshaping {s} to {o} across the "
                                              "batch axis")
        r_in, r_out = math.prod(s[2:]), math.prod(o[2:])
        features = r_in * self.layout[x][1]  # features per unit
        # A channel of the output must lie inside one unit: else merge units until it does.
        self.coarsen(self.find(self.layout[x][0]), r_out // math.gcd(features, r_out), node)
        space, block = self.layout[x]
        self.layout[node] = (space, r_in * block // r_out)
        if o != s:
            self.use(node, "reshape")

    def binary(self, node: fx.Node, spaced: list) -> None:
        out = _shape(node)
        if out is None or len(out) < 2:
            return self.unknown(node, spaced)
        parts, params, pinned = [], [], False
        for a in node.args[:2]:
            s = _shape(a)
            if s is None:
                continue  # a number
            axis = 1 - (len(out) - len(s))  # the operand's axis that broadcasts onto axis 1
            if axis < 0 or s[axis] == 1:
                continue  # the same value for every unit
            if a in self.layout:
                if axis != 1:
                    return self.unknown(node, spaced, f"{_describe(node, self.modules)}, broadcasting a hidden "
                                                      f"tensor of shape {s} to {out}")
                parts.append(a)
            elif a.op == "get_attr" and a.target in self.keys:
                params.append((a.target, axis))
            else:
                pinned = True
        if not parts:
            return
        for b in parts[1:]:
            self.unify(self.layout[parts[0]], self.layout[b], node)
        self.layout[node] = self.layout[parts[0]]
        for key, axis in params:
            self.attach(key, axis, self.layout[node], node)
        self.use(node, "elementwise")
        self.root(node).taps.append(node.name)
        if pinned:
            self.root(node).fixed = True

    def groups(self) -> list[Group]:
        found = []
        for i, space in enumerate(self.spaces):
            if self.find(i) != i or space.fixed:
                continue
            entries = [Entry(*e) for e in space.entries]
            latent = space.uses == {"linear_in", "linear_out"} and all(e.block == 1 for e in entries)
            found.append(Group(space.name, space.size, entries, "latent" if latent else "hidden", list(space.taps)))
        return found


@torch.no_grad()
def find_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The model's permutation groups, in the order the forward pass writes them. `example` is an input batch
    (e.g. [2, channels, image_size, image_size]) from which the shapes of the traced tensors are read; the model
    runs on it once in eval mode, so BatchNorm statistics are not touched."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise UserError(f"symmetry: cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                        f"{exc}); aligning needs a forward pass without data-dependent control flow.") from None
    was_training = model.training
    model.eval()
    try:
        ShapeProp(gm).propagate(example)
    except Exception as exc:
        raise UserError(f"symmetry: the traced {type(model).__name__} fails on an input of shape "
                        f"{tuple(example.shape)} ({type(exc).__name__}: {exc}).") from None
    finally:
        model.train(was_training)
    state = model.state_dict()
    tracer = _Tracer(gm, set(state))
    tracer.run(gm.graph)
    groups = tracer.groups()
    for g in groups:  # a mismatch here is a bug in this module, not in the model
        for e in g.entries:
            if state[e.name].shape[e.axis] != g.size * e.block:
                raise RuntimeError(f"symmetry: group {g.name} ({g.size} x {e.block}) does not fit {e.name} "
                                   f"{tuple(state[e.name].shape)} along axis {e.axis}")
    return groups


# --- applying permutations and latent maps ---------------------------------------------------------------------

def _index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation -> index along the axis: unit i's block of indices takes unit perm[i]'s block."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def _check_perm(perm, group: Group) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (group.size,) or not torch.equal(perm.sort().values, torch.arange(group.size)):
        raise ValueError(f"the permutation for group {group.name} must reorder {group.size} units, got "
                         f"{tuple(perm.shape)} {perm.tolist() if perm.numel() <= 16 else ''}")
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
            out[e.name] = out[e.name].index_select(e.axis, _index(perm, e.block).to(out[e.name].device))
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


def _rows(w: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """One row per unit: the unit's block along `axis` and everything along the other axes."""
    return w.movedim(axis, 0).reshape(size, -1)


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
            along.setdefault(e.name, []).append((g.name, e.axis, e.block))
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
            new = torch.as_tensor(linear_assignment(cost.numpy(), maximize=True, group=g.name))
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
        for name, axis, block in along[e.name]:
            if (name, axis) != (g.name, e.axis):  # the other axes as B is currently permuted
                wb = wb.index_select(axis, _index(perms[name], block))
        ra, rb = _rows(state_a[e.name].double(), e.axis, g.size), _rows(wb, e.axis, g.size)
        cost += ra @ rb.T
        if normalise:  # a row's norm does not depend on how the other axes are ordered
            norms_a += ra.square().sum(dim=1)
            norms_b += rb.square().sum(dim=1)
    if normalise:
        cost /= torch.outer(norms_a.sqrt().clamp_min(1e-12), norms_b.sqrt().clamp_min(1e-12))
    return cost


# --- BatchNorm folded into the layer before it ----------------------------------------------------------------

_WRITERS = _CONVS + _CONV_TRANSPOSES + (nn.Linear,)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_after(model: nn.Module) -> dict[str, str]:
    """{layer: its BatchNorm} for every Conv/ConvTranspose/Linear whose output only a BatchNorm module reads."""
    gm = fx.symbolic_trace(model)  # callers traced it already (find_groups), so this cannot fail
    modules = dict(gm.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _WRITERS):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _BATCHNORMS) \
                and users[0].args[0] is node:
            pairs[node.target] = users[0].target
    return pairs


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
