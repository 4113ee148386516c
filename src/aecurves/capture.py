"""A network's forward pass as a torch.fx graph, for alignment (symmetry.find_groups, align's activation taps) and
--renormalize (renormalize.find_layers), and the one question both ask of it: which layers only BatchNorm reads
(read_only_by_batchnorm).

trace first asks torch.fx: symbolic_trace runs forward on proxies, so a model it traces today gets exactly today's
graph. fx refuses Python control flow on shapes or configuration (diffusers' AutoencoderKL: "symbolically traced
variables cannot be used as inputs to control flow"); there the network runs once on a concrete example and what
ran is recorded as a straight-line graph (record), at the level fx would have traced it:
  - leaf modules (fx's rule: torch.nn modules that are not containers, e.g. Conv2d, Linear, GroupNorm, SiLU) are
    call_module nodes, nothing inside them recorded;
  - the torch functions and tensor methods called in between, seen through a TorchFunctionMode, are call_function
    and call_method nodes with fx's targets (operator.add for `a + b` or `a += b`, "view" for `x.view(...)`,
    torch.cat, F.scaled_dot_product_attention...); parameters and buffers used directly are get_attr nodes;
  - everything else runs concretely: Python branches take the example's path and shapes read from tensors are
    plain ints, so the graph is this input shape's (a batch of another size needs its own capture).
A recorded graph is kept only if it computes what the model computes, to TOLERANCE, on the example and on a second
input of its shape (a value the recorder missed would have been baked in as a constant and is caught there).

Either way the nodes carry node.meta["tensor_meta"] (ShapeProp's) when an example is given; the model runs in eval
mode without gradients, under a forked RNG, and every module's training flag is restored afterwards, so BatchNorm
statistics and the caller's random streams are untouched.
"""

import contextlib
import inspect
import operator
import threading
import types
from itertools import chain

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from aecurves.config import ALIGN_TOLERANCE
from aecurves.errors import UserError

# the recording must compute the model's outputs as closely as an aligned network must keep them: fused kernels
# (nn.MultiheadAttention's fast path in eval mode) round differently from their ops replayed one by one
TOLERANCE = ALIGN_TOLERANCE

# Tensor methods as the TorchFunctionMode sees them -> the operator fx records for the Python syntax (`a + b`
# reaches the mode as Tensor.add, `2 - a` as Tensor.__rsub__(a, 2), `a += b` as Tensor.add_, which fx records as
# `a = a + b`): taken only for plain (a, b) / (a,) calls, so `a.add(b, alpha=2)` stays a method call
_SYNTAX = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor", "lshift",
           "rshift")
_BINARY = {**{f"__{op.strip('_')}__": getattr(operator, op) for op in _SYNTAX},
           **{f"__i{op.strip('_')}__": getattr(operator, op) for op in _SYNTAX},
           **{name: getattr(operator, name) for name in ("add", "sub", "mul", "matmul", "eq", "ne", "lt", "gt",
                                                          "le", "ge")},
           **{f"__{name}__": getattr(operator, name) for name in ("eq", "ne", "lt", "gt", "le", "ge", "getitem")},
           "div": operator.truediv, "__div__": operator.truediv, "__idiv__": operator.truediv,
           "remainder": operator.mod, "add_": operator.add, "sub_": operator.sub, "mul_": operator.mul,
           "div_": operator.truediv}
_REFLECTED = {**{f"__r{op.strip('_')}__": getattr(operator, op) for op in _SYNTAX}, "__rdiv__": operator.truediv}
_UNARY = {"neg": operator.neg, "positive": operator.pos, "__invert__": operator.invert}


class _NotCaptured(Exception):
    """Why a recording was refused: a sentence for the UserError."""


