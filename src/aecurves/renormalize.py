"""REPAIR's correction along a path: `eval-curve --renormalize`.

REPAIR (Jordan et al., ICLR 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair";
github.com/KellerJordan/REPAIR) repairs the network (1 − α)·θ_A + α·θ_B between two (aligned) networks by
giving each layer's output channels the statistics interpolated between the endpoints':
- it measures, on training images, every layer's per-channel output mean μ and std σ in A and in B;
- it sets the interpolated network's target statistics to (1 − α)·μ_A + α·μ_B and (1 − α)·σ_A + α·σ_B;
- it puts a BatchNorm-like "reset" layer after each layer, with the targets as its affine weight and bias, and
  runs the network over the data in training mode (momentum None), so that each reset layer collects the
  interpolated network's own statistics;
- it fuses the reset layers into the preceding convolution:
  W' = W·γ/√(var + eps), b' = β + γ/√(var + eps)·(b − μ).

Here a path's networks already get their BatchNorm statistics recomputed at every t (the evaluation protocol),
which is REPAIR's correction for the layers that BatchNorm reads. So only the Conv*/ConvTranspose*/Linear
layers whose output is NOT read directly by a BatchNorm are corrected (`find_layers`, by torch.fx: a layer
whose every consumer, at every call, is a BatchNorm module is covered: capture.read_only_by_batchnorm), the
output layer left out by default (deviation 4); in the built-in ConvAutoencoder that leaves the two latent Linear
layers. At each t, for each such layer, with
per-channel (Conv: per output channel; Linear: per output feature) statistics over the BN subset of training
images:

    σ_X = √(var_X + eps)                               (eps = 1e-5, BatchNorm's)
    μ_target = (1 − t)·μ_A + t·μ_B,   σ_target = (1 − t)·σ_A + t·σ_B
    s = σ_target / σ,   W' = W·s,   b' = (b − μ)·s + μ_target

where μ, var are the interpolated network's own statistics at that layer. The corrected network is an ordinary
set of weights (the correction lives in the layer's weight and bias), so losses, metrics, pictures and the
vmapped evaluation of several points at once see nothing new (`RenormalizedPath` is a path whose weights at t
are the corrected ones; points_per_call > 1 needs no fallback: the correction is computed one point at a time,
then the corrected weights are stacked like any others). For a curve, A and B are its endpoints (t = 0 and
t = 1) and the targets are mixed by the curve's own t.

Deviations from REPAIR, and why:
1. **Statistics of the network as it is evaluated, measured layer by layer** (method "layerwise", what
   eval-curve uses). REPAIR collects all reset layers' statistics in one training-mode pass, each reset layer
   normalising its batch with the batch's own statistics, so a later layer's statistics are those of a
   network that is not the fused one (batch statistics upstream, not the running ones), and its running
   variance is the mean of per-batch variances. Here each corrected layer's statistics are measured in eval
   mode (BatchNorm with its recomputed running statistics, exactly the network that is evaluated) over the
   whole BN subset (pooled mean and variance, float64), in forward order, each after the layers before it
   were corrected; BatchNorm statistics are recomputed again before a layer whenever a BatchNorm between it
   and an earlier corrected layer saw that correction. The promise then holds exactly
   (tests/test_renormalize.py): every corrected layer's output has the target mean, and std
   σ_target·√var/√(var + eps), on the BN subset, to 1e-4; and at t = 0 and t = 1 (s = 1 exactly) the correction
   is the identity up to float rounding. REPAIR's own pass (`repair_pass`, method "repair", kept for the
   comparison in benchmarks/renormalize_segments.py) is not: on the tiny test models (batches of 32) it moves
   the t = 0 network's outputs by up to 3e-3 and misses the targets by a few percent. On the CelebA sample
   (batches of 256) both gave the same barriers to 1e-5. The cost: per point one eval-mode pass per corrected
   layer (stopped after it) and a BatchNorm pass per BatchNorm-separated stage over the BN subset, besides the
   plain evaluation's: about 3x a plain point for the built-in model.
2. **eps in both stds.** REPAIR's VGG notebook takes σ = √running_var for the targets but divides by
   √(running_var + eps) when it fuses, so its α = 0 network is not A (each channel shrinks by
   √(var/(var + eps))). Its MLP notebook puts eps into the target; here σ = √(var + eps) for A, B and the
   interpolated network alike, so s = 1 exactly at the endpoints, and s ≤ σ_target/√eps for a channel that
   is (nearly) constant, REPAIR's bound.
3. **Which data.** REPAIR uses its (augmented) training loader; here the fixed BN subset of the evaluation
   protocol (eval-curve's --bn-images, or all training images with --full), unaugmented, the same images
   BatchNorm statistics come from at every t. The endpoint statistics are measured once per path on it, at
   the endpoints with their BatchNorm statistics recomputed from it (the networks the path evaluates at
   t = 0 and t = 1).
4. **Which layers.** REPAIR puts a reset layer after every conv (and, in its MLP notebook, every Linear,
   the logits included; its VGG notebook leaves the classifier out); BatchNorm networks it only resets.
   Here layers read by BatchNorm are left to the BN recomputation (a reset layer right before a BatchNorm in
   eval mode would be undone by it up to the BatchNorm's eps), and the output layer (no Conv, Linear or
   BatchNorm after it) is left as it is unless `include_output`: measured on the CelebA sample (docs/alignment.md),
   correcting it made two of three naive segments worse than the plain ones (−50% and −2% of the barrier
   removed, against +3% and +14% without), and on the aligned segments the two choices are within 2 points.
   A layer without a bias (its mean cannot be moved within its weights), one called more than once in the
   forward pass (one correction cannot fit every call), and one whose parameters are not the module's own
   (tied elsewhere) are left uncorrected and listed in `Plan.skipped`.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.func import functional_call

from aecurves import capture
from aecurves.curves import Curve, batchnorms, bn_passes, recompute_bn
from aecurves.errors import UserError

EPS = 1e-5  # BatchNorm's default eps, REPAIR's too

LAYER_TYPES = capture.LAYERS  # the layers it corrects, and the BatchNorms: the alignment's (capture's) lists
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = capture.BATCHNORM


@dataclass(frozen=True)
class Layer:
    """A layer that gets a correction."""
    name: str                # module name, e.g. "encoder.4"
    weight: str              # parameter names
    bias: str
    kind: str                # Linear, Conv2d, ConvTranspose2d ...
    transposed: bool         # ConvTranspose: weight [in, out/groups, ...]
    groups: int
    channels: int            # output channels (features)
    output: bool             # no Conv/Linear/BatchNorm module after it: it writes the network's output
    bn_before: frozenset     # BatchNorm modules it reads through (upstream)
    bn_after: frozenset      # BatchNorm modules that read through it (downstream)


@dataclass
class Plan:
    """Which layers `--renormalize` corrects (`layers`, in forward order) and which it does not, and why."""
    layers: list
    covered: list = field(default_factory=list)   # read only by BatchNorm: the BN recomputation renormalises them
    skipped: dict = field(default_factory=dict)   # name -> why it is not corrected

    @property
    def names(self) -> list:
        return [layer.name for layer in self.layers]

    def record(self) -> dict:
        return {"layers": self.names, "count": len(self.layers),
                "output_layer_corrected": any(layer.output for layer in self.layers),
                "covered_by_batchnorm": list(self.covered), "skipped": dict(self.skipped), "eps": EPS}


def trace(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """torch.fx's graph of the model, else (given an example input) a recording of one run (capture.trace)."""
    return capture.trace(model, example, "--renormalize")


