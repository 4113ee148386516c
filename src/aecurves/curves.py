"""Curves in weight space between two networks, for any nn.Module.

θ(t) = Σ_k c_k(t) θ_k over `num_bends` copies θ_k of the module's parameters (Garipov et al., 2018).
The module is never rewritten: its parameters are replaced by θ(t) at call time with
`torch.func.functional_call`, so Conv2d, ConvTranspose2d, Linear, BatchNorm, GroupNorm... all just work.
Each bend is stored as one flat vector, so θ(t) and its squared norm cost a few vector operations.
"""

import copy
import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from aecurves.errors import UserError


class Bezier:
    """Bernstein basis: c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k)."""

    name = "Bezier"

    def __init__(self, num_bends: int):
        self.num_bends = num_bends
        n = num_bends - 1
        self.binom = torch.tensor([math.comb(n, k) for k in range(num_bends)], dtype=torch.float64)
        self.k = torch.arange(num_bends, dtype=torch.float64)

    def __call__(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        n = self.num_bends - 1
        return (self.binom * t**self.k * (1 - t) ** (n - self.k)).float()


class PolyChain:
    """Piecewise linear through the bends, which sit at t = k / (num_bends - 1)."""

    name = "PolyChain"

    def __init__(self, num_bends: int):
        self.num_bends = num_bends
        self.k = torch.arange(num_bends, dtype=torch.float64)

    def __call__(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return (1 - (t * (self.num_bends - 1) - self.k).abs()).clamp_min(0).float()


COEFFICIENTS = {"bezier": Bezier, "polychain": PolyChain}


def make_coefficients(name: str, num_bends: int):
    cls = COEFFICIENTS.get(name.lower())
    if cls is None:
        raise UserError(f"Unknown curve {name!r}; choose Bezier or PolyChain.")
    if num_bends < 2:
        raise UserError(f"--num_bends must be at least 2 (the two endpoints), got {num_bends}.")
    return cls(num_bends)


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn(module: nn.Module, weights: dict, batches, num_batches: int | None = None) -> int:
    """Recomputes `module`'s BatchNorm running statistics with its parameters replaced by `weights`.

    Statistics are reset and then averaged over the batches weighted by batch size (momentum
    b / (seen + b) per batch, as the paper does), so a short last batch does not count extra.
    Returns the number of images used (0 when the module has no BatchNorm).
    """
    if not batchnorms(module):
        return 0
    return bn_passes(module, batches, lambda x: functional_call(module, weights, (x,)), num_batches)


@torch.no_grad()
def recompute_bn_stacked(module: nn.Module, weights: dict, count: int, batches) -> dict:
    """recompute_bn for `count` networks at once: `weights` holds each parameter stacked [count, ...], and the
    result is every buffer of `module` stacked the same way, each network's BatchNorm statistics recomputed
    for its weights (the module's own buffers are left reset). The networks run in one vmapped call per batch."""
    for m in batchnorms(module):
        m.reset_running_stats()
    buffers = {n: torch.stack([b] * count) for n, b in module.named_buffers()}
    if batchnorms(module):
        forward = stacked_forward(module)
        bn_passes(module, batches, lambda x: forward(weights, buffers, x))
    return buffers


def stacked_forward(module: nn.Module):
    """f(weights, buffers, x) -> [count, batch, ...] (a VAE's output: each of its tensors so): `module` run at each
    of `count` stacked sets of parameters and buffers on the same batch x (torch.func.vmap over functional_call).
    Random draws in training mode (dropout, a VAE's sampled latent) are the same for every network: those separate
    calls draw from one seed (bn_passes), so each network gets the numbers it would get alone."""
    return vmap(lambda w, b, x: functional_call(module, (w, b), (x,)), in_dims=(0, 0, None),
                randomness="same")


BN_SEED = 0  # of the random draws in BN passes (bn_passes)


@contextmanager
def seeded(device: torch.device, seed: int = BN_SEED):
    """torch's random generator for `device` (and the CPU's) seeded with `seed` inside, as it was outside."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def bn_passes(module: nn.Module, batches, forward, num_batches: int | None = None) -> int:
    """Resets `module`'s BatchNorm statistics and runs forward(x) on each batch in training mode with the
    momentum that makes the running statistics the size-weighted mean over the batches. Returns the images seen.

    What training mode draws at random (a VAE's sampled latent, dropout) is drawn from a fixed seed (BN_SEED),
    leaving the caller's random state as it was: the statistics of a network are the same whenever and however
    often they are recomputed (a VAE's at t = 0 in eval-curve, at θ₀ in plane, in the ensembles)."""
    bns = batchnorms(module)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    was_training = module.training
    module.train()
    seen = 0
    device = next(module.parameters(), torch.empty(0)).device
    with seeded(device):
        for i, x in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            for m in bns:
                m.momentum = x.shape[0] / (seen + x.shape[0])
            forward(x)
            seen += x.shape[0]
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    module.train(was_training)
    return seen


class NetworkAt(nn.Module):
    """`base` run with fixed `weights` in place of its parameters, and with `buffers` (e.g. BatchNorm
    statistics recomputed for those weights) in place of its own when given."""

    def __init__(self, base: nn.Module, weights: dict, buffers: dict | None = None):
        super().__init__()
        self.base, self.weights, self.buffers = base, weights, buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.buffers is None:
            return functional_call(self.base, self.weights, (x,))
        return functional_call(self.base, (self.weights, self.buffers), (x,))


class Curve(nn.Module):
    """A curve of `num_bends` control points through the parameter space of `base`.

    All bends start as copies of `base`'s current parameters; `set_endpoints` then loads the two
    endpoints and `init_linear` puts the inner bends on the segment between them. Fixed endpoints
    are stored as tensors that never require grad. `base` keeps its buffers (BatchNorm statistics),
    which the curve uses at whatever t it was last evaluated at.
    """

    def __init__(self, base: nn.Module, curve: str = "bezier", num_bends: int = 3,
                 fix_start: bool = True, fix_end: bool = True):
        super().__init__()
        self.coeffs = make_coefficients(curve, num_bends)
        self.num_bends, self.fix_start, self.fix_end = num_bends, fix_start, fix_end
        self.base = base
        base.requires_grad_(False)  # its own parameters are only templates
        named = list(base.named_parameters())
        if len({p.dtype for _, p in named}) > 1:
            raise ValueError("all parameters of the base module must share one dtype")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.param_numels = [p.numel() for _, p in named]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        fixed = {0: fix_start, num_bends - 1: fix_end}
        self.bends = nn.ParameterList(
            nn.Parameter(flat.clone(), requires_grad=not fixed.get(k, False)) for k in range(num_bends))
        # Each endpoint's own BatchNorm statistics, so θ(0) and θ(1) can run exactly as trained.
        self.endpoint_buffers: list[dict | None] = [None, None]
        # run_base(weights, x) runs `base` at `weights`; None: functional_call itself. train-curve --compile sets
        # functional_call through torch.compile here, so θ(t) stays uncompiled and one graph serves every t.
        self.run_base = None

    @property
    def curve_name(self) -> str:
        return self.coeffs.name

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.bends if p.requires_grad)

    def flatten(self, state: dict) -> torch.Tensor:
        missing = [n for n in self.param_names if n not in state]
        if missing:
            raise UserError(f"The state dict does not fit the model: missing {', '.join(missing[:4])}.")
        return torch.cat([state[n].detach().reshape(-1).to(self.bends[0]) for n in self.param_names])

    @torch.no_grad()
    def set_endpoints(self, start_state: dict, end_state: dict) -> None:
        """Loads two ordinary state dicts of `base` into the first and last bend (and keeps their buffers)."""
        for k, state in ((0, start_state), (self.num_bends - 1, end_state)):
            self.bends[k].copy_(self.flatten(state))
        buffer_names = [n for n, _ in self.base.named_buffers()]
        self.endpoint_buffers = [{n: s[n].detach().cpu().clone() for n in buffer_names if n in s}
                                 for s in (start_state, end_state)]

    @torch.no_grad()
    def init_linear(self) -> None:
        """Inner bends evenly on the segment, as in the paper (for Bezier with 3 bends the curve is the segment)."""
        first, last = self.bends[0], self.bends[-1]
        for k in range(1, self.num_bends - 1):
            alpha = k / (self.num_bends - 1)
            self.bends[k].copy_((1 - alpha) * first + alpha * last)

    def flat_at(self, t) -> torch.Tensor:
        """θ(t) as one flat vector; exact at the bends (1·θ_k + 0·rest is θ_k bit for bit)."""
        c = self.coeffs(t).tolist()
        out = c[0] * self.bends[0]
        for ck, bend in zip(c[1:], self.bends[1:]):
            out = out + ck * bend
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: v.view(s) for n, v, s in zip(self.param_names, flat.split(self.param_numels), self.param_shapes)}

    def weights(self, t) -> dict[str, torch.Tensor]:
        return self.unflatten(self.flat_at(t))

    def l2(self, t) -> torch.Tensor:
        """‖θ(t)‖² over all parameters (the regulariser of curve training is wd/2 times this)."""
        return self.flat_at(t).pow(2).sum()

    def forward(self, x: torch.Tensor, t, weights: dict | None = None) -> torch.Tensor:
        weights = weights if weights is not None else self.weights(t)
        if self.run_base is not None:
            return self.run_base(weights, x)
        return functional_call(self.base, weights, (x,))

    def use_endpoint_buffers(self, which: int) -> None:
        """Copies endpoint `which` (0 = start, 1 = end)'s own BatchNorm statistics into `base`."""
        buffers = self.endpoint_buffers[which]
        if buffers is None:
            raise ValueError("no endpoint buffers: call set_endpoints first")
        with torch.no_grad():
            for n, b in self.base.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])

    @torch.no_grad()
    def update_bn(self, batches, t, num_batches: int | None = None) -> int:
        """Recomputes BatchNorm running statistics at θ(t) from `batches` (the paper's update_bn): see
        `recompute_bn`. Returns the number of images used (0 when the module has no BatchNorm)."""
        if not batchnorms(self.base):
            return 0
        return recompute_bn(self.base, self.weights(t), batches, num_batches)

    @torch.no_grad()
    def state_dict_at(self, t) -> dict[str, torch.Tensor]:
        """An ordinary state dict of `base` at θ(t), with base's current buffers (run update_bn first)."""
        weights = self.weights(t)
        state = self.base.state_dict()
        return {n: (weights[n] if n in weights else v).detach().cpu().clone() for n, v in state.items()}

    # --- checkpoint content: tensors and plain values only, so torch.load(weights_only=True) reads it
    def curve_state(self) -> dict:
        return {"bends": torch.stack([b.detach().cpu() for b in self.bends]),
                "buffers": {n: b.detach().cpu().clone() for n, b in self.base.named_buffers()},
                "endpoint_buffers": self.endpoint_buffers,
                "curve": self.curve_name, "num_bends": self.num_bends,
                "fix_start": self.fix_start, "fix_end": self.fix_end}

    @torch.no_grad()
    def load_curve_state(self, state: dict) -> None:
        bends = state["bends"]
        if tuple(bends.shape) != (self.num_bends, sum(self.param_numels)):
            raise UserError(f"The curve checkpoint holds bends of shape {tuple(bends.shape)}, but this model needs "
                            f"({self.num_bends}, {sum(self.param_numels)}).")
        for k, b in enumerate(self.bends):
            b.copy_(bends[k])
        for n, b in self.base.named_buffers():
            if n in state["buffers"]:
                b.copy_(state["buffers"][n])
        self.endpoint_buffers = list(state["endpoint_buffers"])