def trace(model: nn.Module, example: torch.Tensor | None = None, purpose: str = "aligning") -> fx.GraphModule:
    """The model's forward pass as a GraphModule: torch.fx's symbolic trace, else a recording of one run on
    `example` (see the module's docstring). `purpose` names what needs the graph in the error message."""
    with _untouched(model, example):
        try:
            return _by_fx(model, example)
        except Exception as exc:  # fx raises anything from a proxy that met Python control flow
            by_fx = f"{type(exc).__name__}: {_first_line(exc)}"
        if example is None:
            raise UserError(f"{purpose}: torch.fx cannot trace {type(model).__name__} ({by_fx}), and no example "
                            "input was given to run it on and record its graph instead: pass an input batch "
                            "(example=...) to capture it.")
        try:
            return _record(model, example)
        except _NotCaptured as exc:
            raise UserError(f"{purpose} needs {type(model).__name__}'s forward pass as a graph, and it could not "
                            f"be captured: torch.fx cannot trace it ({by_fx}), and recording the modules and "
                            f"tensor operations it runs on an input of shape {tuple(example.shape)} failed too "
                            f"({exc}). {_ADVICE}") from None


_ADVICE = ("Make forward a function of its input built from torch modules and tensor operations, with no branch "
           "on the input's values, that returns a tensor or a tuple of tensors (wrap a network that returns a "
           "dataclass or a dict in a module that returns its tensors).")