def find_layers(model: nn.Module, include_output: bool = False, example: torch.Tensor | None = None) -> Plan:
    """The Conv*/ConvTranspose*/Linear modules of `model` whose output is not read directly by a BatchNorm
    module, found in its graph (trace; `example`: an input batch, for a model torch.fx cannot trace): a layer
    that only BatchNorm modules read (capture.read_only_by_batchnorm, alignment's rule too) is covered (its
    statistics are renormalised when BatchNorm's are recomputed); every other one is corrected, the output layer
    (no Conv/Linear/BatchNorm after it) only with `include_output`."""
    gm = trace(model, example)
    modules = dict(gm.named_modules())
    plan = Plan([], covered=list(capture.read_only_by_batchnorm(gm)))
    upstream = _upstream(gm, modules)
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    counted = [n for n in gm.graph.nodes if _module_of(n, modules, (*LAYER_TYPES, BATCHNORM))]
    bn_nodes = [n for n in gm.graph.nodes if _module_of(n, modules, BATCHNORM)]
    params = dict(model.named_parameters())
    seen = set(plan.covered)
    for node in gm.graph.nodes:
        name, m = node.target, _module_of(node, modules, LAYER_TYPES)
        if m is None or name in seen:
            continue
        seen.add(name)
        output = not any(name in upstream[n] for n in counted)
        why = _why_not_corrected(m, calls[name], capture.data_readers(node), params, name, output, include_output)
        if why:
            plan.skipped[name] = why
            continue
        plan.layers.append(Layer(
            name=name, weight=f"{name}.weight", bias=f"{name}.bias", kind=type(m).__name__,
            transposed=isinstance(m, TRANSPOSED), groups=getattr(m, "groups", 1),
            channels=m.out_features if isinstance(m, nn.Linear) else m.out_channels, output=output,
            bn_before=frozenset(b for b in upstream[node] if isinstance(modules[b], BATCHNORM)),
            bn_after=frozenset(b.target for b in bn_nodes if name in upstream[b])))
    return plan


