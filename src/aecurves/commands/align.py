"""`aecurves align`: endpoint B with its hidden units reordered, and its latent code mapped, to match endpoint A.

The result computes B's function (checked: outputs within config.ALIGN_TOLERANCE in eval mode) and is an ordinary
endpoint checkpoint, so `eval-curve --segment A B_ALIGNED` measures the straight line after alignment and
`train-curve --init_end B_ALIGNED` trains a curve from it. The symmetries come from the model itself
(symmetry.find_groups); the latent map from --latent; the permutations from one of the methods (--method):
  - activations: the correlation of the two networks' hidden activations on the same training images;
  - weights: weight matching on the weights as eval mode uses them, BatchNorm folded into the layer before it
    (symmetry.fold_batchnorm), each unit's row normalised (a cosine); weights-raw: on the raw weights and
    BatchNorm tensors, as Git Re-Basin's weight matching does; both: activations, then weights from there;
  - mixed: coordinate descent on alpha · correlation + (1 − alpha) · weight cosine, from activation matching;
  - learned: Git Re-Basin's straight-through estimator (learned_matching), from activation matching.
The optimizer state is not carried over (it is in B's old order), as for an exported point.
"""

import copy
import dataclasses
import os
import time
from pathlib import Path

import torch
from torch import fx
from torch.func import functional_call

from aecurves import capture, console, runtime
from aecurves.checkpoint import appeared, check_file_out, load_endpoint_pair, save_checkpoint
from aecurves.config import ALIGN_TOLERANCE, MIN_ALIGN_IMAGES, AlignConfig, check_needs, validate
from aecurves.curves import recompute_bn
from aecurves.data import BatchLoader, check_outside_data, load_run_data
from aecurves.errors import UserError
from aecurves.losses import make_loss
from aecurves.metrics import fixed_subset
from aecurves.models import build_model, is_vae
from aecurves.symmetry import (
    apply_latent_map,
    assign,
    batchnorm_after,
    find_groups,
    fold_batchnorm,
    permute,
    unit_rows,
    weight_matching,
)


def run(cfg: AlignConfig) -> dict:
    cfg = dataclasses.replace(cfg)
    validate(cfg)
    check_needs(AlignConfig, vars(cfg))  # e.g. --alpha without --method mixed: refused, not ignored
    out = check_out(cfg)
    device = runtime.resolve_device(cfg.device)
    a, b, arch = load_endpoint_pair(cfg.init_start, cfg.init_end, cfg.model, "--init_start/--init_end")
    check_outside_data(out, b["args"].get("data_dir"), "--out")
    model_a, model_b = (_network(arch, endpoint["model"], device) for endpoint in (a, b))
    vae = is_vae(model_b, arch)
    check_latent_of_vae(cfg, vae)
    example = torch.full((2, arch["channels"], arch["image_size"], arch["image_size"]), 0.5, device=device)
    groups = find_groups(model_b, example)
    latent = [g for g in groups if g.kind == "latent"]
    images = training_images(b["args"], cfg, device, latent) if cfg.method not in ("weights", "weights-raw") or \
        cfg.latent in ("orthogonal", "linear") else None

    t0 = time.perf_counter()
    perms, learned = match_units(cfg, model_a, model_b, groups, images, example, b["args"])
    state = permute(model_b.state_dict(), groups, perms)
    if cfg.latent in ("orthogonal", "linear") and latent:
        state = map_latents(model_a, model_b, state, latent, images, cfg.latent)
    seconds = time.perf_counter() - t0

    deviation = check_same_function(arch, b["model"], state, images, example, device)
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    record = aligned_to(cfg, vae, learned, groups, moved, deviation, seconds)
    aligned = {**b, "model": {k: v.detach().cpu() for k, v in state.items()}, "optimizer": {}, "aligned_to": record}
    try:
        save_checkpoint(out, aligned, exclusive=True)  # linked into place only if nothing took the name meanwhile
    except FileExistsError:
        raise appeared(out, "align") from None
    sizes = ", ".join(f"{g.name} {g.size}" for g in groups)
    print(f"aligned {cfg.init_end} to {cfg.init_start}: {len(groups)} groups ({sizes}), {moved} units moved, method "
          f"{cfg.method}, latent {cfg.latent}{' (a VAE: permutation only)' if vae else ''}, {seconds:.2f} s;"
          f" the same function as B (largest output difference "
          f"{deviation:.1e}); wrote {out}")
    return {"out": str(out), "groups": len(groups), "units_moved": moved, "seconds": seconds,
            "max_output_difference": deviation}