def record(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The recorder alone (trace's fallback): the straight-line graph of one run of `model` on `example`."""
    with _untouched(model, example):
        try:
            return _record(model, example)
        except _NotCaptured as exc:
            raise UserError(f"{type(model).__name__} could not be recorded on an input of shape "
                            f"{tuple(example.shape)}: {exc}. {_ADVICE}") from None


def example_input(arch: dict, model: nn.Module) -> torch.Tensor:
    """Two mid-grey images of the architecture's shape on the model's device: an input to capture a graph with."""
    device = next(chain(model.parameters(), model.buffers()), torch.empty(0)).device
    size = arch["image_size"]
    return torch.full((2, arch["channels"], size, size), 0.5, device=device)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


@contextlib.contextmanager
def _untouched(model: nn.Module, example):
    """Eval mode and no gradients, the caller's RNG state forked, every module's own training flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    tensors = chain(model.parameters(), model.buffers(), [example] if example is not None else [])
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _by_fx(model: nn.Module, example) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    if example is not None:
        ShapeProp(gm).propagate(example)
    return gm


def _record(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    recorder = _Recorder(model)
    x = example.clone()  # a forward pass that writes into its input must not write into the caller's
    recorder.bind(x, recorder.graph.placeholder(_input_name(model)))
    torch.manual_seed(0)  # the RNG is forked: the checks below replay the same random draws, if any
    try:
        with _patched_module_calls(recorder), recorder:
            out = model(x)
    except Exception as exc:
        raise _NotCaptured(f"running it failed ({type(exc).__name__}: {_first_line(exc)})") from None
    recorder.graph.output(recorder.output(out, type(model).__name__))
    recorder.drop_unused()
    gm = recorder.module()
    _check(model, gm, example, out)
    return gm


def _input_name(model: nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params and params[0].isidentifier() else "x"


def _check(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor, out) -> None:
    """The recorded graph must compute the model's output: on the example (where ShapeProp fills in the tensors'
    metadata) and on a second input of its shape, random in [0, 1) like an image."""
    torch.manual_seed(0)
    try:
        got = ShapeProp(gm).propagate(example.clone())
    except Exception as exc:
        raise _NotCaptured(f"the recorded graph fails to run ({type(exc).__name__}: {_first_line(exc)}), so "
                           "some operation was not recorded as it ran") from None
    _compare(got, out, "the example")
    other = torch.rand(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
    torch.manual_seed(0)
    want = model(other.clone())
    torch.manual_seed(0)
    _compare(gm(other.clone()), want, "a second input of the same shape")


def _compare(got, want, on: str) -> None:
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise _NotCaptured(f"the recorded graph returns {len(got_leaves)} tensors on {on}, the model "
                           f"{len(want_leaves)}")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if g.shape != w.shape:
            raise _NotCaptured(f"output {i} of the recorded graph has shape {tuple(g.shape)} on {on}, the "
                               f"model's {tuple(w.shape)}")
        if g.numel() and not torch.allclose(g.double(), w.double(), rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True):
            worst = (g.double() - w.double()).abs().nan_to_num(nan=float("inf")).max().item()
            raise _NotCaptured(f"output {i} of the recorded graph differs from the model's by {worst:.3g} on "
                               f"{on} (tolerance {TOLERANCE:g}): the forward pass depends on the input through "
                               "something the recorder does not see (a branch on its values, .item(), an "
                               "operation outside torch...)")


def _leaves(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


@contextlib.contextmanager
def _patched_module_calls(recorder: "_Recorder"):
    """Every module call goes through the recorder while it records, as fx's own tracer patches it."""
    original = nn.Module.__call__

    def call(module, *args, **kwargs):
        return recorder.call_module(original, module, args, kwargs)

    nn.Module.__call__ = call
    try:
        yield
    finally:
        nn.Module.__call__ = original


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


# id -> name of the Tensor methods, as the mode receives them (`x ** 2` as Tensor.__pow__, `x.pow(2)` as
# TensorBase.pow); TensorBase's first, so `-x`, which is both TensorBase.neg and Tensor.__neg__, is "neg"
_METHODS = {}
for _cls in reversed(torch.Tensor.__mro__[:-1]):
    for _name, _value in vars(_cls).items():
        if callable(_value):
            _METHODS.setdefault(id(_value), _name)


def _fx_call(func, args: tuple, kwargs: dict) -> tuple:
    """(op, target, args, kwargs) as torch.fx would record this call."""
    name = _METHODS.get(id(func)) if args and isinstance(args[0], torch.Tensor) else None
    if name is not None:
        if not kwargs and len(args) == 2 and name in _BINARY:
            return "call_function", _BINARY[name], args, {}
        if not kwargs and len(args) == 2 and name in _REFLECTED:
            return "call_function", _REFLECTED[name], (args[1], args[0]), {}
        if not kwargs and len(args) == 1 and name in _UNARY:
            return "call_function", _UNARY[name], args, {}
        if name == "__setitem__":
            return "call_function", operator.setitem, args, kwargs
        return "call_method", name, args, kwargs
    descriptor = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and isinstance(descriptor, (types.GetSetDescriptorType, property)):
        return "call_function", getattr, (args[0], descriptor.__name__), {}  # x.T, x.mT, x.data
    return "call_function", func, args, kwargs


class _Recorder(TorchFunctionMode):
    """Records one run: module calls through call_module (patched in), torch functions and tensor methods through
    __torch_function__. Tensors are known by id; every bound tensor is kept alive so that no id is reused."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.graph = fx.Graph()
        self.thread = threading.get_ident()
        self.depth = 0  # > 0 inside a leaf module: nothing is recorded there
        self.nodes: dict[int, fx.Node] = {}
        self.kept: list = []
        self.module_names = {id(m): name for name, m in model.named_modules() if name}
        self.attrs = dict(chain(model.named_parameters(), model.named_buffers()))
        self.attr_names = {id(t): name for name, t in self.attrs.items()}
        self.constants: dict[str, torch.Tensor] = {}
        self.leaf_rule = fx.Tracer()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth or threading.get_ident() != self.thread:
            return func(*args, **kwargs)
        op, target, fx_args, fx_kwargs = _fx_call(func, args, kwargs)
        node_args, node_kwargs = self.arg(fx_args), self.arg(fx_kwargs)  # before an in-place op rebinds its input
        result = func(*args, **kwargs)
        if _has_tensor(result) or target is operator.setitem:  # sizes, ints, bools: concrete values, not nodes
            self.bind(result, self.graph.create_node(op, target, node_args, node_kwargs))
        return result

    def call_module(self, original, module, args, kwargs):
        name = self.module_names.get(id(module))
        if self.depth or threading.get_ident() != self.thread or name is None \
                or not self.leaf_rule.is_leaf_module(module, name):
            return original(module, *args, **kwargs)  # the root, containers, user modules: traced through
        node_args, node_kwargs = self.arg(args), self.arg(kwargs)
        self.depth += 1
        try:
            result = original(module, *args, **kwargs)
        finally:
            self.depth -= 1
        self.bind(result, self.graph.create_node("call_module", name, node_args, node_kwargs))
        return result

    def arg(self, value):
        """A call's argument with its tensors replaced by their nodes; other values are constants."""
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if isinstance(value, torch.Size) or not _has_tensor(value):
            return value
        if isinstance(value, tuple):
            items = [self.arg(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [self.arg(v) for v in value]
        return {k: self.arg(v) for k, v in value.items()}

    def node_of(self, tensor: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(tensor))
        if node is None:  # not computed here: a parameter or buffer, else a constant (as fx makes it)
            name = self.attr_names.get(id(tensor))
            if name is None:
                name = f"_tensor_constant{len(self.constants)}"
                self.constants[name] = tensor
            node = self.graph.get_attr(name)
            self.bind(tensor, node)
        return node

    def bind(self, value, node: fx.Node) -> None:
        """The result's tensors come from `node`: directly, or as its elements (getitem, as fx records x[i])."""
        if isinstance(value, torch.Tensor):
            self.nodes[id(value)] = node
            self.kept.append(value)
            return
        items = enumerate(value) if isinstance(value, (tuple, list)) else \
            value.items() if isinstance(value, dict) else ()
        for key, item in items:
            if _has_tensor(item):
                self.bind(item, self.graph.call_function(operator.getitem, (node, key)))

    def output(self, out, model_name: str):
        if isinstance(out, torch.Tensor):
            return self.node_of(out)
        if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in _leaves(out)):
            return self.arg(tuple(out))
        raise _NotCaptured(f"{model_name}.forward returns {type(out).__name__}, not a tensor or a tuple of tensors")

    def drop_unused(self) -> None:
        """Removes what nothing reads: unused elements of results (made by bind), and values only branched on
        (`if x.sum() > 0`), which fx would never have recorded. In-place operations stay: what they write is read
        later."""
        for node in reversed(list(self.graph.nodes)):
            if node.op in ("call_function", "call_method", "call_module", "get_attr") and not node.users \
                    and not _writes(node):
                self.graph.erase_node(node)

    def module(self) -> fx.GraphModule:
        root = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                root[node.target] = self.model.get_submodule(node.target)
            elif node.op == "get_attr":
                root[node.target] = self.attrs[node.target] if node.target in self.attrs else \
                    self.constants[node.target]
        try:
            return fx.GraphModule(root, self.graph, class_name=type(self.model).__name__)
        except Exception as exc:
            raise _NotCaptured(f"the recorded graph cannot be compiled ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from None


def _writes(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.op == "call_function" and node.target is operator.setitem


# --- which layers only BatchNorm reads ----------------------------------------------------------------------------

# the layers whose output channels a BatchNorm after them normalises, and the BatchNorms: every module of torch's
# BatchNorm family (BatchNorm1d/2d/3d, SyncBatchNorm, their lazy forms and subclasses), in training or eval mode
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
BATCHNORM = nn.modules.batchnorm._BatchNorm
SHAPE_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda")
SHAPE_METHODS = ("size", "dim", "numel")


def is_shape_query(node: fx.Node) -> bool:
    """A node that reads only a tensor's shape (x.shape, x.size()): no data flows through it."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in SHAPE_ATTRIBUTES
    return node.op == "call_method" and node.target in SHAPE_METHODS


def data_readers(node: fx.Node) -> list:
    """The nodes that read `node`'s values (its users, less those that only ask for its shape)."""
    return [user for user in node.users if not is_shape_query(user)]


def read_only_by_batchnorm(gm: fx.GraphModule) -> dict[str, tuple]:
    """{layer: the BatchNorm modules that read it} for every LAYERS module whose output, at every one of its calls,
    is read as data by BatchNorm modules (BATCHNORM) and by nothing else; in the order of the layers' first calls.

    Such a layer's output is seen only as BatchNorm normalises it: whatever scale and shift its channels have,
    BatchNorm's statistics take them out (so --renormalize leaves it to the BatchNorm recomputation, and alignment
    may fold the BatchNorm into it). Hence: a shape query (x.shape, x.size()) reads no data and does not count;
    any other reader (an activation, a residual sum, GroupNorm, torch.nn.functional.batch_norm, which holds its
    statistics outside any module) sees the raw output; a layer called more than once counts only if every call
    is read by BatchNorm alone; an unused output is read by nothing, so by no BatchNorm."""
    modules = dict(gm.named_modules())
    found, refused = {}, set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], LAYERS) or node.target in refused:
            continue
        readers = data_readers(node)
        norms = [u.target for u in readers if u.op == "call_module" and isinstance(modules[u.target], BATCHNORM)]
        if readers and len(norms) == len(readers):
            found[node.target] = tuple(dict.fromkeys(found.get(node.target, ()) + tuple(norms)))
        else:
            refused.add(node.target)
            found.pop(node.target, None)
    return found
