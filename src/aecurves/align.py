"""`aecurves align`: endpoint B with its hidden units reordered, and its latent code mapped, to match endpoint A.

The result computes B's function (checked: outputs within config.ALIGN_TOLERANCE in eval mode) and is an ordinary
endpoint checkpoint, so `eval-curve --segment A B_ALIGNED` measures the straight line after alignment and
`train-curve --init_end B_ALIGNED` trains a curve from it. The symmetries come from the model itself
(symmetry.find_groups); the permutations from its weights (--method weights) or from the correlation of the two
networks' hidden activations on the same training images (--method activations); the linear bottleneck from
--latent. The optimizer state is not carried over (it is in B's old order), as for an exported point.
"""

import dataclasses
import os
import time
from pathlib import Path

import torch
from torch import fx

from aecurves import runtime
from aecurves.checkpoint import load_endpoint_pair, save_checkpoint
from aecurves.config import ALIGN_TOLERANCE, AlignConfig, validate
from aecurves.data import BatchLoader, check_outside_data, load_run_data
from aecurves.errors import UserError
from aecurves.metrics import fixed_subset
from aecurves.models import build_model
from aecurves.symmetry import apply_latent_map, find_groups, linear_assignment, permute, weight_matching


def run(cfg: AlignConfig) -> dict:
    cfg = dataclasses.replace(cfg)
    validate(cfg)
    out = check_out(cfg)
    device = runtime.resolve_device(cfg.device)
    a, b, arch = load_endpoint_pair(cfg.init_start, cfg.init_end, cfg.model, "--init_start/--init_end")
    check_outside_data(out, b["args"].get("data_dir"), "--out")
    model_a, model_b = build_model(arch).to(device), build_model(arch).to(device)
    model_a.load_state_dict(a["model"])
    model_b.load_state_dict(b["model"])
    example = torch.full((2, arch["channels"], arch["image_size"], arch["image_size"]), 0.5, device=device)
    groups = find_groups(model_b, example)
    latent = [g for g in groups if g.kind == "latent"]
    hidden = [g for g in groups if g.kind != "latent"]
    images = training_images(b["args"], cfg, device) if cfg.method != "weights" or cfg.latent in (
        "orthogonal", "linear") else None

    t0 = time.perf_counter()
    matched = groups if cfg.latent == "permutation" else hidden
    perms = None
    if cfg.method in ("activations", "both"):
        perms = activation_matching(model_a, model_b, matched, images, cfg.match_at)
    if cfg.method in ("weights", "both"):
        perms = weight_matching(model_a.state_dict(), model_b.state_dict(), matched, seed=cfg.seed, init=perms)
    state = permute(model_b.state_dict(), groups, perms)
    maps = {}
    if cfg.latent in ("orthogonal", "linear") and latent:
        model_b.load_state_dict(state)
        for g in latent:
            maps[g.name] = latent_map(model_a, model_b, g, images, cfg.latent)
            state = apply_latent_map(state, g, maps[g.name])
    seconds = time.perf_counter() - t0

    deviation = check_same_function(arch, b["model"], state, images, example, device)
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    aligned = {**b, "model": {k: v.detach().cpu() for k, v in state.items()}, "optimizer": {},
               "aligned_to": {"start": str(Path(cfg.init_start).resolve()), "end": str(Path(cfg.init_end).resolve()),
                              "method": cfg.method, "latent": cfg.latent, "images": cfg.images,
                              "match_at": cfg.match_at,
                              "groups": {g.name: g.size for g in groups}, "units_moved": moved,
                              "max_output_difference": deviation, "seconds": seconds}}
    save_checkpoint(out, aligned)
    sizes = ", ".join(f"{g.name} {g.size}" for g in groups)
    print(f"aligned {cfg.init_end} to {cfg.init_start}: {len(groups)} groups ({sizes}), {moved} units moved, method "
          f"{cfg.method}, latent {cfg.latent}, {seconds:.2f} s; the same function as B (largest output difference "
          f"{deviation:.1e}); wrote {out}")
    return {"out": str(out), "groups": len(groups), "units_moved": moved, "seconds": seconds,
            "max_output_difference": deviation}