def _module_of(node: fx.Node, modules: dict, types: tuple) -> nn.Module | None:
    """The module a call_module node calls, if it is one of `types`."""
    module = modules.get(node.target) if node.op == "call_module" else None
    return module if isinstance(module, types) else None


def _upstream(gm: fx.GraphModule, modules: dict) -> dict:
    """{node: the Conv/Linear/BatchNorm modules whose output flows (as data, not shape) into it}."""
    upstream = {}
    for node in gm.graph.nodes:
        above = set()
        if not capture.is_shape_query(node):
            for source in node.all_input_nodes:
                above |= upstream[source]
                if _module_of(source, modules, (*LAYER_TYPES, BATCHNORM)) is not None:
                    above.add(source.target)
        upstream[node] = frozenset(above)
    return upstream


def _why_not_corrected(m: nn.Module, calls: int, readers: list, params: dict, name: str, output: bool,
                       include_output: bool) -> str | None:
    """Why a layer that BatchNorm does not cover is left uncorrected; None if it is corrected."""
    if calls > 1:
        return f"called {calls} times in the forward pass: one correction cannot fit every call"
    if not readers:
        return "its output is not used"
    if m.bias is None:
        return "no bias: the mean of its output cannot be moved within its weights"
    if params.get(f"{name}.weight") is not m.weight or params.get(f"{name}.bias") is not m.bias:
        return "its parameters are shared with another module"
    if output and not include_output:
        return ("the output layer (no Conv, Linear or BatchNorm after it), left as it is: correcting it measured "
                "worse (docs/alignment.md)")
    return None


def no_layers_message(plan: Plan) -> str:
    parts = []
    if plan.covered:
        parts.append(f"{len(plan.covered)} layer(s) read only by BatchNorm, which the BN recomputation at every "
                     "t already renormalises")
    parts += [f"{name}: {why}" for name, why in plan.skipped.items()]
    found = "; ".join(parts) if parts else "no Conv, ConvTranspose or Linear module at all"
    return (f"--renormalize has nothing to correct in this model ({found}): the renormalised path would be the "
            "plain one. Leave --renormalize out.")