def _network(arch: dict, state: dict, device) -> torch.nn.Module:
    model = build_model(arch).to(device)
    model.load_state_dict(state)
    return model


def match_units(cfg: AlignConfig, model_a, model_b, groups: list, images, example: torch.Tensor,
                args: dict) -> tuple[dict, dict | None]:
    """The permutations of B's units by cfg.method ({group: B's unit for each of A's}; the latent groups only with
    --latent permutation), and the learned method's record (None for the others)."""
    matched = groups if cfg.latent == "permutation" else [g for g in groups if g.kind != "latent"]
    perms, correlations = None, None
    if cfg.method in ("activations", "both", "mixed", "learned"):
        correlations = activation_correlations(model_a, model_b, matched, images, cfg.match_at)
        by_name = {g.name: g for g in matched}
        perms = {name: torch.as_tensor(assign(c.numpy(), by_name[name])) for name, c in correlations.items()}
    if cfg.method == "weights-raw":
        return weight_matching(model_a.state_dict(), model_b.state_dict(), matched, seed=cfg.seed), None
    if cfg.method in ("weights", "both", "mixed"):
        pairs = batchnorm_after(model_b, example)
        folded_a, folded_b = (fold_batchnorm(m.state_dict(), m, pairs) for m in (model_a, model_b))
        unary = {"unary": correlations, "alpha": cfg.alpha} if cfg.method == "mixed" else {}
        return weight_matching(folded_a, folded_b, matched, seed=cfg.seed, init=perms, normalise=True, **unary), None
    if cfg.method == "learned":
        loss_fn = make_loss(args.get("loss", "mse"), cfg.vgg_weights, args.get("kl_weight", 1.0))
        loss_fn = loss_fn.to(example.device)  # the models' device
        return learned_matching(model_a, model_b, matched, perms, images, loss_fn, steps=cfg.steps, lr=cfg.ste_lr,
                                batch_size=int(args.get("batch_size") or 64), seed=cfg.seed,
                                progress=not cfg.no_progress)
    return perms, None


def map_latents(model_a, model_b, state: dict, latent: list, images, how: str) -> dict:
    """`state` (B permuted) with each latent group's code mapped onto A's (latent_map); model_b is loaded with it."""
    model_b.load_state_dict(state)
    for g in latent:
        state = apply_latent_map(state, g, latent_map(model_a, model_b, g, images, how))
    return state


def aligned_to(cfg: AlignConfig, vae: bool, learned: dict | None, groups: list, moved: int, deviation: float,
               seconds: float) -> dict:
    """The aligned checkpoint's record of how it was made."""
    return {"start": str(Path(cfg.init_start).resolve()), "end": str(Path(cfg.init_end).resolve()),
            "method": cfg.method, "latent": cfg.latent, "images": cfg.images, "vae": vae, "match_at": cfg.match_at,
            **({"alpha": cfg.alpha} if cfg.method == "mixed" else {}),
            **({"learned": learned} if learned is not None else {}),
            "groups": {g.name: g.size for g in groups}, "units_moved": moved,
            "max_output_difference": deviation, "seconds": seconds}