def check_out(cfg: AlignConfig) -> Path:
    if cfg.init_start is None or cfg.init_end is None or cfg.out is None:
        raise UserError("align needs --init_start A --init_end B --out FILE.")
    out = Path(cfg.out)
    if out.is_dir() or cfg.out.endswith(("/", os.sep)):
        raise UserError(f"--out {cfg.out} is a folder; pass a file name such as {out / 'end_aligned.pt'}.")
    if any(Path(p).resolve() == out.resolve() for p in (cfg.init_start, cfg.init_end)):
        raise UserError(f"--out {out} is one of the endpoints; align never replaces a file. Choose another name.")
    if out.exists():
        raise UserError(f"--out {out} already exists; align never replaces a file. Choose another name, or delete "
                        "the old file first; nothing was written.")
    return out


def training_images(args: dict, cfg: AlignConfig, device) -> BatchLoader:
    """A fixed subset of B's training images (the endpoints share their data)."""
    data = load_run_data(args, cfg.cache_dir, progress=not cfg.no_progress)
    return BatchLoader(fixed_subset(data.train, cfg.images), cfg.batch_size, device)


class _Taps(fx.Interpreter):
    """Runs a traced model and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


@torch.no_grad()
def _unit_activations(model, groups, images, at: str = "pre") -> dict[str, torch.Tensor]:
    """Each group's units as rows of samples over all images and positions: as the layer that writes them outputs
    them (at="pre"), or as the next layer reads them, after BatchNorm and the activation (at="post")."""
    tap = {g.name: g.taps[0] if at == "pre" else g.taps[-1] for g in groups}
    found = {g.name: [] for g in groups}
    model.eval()
    gm = fx.symbolic_trace(model)  # find_groups traced the same model, so this cannot fail
    for x in images:
        runner = _Taps(gm, set(tap.values()))
        runner.run(x)
        for g in groups:
            units = runner.values[tap[g.name]].reshape(x.shape[0], g.size, -1)  # a unit: a channel or a block
            found[g.name].append(units.transpose(0, 1).reshape(g.size, -1).double().cpu())
    return {name: torch.cat(rows, dim=1) for name, rows in found.items()}


def activation_matching(model_a, model_b, groups, images, at: str = "pre") -> dict[str, torch.Tensor]:
    """For each group, the assignment of B's units to A's that maximises the summed correlation of their
    activations on the same images (Entezari et al., Ainsworth et al.)."""
    acts_a, acts_b = (_unit_activations(m, groups, images, at) for m in (model_a, model_b))
    perms = {}
    for g in groups:
        za, zb = (_standardise(acts[g.name]) for acts in (acts_a, acts_b))
        correlation = (za @ zb.T) / za.shape[1]
        perms[g.name] = torch.as_tensor(linear_assignment(correlation.numpy(), maximize=True), dtype=torch.long)
    return perms


def _standardise(rows: torch.Tensor) -> torch.Tensor:
    rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / rows.std(dim=1, keepdim=True).clamp_min(1e-12)  # a dead unit correlates with nothing


def latent_map(model_a, model_b, group, images, how: str) -> torch.Tensor:
    """M with M z_B ≈ z_A on the same images: orthogonal (Procrustes) or any linear map (least squares)."""
    za, zb = (_unit_activations(m, [group], images, "pre")[group.name].T for m in (model_a, model_b))  # [n, d]
    if how == "orthogonal":
        u, _, vh = torch.linalg.svd(za.T @ zb)
        return u @ vh
    solution = torch.linalg.lstsq(zb, za).solution  # zb @ X ≈ za, so M = X^T
    return solution.T


@torch.no_grad()
def check_same_function(arch, original: dict, aligned: dict, images, example, device) -> float:
    """The largest output difference between B and aligned B in eval mode; above ALIGN_TOLERANCE is an error."""
    nets = []
    for state in (original, aligned):
        net = build_model(arch).to(device)
        net.load_state_dict(state)
        nets.append(net.eval())
    batches = [next(iter(images))] if images is not None else [example]
    deviation = max(float((nets[0](x) - nets[1](x)).abs().max()) for x in batches)
    if not deviation <= ALIGN_TOLERANCE:
        raise UserError(f"The aligned network's outputs differ from B's by {deviation:.2e}, more than "
                        f"{ALIGN_TOLERANCE:g}: the latent map is too ill-conditioned for float32. Use --latent "
                        "orthogonal or permutation; nothing was written.")
    return deviation