# --- statistics ---------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _channel_view(out: torch.Tensor, linear: bool) -> torch.Tensor:
    """[rows, channels] in float64: Linear's last dimension, a conv's dimension 1 (batched input)."""
    out = out.detach().double()
    if linear:
        return out.reshape(-1, out.shape[-1])
    return out.transpose(0, 1).reshape(out.shape[1], -1).T


@torch.no_grad()
def layer_statistics(base: nn.Module, weights: dict, loader, layers: list, stop: bool = True) -> dict:
    """{name: (mean, var)}: per output channel of each of `layers`, the mean and (biased, population) variance
    of its output over every image of `loader`, in float64, with `base` in eval mode at `weights` (its buffers
    as they are). Batches are combined exactly (Chan et al.'s pairwise update). With `stop`, each forward pass
    stops once the last of `layers` has run."""
    modules = dict(base.named_modules())
    acc = {layer.name: None for layer in layers}
    last = layers[-1].name

    def hook_for(layer):
        linear = layer.kind == "Linear"

        def hook(module, args, out):
            x = _channel_view(out, linear)
            n, mean = x.shape[0], x.mean(0)
            m2 = (x - mean).pow(2).sum(0)
            prev = acc[layer.name]
            if prev is None:
                acc[layer.name] = (n, mean, m2)
            else:
                n0, mean0, m20 = prev
                total = n0 + n
                delta = mean - mean0
                acc[layer.name] = (total, mean0 + delta * (n / total), m20 + m2 + delta.pow(2) * (n0 * n / total))
            if stop and layer.name == last:
                raise _Stop

        return hook

    handles = [modules[layer.name].register_forward_hook(hook_for(layer)) for layer in layers]
    was_training = base.training
    base.eval()
    try:
        for x in loader:
            try:
                functional_call(base, weights, (x,))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    missing = [name for name, a in acc.items() if a is None]
    if missing:
        raise UserError(f"--renormalize: {', '.join(missing)} did not run on the BN images (empty data?).")
    return {name: (mean, m2 / n) for name, (n, mean, m2) in acc.items()}


def sigma(var: torch.Tensor) -> torch.Tensor:
    return (var + EPS).sqrt()


def _per_channel(v: torch.Tensor, out: torch.Tensor, linear: bool) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against a layer's output."""
    shape = [1] * out.dim()
    shape[-1 if linear else 1] = -1
    return v.to(out.dtype).view(shape)