def check_out(cfg: AlignConfig) -> Path:
    if cfg.init_start is None or cfg.init_end is None or cfg.out is None:
        raise UserError("align needs --init_start A --init_end B --out FILE.")
    out = check_file_out(cfg.out, "end_aligned.pt", "align")
    if any(Path(p).resolve() == out.resolve() for p in (cfg.init_start, cfg.init_end)):
        raise UserError(f"--out {out} is one of the endpoints; align never replaces a file. Choose another name.")
    if os.path.lexists(out):  # a link too, dangling or not: the result is never written through one
        raise UserError(f"--out {out} already exists; align never replaces a file. Choose another name, or delete "
                        "the old file first; nothing was written.")
    return out


def check_latent_of_vae(cfg: AlignConfig, vae: bool) -> None:
    """A VAE's latent is aligned by permutation only: its posterior is a diagonal Gaussian, and a rotation or any
    other invertible map of the code would change its KL term (the objective), not keep B's function."""
    if vae and cfg.latent in ("orthogonal", "linear"):
        raise UserError(f"--latent {cfg.latent} maps the latent code by an invertible matrix, but this network is a "
                        "VAE: its encoder gives the mean and log-variance of a diagonal Gaussian per latent unit, "
                        "and only a permutation of those units keeps its KL term (a rotation makes the posterior "
                        "non-diagonal). Pass --latent permutation (the default) or --latent none; nothing was "
                        "written.")


def training_images(args: dict, cfg: AlignConfig, device, latent: list) -> BatchLoader:
    """A fixed subset of B's training images (the endpoints share their data), refused when too few to match on:
    below MIN_ALIGN_IMAGES a Linear unit's correlation is undefined, and a least-squares latent map of size d needs
    d images to be determined."""
    data = load_run_data(args, cfg.cache_dir, progress=not cfg.no_progress)
    images = fixed_subset(data.train, cfg.images)
    need = max([MIN_ALIGN_IMAGES, *(g.size for g in latent if cfg.latent == "linear")])
    if len(images) < need:
        why = f"--latent linear fits a {need} x {need} map" if need > MIN_ALIGN_IMAGES else \
            f"a correlation needs {MIN_ALIGN_IMAGES} samples of each unit"
        raise UserError(f"align has {len(images)} training images to match on (--images {cfg.images}, of "
                        f"{len(data.train)} in the endpoints' training set), but {why}: it needs at least {need}. "
                        f"Pass --images {need} or more" + (", or --latent orthogonal" if cfg.latent == "linear" else "")
                        + "; nothing was written.")
    return BatchLoader(images, cfg.batch_size, device)


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
    graphs = {}  # find_groups captured the same model; a recorded graph is one input shape's (capture.trace)
    state = model.state_dict()  # for taps that are a projection (inside nn.MultiheadAttention)
    for x in images:
        if x.shape not in graphs:
            graphs[x.shape] = capture.trace(model, x, "aligning")
        runner = _Taps(graphs[x.shape], set(tap.values()))
        runner.run(x)
        for g in groups:
            rows = unit_rows(runner.values[tap[g.name]], g.tap_layouts[tap[g.name]], g.size, state)
            found[g.name].append(rows.double().cpu())
    return {name: torch.cat(rows, dim=1) for name, rows in found.items()}


def activation_correlations(model_a, model_b, groups, images, at: str = "pre") -> dict[str, torch.Tensor]:
    """For each group, [n, n]: the correlation of A's unit i with B's unit j over the same images and positions."""
    acts_a, acts_b = (_unit_activations(m, groups, images, at) for m in (model_a, model_b))
    correlations = {}
    for g in groups:
        za, zb = (_standardise(acts[g.name]) for acts in (acts_a, acts_b))
        correlations[g.name] = (za @ zb.T) / za.shape[1]
    return correlations