class CurvePoint(nn.Module):
    """The curve's network at one fixed t, as an ordinary module (θ(t) computed once, no gradient)."""

    def __init__(self, curve: Curve, t: float):
        super().__init__()
        self.curve, self.t = curve, t
        with torch.no_grad():
            self.weights = {n: w.detach() for n, w in curve.weights(t).items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.curve(x, self.t, self.weights)

    def train(self, mode: bool = True):
        self.curve.train(mode)
        return self


def make_segment(base: torch.nn.Module, start_state: dict, end_state: dict) -> Curve:
    """The straight segment θ(t) = (1 − t)·θ_A + t·θ_B as a Curve (PolyChain with 2 fixed bends)."""
    segment = Curve(base, "polychain", 2, fix_start=True, fix_end=True)
    segment.set_endpoints(start_state, end_state)
    return segment


def segment_of(curve: Curve) -> Curve:
    """The segment between a curve's first and last bend, with the endpoints' own BN buffers."""
    states = []
    for k, buffers in ((0, curve.endpoint_buffers[0]), (-1, curve.endpoint_buffers[1])):
        weights = curve.unflatten(curve.bends[k].detach().cpu().clone())
        states.append({**weights, **(buffers or {})})
    base = copy.deepcopy(curve.base).cpu()
    return make_segment(base, *states).to(curve.bends[0].device)


@torch.no_grad()
def step_lengths(curve: Curve, ts) -> np.ndarray:
    """dl[i] = ‖θ(t_i) − θ(t_{i-1})‖ (dl[0] = 0), in float64 from curve.flat_at."""
    dl = np.zeros(len(ts))
    prev = curve.flat_at(float(ts[0])).double()
    for i in range(1, len(ts)):
        cur = curve.flat_at(float(ts[i])).double()
        dl[i] = (cur - prev).norm().item()
        prev = cur
    return dl