@torch.no_grad()
def repair_pass(base: nn.Module, weights: dict, loader, layers: list, goals: dict | None = None) -> dict:
    """REPAIR's own statistics pass (its notebooks' reset_bn_stats over TrackLayer/ResetLayer): one pass over
    `loader` with `base` in training mode, its BatchNorm statistics recomputed on the way (curves.bn_passes),
    and at each of `layers` the running (size-weighted) mean of the per-batch mean and of the per-batch
    unbiased variance, as BatchNorm's running statistics with momentum None. With `goals` ({name: (mean, std)})
    each layer's output is replaced by its batch-normalised self times std plus mean (the reset layer in
    training mode), so later layers see the corrected batch; without, the output is only observed (TrackLayer).
    Returns {name: (running mean, running var)} in float64. Only for comparison (benchmarks/renormalize_segments.py):
    eval-curve uses Renormalizer's layer-by-layer eval-mode statistics."""
    modules = dict(base.named_modules())
    acc = {layer.name: [0, 0.0, 0.0] for layer in layers}

    def hook_for(layer):
        linear = layer.kind == "Linear"

        def hook(module, args, out):
            x = _channel_view(out, linear)
            n = x.shape[0]
            mean, var = x.mean(0), x.var(0, unbiased=False)
            a = acc[layer.name]
            a[0] += n
            a[1] = a[1] + (mean - a[1]) * (n / a[0])
            a[2] = a[2] + (var * n / max(n - 1, 1) - a[2]) * (n / a[0])
            if goals is None:
                return None
            goal_mean, goal_std = goals[layer.name]
            scale = goal_std / (var + EPS).sqrt()
            return out * _per_channel(scale, out, linear) + _per_channel(goal_mean - mean * scale, out, linear)

        return hook

    handles = [modules[layer.name].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        bn_passes(base, loader, lambda x: functional_call(base, weights, (x,)))
    finally:
        for h in handles:
            h.remove()
    return {name: (mean, var) for name, (_, mean, var) in acc.items()}


# --- the correction -----------------------------------------------------------------------------------------------

@dataclass
class Fold:
    """One layer's correction at one t: W' = W·scale (per output channel), b' = (b − mean)·scale + target_mean."""
    scale: torch.Tensor
    mean: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor


def fold_weights(weights: dict, layer: Layer, fold: Fold) -> dict:
    """`weights` with `layer`'s weight and bias corrected (new tensors; the others shared)."""
    w, b = weights[layer.weight], weights[layer.bias]
    s = fold.scale.to(torch.float64)
    if layer.transposed:  # [in, out/groups, *kernel]: output channel g·(out/groups) + j
        g = layer.groups
        shape = (g, w.shape[0] // g, w.shape[1]) + tuple(w.shape[2:])
        scale = s.view(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (w.double().reshape(shape) * scale).reshape(w.shape)
    else:                 # [out, ...]
        new_w = w.double() * s.view(-1, *([1] * (w.dim() - 1)))
    new_b = (b.double() - fold.mean) * s + fold.target_mean
    return {**weights, layer.weight: new_w.to(w.dtype), layer.bias: new_b.to(b.dtype)}


def make_fold(stats, target_mean: torch.Tensor, target_std: torch.Tensor) -> Fold:
    mean, var = stats
    return Fold(target_std / sigma(var), mean, target_mean, target_std)


class Renormalizer:
    """The correction of `path`'s networks at any t, for the layers of `plan`, from the images of `loader` (the BN
    subset). `bn_loader`: the same loader when the model has BatchNorm (its statistics are recomputed from it),
    else None. The endpoints' statistics are measured on first use; each t's folds are kept (a few vectors per
    layer), so asking again for a t costs one weighted sum of the bends."""

    def __init__(self, path: Curve, plan: Plan, loader, bn_loader=None, method: str = "layerwise"):
        if not plan.layers:
            raise UserError(no_layers_message(plan))
        if method not in ("layerwise", "repair"):
            raise ValueError(f"unknown renormalisation method {method!r}")
        self.path, self.plan, self.loader, self.method = path, plan, loader, method
        self.bn_loader = bn_loader if batchnorms(path.base) else None
        self.endpoints = None
        self.folds = {}
        self.passes = 0  # passes over the loader, BN recomputations included (for the records and tests)

    @property
    def base(self) -> nn.Module:
        return self.path.base

    def recompute_bn(self, weights: dict) -> None:
        if self.bn_loader is not None:
            recompute_bn(self.base, weights, self.bn_loader)
            self.passes += 1

    def statistics(self, weights: dict, layers: list) -> dict:
        self.passes += 1
        return layer_statistics(self.base, weights, self.loader, layers)

    def endpoint_statistics(self) -> list:
        """[A's, B's] {name: (mean, var)}: the networks at t = 0 and t = 1 with BN statistics recomputed."""
        if self.endpoints is None:
            ends = []
            for t in (0.0, 1.0):
                weights = self.path.weights(t)
                if self.method == "repair":  # TrackLayers in REPAIR's training-mode pass
                    self.passes += 1
                    ends.append(repair_pass(self.base, weights, self.loader, self.plan.layers))
                    continue
                self.recompute_bn(weights)
                ends.append(self.statistics(weights, self.plan.layers))
            self.endpoints = ends
        return self.endpoints

    def targets(self, t: float) -> dict:
        """{name: (target mean, target std)} at t: (1 − t)·A's + t·B's, std as √(var + eps)."""
        a, b = self.endpoint_statistics()
        std = (lambda v: v.sqrt()) if self.method == "repair" else sigma  # REPAIR's VGG notebook: √running_var
        out = {}
        for layer in self.plan.layers:
            (ma, va), (mb, vb) = a[layer.name], b[layer.name]
            out[layer.name] = ((1 - t) * ma + t * mb, (1 - t) * std(va) + t * std(vb))
        return out

    @torch.no_grad()
    def folds_at(self, t: float) -> dict:
        """{name: Fold} at t. Leaves `base`'s BatchNorm buffers as they were last recomputed (callers recompute
        them for the corrected weights, as the evaluation protocol does at every point)."""
        key = float(t)
        if key in self.folds:
            return self.folds[key]
        targets = self.targets(key)
        weights = self.path.weights(key)
        if self.method == "repair":  # ResetLayers in one training-mode pass, then fused as REPAIR fuses them
            self.passes += 1
            stats = repair_pass(self.base, weights, self.loader, self.plan.layers, targets)
            self.folds[key] = {name: Fold(goal_std / sigma(stats[name][1]), stats[name][0], goal_mean, goal_std)
                               for name, (goal_mean, goal_std) in targets.items()}
            return self.folds[key]
        self.recompute_bn(weights)
        stale = set()   # BatchNorm modules that read through a layer corrected since the last recomputation
        folds = {}
        for layer in self.plan.layers:
            if stale & layer.bn_before:
                self.recompute_bn(weights)
                stale.clear()
            stats = self.statistics(weights, [layer])[layer.name]
            folds[layer.name] = make_fold(stats, *targets[layer.name])
            weights = fold_weights(weights, layer, folds[layer.name])
            stale |= layer.bn_after
        self.folds[key] = folds
        return folds

    def weights_at(self, t: float) -> dict:
        """The corrected network's weights at t: the plain ones with every layer's fold applied (each fold touches
        only its own layer, so applying them to the plain weights gives what folds_at built step by step)."""
        folds = self.folds_at(t)
        weights = self.path.weights(float(t))
        for layer in self.plan.layers:
            weights = fold_weights(weights, layer, folds[layer.name])
        return weights


class RenormalizedPath(nn.Module):
    """A path whose network at t is `path`'s with REPAIR's correction (`Renormalizer`): the interface of Curve
    that evaluation uses (base, unflatten, flat_at, weights, forward, update_bn), so evaluate_path,
    step_lengths and reconstructions_along run it unchanged. Its length is that of the corrected networks."""

    def __init__(self, path: Curve, renormalizer: Renormalizer):
        super().__init__()
        self.path = path
        self.renormalizer = renormalizer

    @property
    def base(self) -> nn.Module:
        return self.path.base

    @property
    def curve_name(self) -> str:
        return self.path.curve_name

    @property
    def num_bends(self) -> int:
        return self.path.num_bends

    def unflatten(self, flat: torch.Tensor) -> dict:
        return self.path.unflatten(flat)

    @torch.no_grad()
    def flat_at(self, t) -> torch.Tensor:
        weights = self.renormalizer.weights_at(float(t))
        return torch.cat([weights[n].reshape(-1) for n in self.path.param_names])

    def weights(self, t) -> dict:
        return self.unflatten(self.flat_at(t))

    def forward(self, x: torch.Tensor, t, weights: dict | None = None) -> torch.Tensor:
        return functional_call(self.base, weights if weights is not None else self.weights(t), (x,))

    @torch.no_grad()
    def update_bn(self, batches, t, num_batches: int | None = None) -> int:
        if not batchnorms(self.base):
            return 0
        weights = self.weights(t)  # first: the correction recomputes BN statistics on the way
        return recompute_bn(self.base, weights, batches, num_batches)