def activation_matching(model_a, model_b, groups, images, at: str = "pre") -> dict[str, torch.Tensor]:
    """For each group, the assignment of B's units to A's that maximises the summed correlation of their
    activations on the same images (Entezari et al., Ainsworth et al.), keeping the group's blocks together."""
    by_name = {g.name: g for g in groups}
    return {name: torch.as_tensor(assign(c.numpy(), by_name[name]), dtype=torch.long)
            for name, c in activation_correlations(model_a, model_b, groups, images, at).items()}


MONITOR_EVERY = 20  # learned: steps between two looks at the midpoint's loss (only when the permutation changed)


def learned_matching(model_a, model_b, groups, init: dict, images, loss_fn, steps: int, lr: float,
                     batch_size: int, seed: int, progress: bool = True) -> tuple[dict, dict]:
    """The permutation of B learned with a straight-through estimator (Ainsworth et al., Algorithm 3).

    A continuous copy θ̃ of the weights is trained. Each step projects it onto B's permutations (weight matching
    between θ̃ and B, started from the last step's permutation), and evaluates the loss at (1 − λ)·θ_A + λ·θ_STE,
    λ ~ U(0, 1), on a batch of the training images, with BatchNorm in training mode. θ_STE is the projected B in
    the forward pass and θ̃ in the backward one, so the gradient moves θ̃ towards weights whose projection
    interpolates well. θ̃ starts at θ_A, as in Git Re-Basin's code, and the first projection is started from
    `init` (activation matching's permutation), which is also the first one scored. Every MONITOR_EVERY steps a new
    permutation is scored by the loss at the midpoint λ = 0.5 with BatchNorm statistics recomputed on the same
    training images; the best one is kept, so the result is never worse on that monitor than `init`.

    Deviations from Git Re-Basin's code (cifar10_vgg_ste2.py): λ is drawn per step instead of fixed at 0.5 (as
    the issue asks: every point of the segment counts); Adam instead of SGD with momentum (the endpoints' own
    optimizer; on pair 1-2 of the CelebA sample, 60 steps at lr 1e-2 made the monitor worse, at 1e-3 better);
    the best permutation is chosen by a BatchNorm-reset midpoint loss over the training images every
    MONITOR_EVERY steps instead of by each batch's training loss (a batch loss in training mode is a noisy
    ranking of permutations)."""
    params = [n for n, _ in model_b.named_parameters()]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    theta_a = {n: state_a[n].detach() for n in params}
    b_params = {n: state_b[n].detach() for n in params}
    perms = {k: v.clone() for k, v in init.items()}
    tilde = {n: theta_a[n].clone().requires_grad_(True) for n in params}  # as Git Re-Basin starts it
    optimizer = torch.optim.Adam(tilde.values(), lr=lr)
    net = copy.deepcopy(model_a)
    scratch = {n: b.clone() for n, b in net.named_buffers()}  # training-mode BatchNorm: its running stats are scratch
    generator = torch.Generator().manual_seed(seed)
    batches = _endless(BatchLoader(images.images, batch_size, images.device, shuffle=True, seed=seed))
    best = _BestSoFar(_MidpointMonitor(model_a, state_a, state_b, groups, images, loss_fn), perms)
    t0 = time.perf_counter()
    bar = console.progress(range(steps), "learning the permutation", progress, unit="step")
    for step in bar:
        x = next(batches)
        perms = weight_matching({n: t.detach() for n, t in tilde.items()}, b_params, groups, init=perms,
                                seed=seed + step)
        projected = permute(state_b, groups, perms)
        lam = torch.rand((), generator=generator).item()
        # straight through: the projected weights forward, tilde's gradient backward
        weights = {n: (1 - lam) * theta_a[n] + lam * (projected[n] + tilde[n] - tilde[n].detach()) for n in params}
        net.train()
        loss = loss_fn(functional_call(net, {**weights, **scratch}, (x,)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % MONITOR_EVERY == 0 or step + 1 == steps:
            best.score(step + 1, perms)
            bar.set_postfix(best=f"{best.loss:.5f}")
    record = {"steps": steps, "lr": lr, "batch_size": batch_size, "monitor_every": MONITOR_EVERY,
              "monitor_images": len(images.images), "start_midpoint_loss": best.history[0]["midpoint_loss"],
              "best_midpoint_loss": best.loss, "history": best.history, "seconds": time.perf_counter() - t0}
    return best.perms, record


def _endless(batches: BatchLoader):
    """The loader's batches, epoch after epoch (set_epoch before each: each epoch's own shuffle)."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        epoch += 1
        empty = True
        for x in batches:
            empty = False
            yield x
        if empty:
            raise ValueError("no batches to learn the permutation from")


class _BestSoFar:
    """The permutation with the lowest midpoint loss scored so far, and the history of the scores; a permutation
    is scored only if it changed since the last one scored (the first one, `init`, always)."""

    def __init__(self, monitor: "_MidpointMonitor", init: dict):
        self.monitor = monitor
        self.loss, self.perms = monitor(init), init
        self.history = [{"step": 0, "midpoint_loss": self.loss, "units_changed": 0}]
        self.last_scored = init

    def score(self, step: int, perms: dict) -> None:
        changed = sum(int((perms[k] != self.last_scored[k]).sum()) for k in perms)
        if not changed:
            return
        value = self.monitor(perms)
        self.history.append({"step": step, "midpoint_loss": value, "units_changed": changed})
        self.last_scored = perms
        if value < self.loss:
            self.loss, self.perms = value, perms


class _MidpointMonitor:
    """The loss at the midpoint of A and B permuted, BatchNorm statistics recomputed, on fixed training images."""

    def __init__(self, model_a, state_a, state_b, groups, images, loss_fn):
        self.net = copy.deepcopy(model_a)
        self.state_a, self.state_b, self.groups = state_a, state_b, groups
        self.images, self.loss_fn = images, loss_fn
        self.params = [n for n, _ in model_a.named_parameters()]

    @torch.no_grad()
    def __call__(self, perms: dict) -> float:
        b = permute(self.state_b, self.groups, perms)
        weights = {n: 0.5 * (self.state_a[n] + b[n]) for n in self.params}
        recompute_bn(self.net, weights, self.images)
        self.net.eval()
        total, seen = 0.0, 0
        for x in self.images:
            total += float(self.loss_fn(functional_call(self.net, weights, (x,)), x)) * x.shape[0]
            seen += x.shape[0]
        return total / seen


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


def _outputs(out) -> list:
    """A network's outputs as a list: the reconstruction, and a VAE's KL too."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _difference(original: torch.Tensor, aligned: torch.Tensor, i: int) -> float:
    """The reconstruction's largest absolute difference; a VAE's KL (a sum over the latent units, which a
    permutation reorders, so float32 rounds it differently) relative to its size where that is above 1."""
    scale = 1.0 if i == 0 else max(1.0, float(original.abs().max()))
    return float((original - aligned).abs().max()) / scale


@torch.no_grad()
def check_same_function(arch, original: dict, aligned: dict, images, example, device) -> float:
    """The largest output difference between B and aligned B in eval mode; above ALIGN_TOLERANCE is an error."""
    nets = []
    for state in (original, aligned):
        net = build_model(arch).to(device)
        net.load_state_dict(state)
        nets.append(net.eval())
    batches = [next(iter(images))] if images is not None else [example]
    deviation = max(_difference(p, q, i) for x in batches
                    for i, (p, q) in enumerate(zip(*(_outputs(n(x)) for n in nets))))
    if not deviation <= ALIGN_TOLERANCE:
        raise UserError(f"The aligned network's outputs differ from B's by {deviation:.2e}, more than "
                        f"{ALIGN_TOLERANCE:g}: the latent map is too ill-conditioned for float32. Use --latent "
                        "orthogonal or permutation; nothing was written.")
    return deviation
