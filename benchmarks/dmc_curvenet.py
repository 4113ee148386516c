"""A minimal DMC-style curve network, the peer that benchmarks/train_throughput.py times aecurves' curve step against.

"DMC-style" is the design of the paper's code (timgaripov/dnn-mode-connectivity, curves.py), written here from
its description, not copied:
  - every layer type has a curve twin holding one parameter per bend (`weight_0`, `weight_1`, ...);
  - each twin's forward mixes its own bends with the coefficients c(t) (`compute_weights_t`: w(t) = sum_k c_k w_k,
    layer by layer) and adds that layer's ||w(t)||^2 to its `l2`, as curves.py does on every forward;
  - the network is written a second time out of the twins, and takes (x, coeffs_t) at every layer.
curves.py has no ConvTranspose2d twin; the one here follows the same pattern. The twin network mirrors
aecurves.models.ConvAutoencoder layer for layer (the base model of the peer's AEproject CelebaAutoencoder is the
same design), so `import_base(model, k)` copies an ordinary ConvAutoencoder's parameters into bend k and
the two curves compute the same function of t (tests/test_benchmarks.py checks this).

This is benchmark code, not part of aecurves: aecurves' own Curve works for any nn.Module without twins.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Bezier(nn.Module):
    """c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k), as a module of t (curves.py's Bezier)."""

    def __init__(self, num_bends: int):
        super().__init__()
        n = num_bends - 1
        self.register_buffer("binom", torch.tensor([float(math.comb(n, k)) for k in range(num_bends)]))
        self.register_buffer("range", torch.arange(0, float(num_bends)))
        self.register_buffer("rev_range", torch.arange(float(n), -1, -1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.binom * torch.pow(t, self.range) * torch.pow(1.0 - t, self.rev_range)


class CurveModule(nn.Module):
    """A layer twin: parameters `NAME_k` for each bend k, mixed at every forward."""

    def __init__(self, fix_points, names=("weight", "bias")):
        super().__init__()
        self.fix_points, self.names, self.l2 = list(fix_points), names, 0.0

    def add(self, name: str, shape) -> None:
        for k, fixed in enumerate(self.fix_points):
            self.register_parameter(f"{name}_{k}", nn.Parameter(torch.zeros(shape), requires_grad=not fixed))

    def compute_weights_t(self, coeffs_t):
        out, self.l2 = [], 0.0
        for name in self.names:
            w = None
            for k, c in enumerate(coeffs_t):
                p = getattr(self, f"{name}_{k}", None)
                if p is not None:
                    w = p * c if w is None else w + p * c
            if w is not None:
                self.l2 = self.l2 + torch.sum(w**2)
            out.append(w)
        return out


class Conv2d(CurveModule):
    def __init__(self, cin, cout, kernel, stride, padding, fix_points, bias=True, transposed=False):
        super().__init__(fix_points, ("weight", "bias") if bias else ("weight",))
        self.stride, self.padding, self.transposed = stride, padding, transposed
        self.add("weight", (cin, cout, kernel, kernel) if transposed else (cout, cin, kernel, kernel))
        if bias:
            self.add("bias", (cout,))

    def forward(self, x, coeffs_t):
        weight, *bias = self.compute_weights_t(coeffs_t)
        conv = F.conv_transpose2d if self.transposed else F.conv2d
        return conv(x, weight, bias[0] if bias else None, self.stride, self.padding)


class Linear(CurveModule):
    def __init__(self, cin, cout, fix_points):
        super().__init__(fix_points)
        self.add("weight", (cout, cin))
        self.add("bias", (cout,))

    def forward(self, x, coeffs_t):
        weight, bias = self.compute_weights_t(coeffs_t)
        return F.linear(x, weight, bias)


class BatchNorm2d(CurveModule):
    def __init__(self, features, fix_points, momentum=0.1, eps=1e-5):
        super().__init__(fix_points)
        self.momentum, self.eps = momentum, eps
        self.add("weight", (features,))
        self.add("bias", (features,))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x, coeffs_t):
        if self.training:
            self.num_batches_tracked += 1
        weight, bias = self.compute_weights_t(coeffs_t)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, self.momentum,
                            self.eps)


class DmcConvAutoencoder(nn.Module):
    """ConvAutoencoder written out of curve twins; forward(x, coeffs_t)."""

    def __init__(self, fix_points, channels=3, image_size=64, latent_dim=128, width=32):
        super().__init__()
        stages = int(math.log2(image_size // 4))
        widths = [min(width * 2**i, width * 8) for i in range(stages)]
        self.down, cin = nn.ModuleList(), channels
        for w in widths:
            self.down.append(nn.ModuleList([Conv2d(cin, w, 4, 2, 1, fix_points, bias=False),
                                            BatchNorm2d(w, fix_points)]))
            cin = w
        self.to_latent = Linear(cin * 16, latent_dim, fix_points)
        self.from_latent = Linear(latent_dim, cin * 16, fix_points)
        self.up = nn.ModuleList(
            nn.ModuleList([Conv2d(widths[i], widths[i - 1], 4, 2, 1, fix_points, bias=False, transposed=True),
                           BatchNorm2d(widths[i - 1], fix_points)]) for i in range(stages - 1, 0, -1))
        self.out = Conv2d(widths[0], channels, 4, 2, 1, fix_points, transposed=True)
        self.bottom = (cin, 4, 4)

    def forward(self, x, coeffs_t):
        for conv, bn in self.down:
            x = F.relu(bn(conv(x, coeffs_t), coeffs_t))
        z = self.to_latent(x.flatten(1), coeffs_t)
        h = torch.relu(self.from_latent(z, coeffs_t).view(z.shape[0], *self.bottom))
        for conv, bn in self.up:
            h = F.relu(bn(conv(h, coeffs_t), coeffs_t))
        return torch.sigmoid(self.out(h, coeffs_t))

    def twins(self):
        """The curve twins in the order of ConvAutoencoder.parameters()."""
        for conv, bn in self.down:
            yield from (conv, bn)
        yield from (self.to_latent, self.from_latent)
        for conv, bn in self.up:
            yield from (conv, bn)
        yield self.out


class CurveNet(nn.Module):
    """The curve: coefficients of t, then the twin network; `l2` is the sum of its layers' (curves.py)."""

    def __init__(self, num_bends=3, fix_start=True, fix_end=True, **arch):
        super().__init__()
        self.num_bends = num_bends
        self.coeff_layer = Bezier(num_bends)
        self.net = DmcConvAutoencoder([fix_start] + [False] * (num_bends - 2) + [fix_end], **arch)
        self.l2 = 0.0

    @torch.no_grad()
    def import_base(self, model: nn.Module, k: int) -> None:
        """Bend k := the parameters of an ordinary ConvAutoencoder (curves.py's import_base_parameters)."""
        params = [p for twin in self.net.twins() for name in twin.names for p in [getattr(twin, f"{name}_{k}")]]
        for mine, theirs in zip(params, model.parameters(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def init_linear(self) -> None:
        for twin in self.net.twins():
            for name in twin.names:
                first, last = getattr(twin, f"{name}_0"), getattr(twin, f"{name}_{self.num_bends - 1}")
                for k in range(1, self.num_bends - 1):
                    alpha = k / (self.num_bends - 1)
                    getattr(twin, f"{name}_{k}").copy_(alpha * last + (1 - alpha) * first)

    def forward(self, x, t):
        coeffs_t = self.coeff_layer(x.new_tensor(float(t)))
        out = self.net(x, coeffs_t)
        self.l2 = sum(twin.l2 for twin in self.net.twins())
        return out
