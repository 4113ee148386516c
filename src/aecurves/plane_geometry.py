"""The plane through three networks in weight space, and the metrics on a grid over it (Garipov et al., 2018).

The basis is the reference's (plane.py of timgaripov/dnn-mode-connectivity): with θ₀, θ₁, θ₂ the first,
middle and last bend, u = (θ₂ − θ₀)/dx with dx = ‖θ₂ − θ₀‖, and v = the part of θ₁ − θ₀ orthogonal to u,
divided by its norm dy (one Gram–Schmidt step, the endpoints' chord first). A point's coordinates are
(⟨p − θ₀, u⟩, ⟨p − θ₀, v⟩), so θ₀ sits at (0, 0), θ₂ at (dx, 0) and θ₁ at (⟨θ₁ − θ₀, u⟩, dy). The grid is
α ∈ linspace(−margin_left, 1 + margin_right, G) by β ∈ linspace(−margin_bottom, 1 + margin_top, G), the
network at node (i, j) is θ₀ + α_i·dx·u + β_j·dy·v, and arrays over the grid are indexed [i, j] (x first).

Deviations from the reference: everything is computed in float64 from the float32 weights (the reference
works in the weights' float32), and three points that do not span a plane (two of them equal, or all on one
line) are refused with a UserError instead of dividing by zero.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aecurves.errors import UserError
from aecurves.metrics import evaluate_points

# Below this fraction of the largest network's norm, a distance is float32 rounding (whose relative size is
# about 6e-8), not a direction.
DEGENERATE = 1e-6


@dataclass
class Plane:
    origin: torch.Tensor  # θ₀, flat float64
    u: torch.Tensor       # unit vector along θ₂ − θ₀
    v: torch.Tensor       # unit vector along the part of θ₁ − θ₀ orthogonal to u
    dx: float             # ‖θ₂ − θ₀‖
    dy: float             # the distance of θ₁ from the line through θ₀ and θ₂

    def coordinates(self, point: torch.Tensor) -> np.ndarray:
        """(x, y) of a flat network: its offset from θ₀ projected on u and v (the reference's get_xy)."""
        d = point.detach().to(self.origin) - self.origin
        return np.array([torch.dot(d, self.u).item(), torch.dot(d, self.v).item()])

    def distance(self, point: torch.Tensor) -> float:
        """How far a flat network lies from the plane (0 for any combination of the three points)."""
        d = point.detach().to(self.origin) - self.origin
        x, y = torch.dot(d, self.u), torch.dot(d, self.v)
        return (d - x * self.u - y * self.v).norm().item()

    def point(self, x: float, y: float) -> torch.Tensor:
        """The flat float64 network at coordinates (x, y)."""
        return self.origin + x * self.u + y * self.v


def plane_through(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  names: tuple[str, str, str] = ("θ₀", "θ₁", "θ₂")) -> Plane:
    """The plane through three flat networks: θ₀ at the origin, θ₂ on the first axis, θ₁ above it."""
    w0, w1, w2 = (w.detach().cpu().double().reshape(-1) for w in (w0, w1, w2))
    damaged = [name for name, w in zip(names, (w0, w1, w2)) if not torch.isfinite(w).all()]
    if damaged:  # checkpoints are checked when read, so only a network passed from Python gets here
        raise UserError(f"{' and '.join(damaged)} hold{'s' if len(damaged) == 1 else ''} non-finite weights (NaN or "
                        "inf): a damaged network, with no place in weight space. Pass networks whose weights are "
                        "finite.")
    scale = max(w.norm().item() for w in (w0, w1, w2))
    tol = DEGENERATE * scale
    u = w2 - w0
    dx = u.norm().item()
    if not dx > tol:
        raise UserError(f"{names[0]} and {names[2]} are the same network (‖{names[2]} − {names[0]}‖ = {dx:.3g}), so "
                        f"there is no plane through {', '.join(names)}: the grid would be one point. Pass three "
                        "different networks.")
    u /= dx
    v = w1 - w0
    v -= torch.dot(u, v) * u
    dy = v.norm().item()
    if not dy > tol:
        raise UserError(f"{names[1]} lies on the straight line through {names[0]} and {names[2]} (its distance from "
                        f"it, {dy:.3g}, is float32 rounding beside the networks' norm {scale:.3g}), so the three "
                        "points span a line, not a plane. A curve whose middle bend was never moved from the "
                        "segment (an untrained curve) does this: train it first, or pass three networks that are "
                        "not on one line.")
    v /= dy
    return Plane(w0, u, v, dx, dy)


def grid_axes(plane: Plane, points: int, margin_left: float, margin_right: float, margin_bottom: float,
              margin_top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alphas, betas, grid): the reference's grid, in units of dx and dy, and grid[i, j] = (α_i·dx, β_j·dy)."""
    alphas = np.linspace(0.0 - margin_left, 1.0 + margin_right, points)
    betas = np.linspace(0.0 - margin_bottom, 1.0 + margin_top, points)
    grid = np.stack(np.meshgrid(alphas * plane.dx, betas * plane.dy, indexing="ij"), axis=-1)
    return alphas, betas, grid


def evaluate_grid(base: nn.Module, unflatten, plane: Plane, grid: np.ndarray, train_loader, test_loader, loss_fn,
                  bn_loader=None, progress: bool = False, points_per_call: int = 1, on_point=None) -> dict:
    """{"tr_loss", "tr_mse", "tr_psnr", "te_...": float64 array [G, G]}: eval-curve's metrics at every node of
    `grid` [G, G, 2], BN statistics recomputed at each from `bn_loader` (when given), by metrics.evaluate_points.

    `unflatten` turns a flat vector of the base's dtype and device into its weights dict; `on_point((i, j), network)`
    is called at each node (evaluate_points).
    """
    param = next(base.parameters())
    nodes = [(i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])]
    rows = evaluate_points(base, unflatten,
                           lambda node: plane.point(*grid[node]).to(device=param.device, dtype=param.dtype),
                           nodes, train_loader, test_loader, loss_fn, bn_loader=bn_loader,
                           points_per_call=points_per_call, progress=progress,
                           desc="plane", on_point=on_point)
    values = {}
    for (i, j), row in zip(nodes, rows):
        for k, v in prefixed(row).items():
            values.setdefault(k, np.zeros(grid.shape[:2]))[i, j] = v
    return values


def prefixed(row: dict) -> dict:
    """{"tr": {"loss": ...}, "te": {...}} -> {"tr_loss": ..., "te_...": ...}"""
    return {f"{split}_{k}": v for split, metrics in row.items() for k, v in metrics.items()}
