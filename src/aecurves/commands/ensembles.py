"""The output averages of saved networks on their held-out images: a study stage (`ensembles:LOSS:A-B`).

The study measures every pair's equal-budget ensembles here that no single command measures: the FGE snapshots
of both endpoints' runs pooled into one ensemble (and each run's alone), and the two extra-trained endpoints
averaged (and each alone). `networks` are checkpoint files (endpoints, FGE snapshots: every command's endpoint
checkpoint), `averages` name the networks each average takes.

Every network is measured as eval-curve and fge measure theirs: its BatchNorm statistics recomputed on eval-curve's
fixed subset of `bn_images` training images (metrics.fixed_subset, batches of config.EVAL_BATCH_SIZE), then in
eval mode and fp32 on the whole held-out split, the reconstructions of the networks averaged per image
(metrics.evaluate_averages): MSE, PSNR (mean of per-image PSNR) and SSIM (for images of at least 11 px). For an FGE
snapshot the recomputation gives back the statistics saved in it (fge recomputed them on the same subset). VAEs'
reconstructions (each decoding its posterior mean) are averaged the same way; an average of outputs has no rate, so
no objective is reported ("vae": true, and a note, say so).

Output: OUT/ensembles.json, written last (atomically): the config, every network's file and SHA-256, and per
average its members and metrics (records.EnsemblesRecord).
"""

import time
from pathlib import Path

import torch

from aecurves import runtime
from aecurves.checkpoint import arch_mismatch, check_fits, load_checkpoint, trusted_arch
from aecurves.config import EVAL_BATCH_SIZE, SUBSET_SEED, DataConfig, EnsemblesConfig, as_record, role_fields, validate
from aecurves.curves import batchnorms
from aecurves.data import BatchLoader, load_run_data
from aecurves.errors import UserError
from aecurves.files import folder_lock, sha256, write_json
from aecurves.metrics import evaluate_averages, fixed_subset, network_with_bn
from aecurves.models import build_model, is_vae
from aecurves.records import EnsemblesRecord
from aecurves.ssim import SSIM_WINDOW

VAE_NOTE = ("VAE: the metrics are of the averaged reconstructions (each network decoding its posterior mean); an "
            "average of outputs has no rate, so no objective is reported")


def check_config(cfg: EnsemblesConfig) -> None:
    """What can be checked without reading a file."""
    validate(cfg)
    if not cfg.networks:
        raise UserError("An ensembles measurement needs at least one network (checkpoint file).")
    if not cfg.averages:
        raise UserError("An ensembles measurement needs at least one average (a name and the networks it takes).")
    for name, members in cfg.averages.items():
        if not (isinstance(members, list) and members and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(cfg.networks) for i in members)):
            raise UserError(f"The average {name!r} must list indices into the {len(cfg.networks)} networks, got "
                            f"{members!r}.")


def run(cfg: EnsemblesConfig) -> dict:
    check_config(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for ensembles.json (nothing was written).")
    paths = [Path(p).expanduser().resolve() for p in cfg.networks]
    states, first = [], None
    for path in paths:
        ckpt = load_checkpoint(path, "endpoint", "network of an ensemble")
        arch = trusted_arch(ckpt["args"], cfg.model, path)
        if first is None:
            first = (ckpt["args"], arch, path)
        else:
            args, arch0, path0 = first
            diff = arch_mismatch(arch0, arch) + [f"{k}={args.get(k)!r} vs {k}={ckpt['args'].get(k)!r}"
                                                 for k in role_fields(DataConfig, "data")
                                                 if args.get(k) != ckpt["args"].get(k)]
            if diff:
                raise UserError(f"The networks of an ensemble must share their architecture and data; {path} "
                                f"differs from {path0}: {'; '.join(diff)}. Nothing was written.")
        check_fits(build_model(arch).state_dict(), ckpt["model"], path, "network of an ensemble")
        states.append(ckpt["model"])
    args, arch, _ = first
    device = runtime.resolve_device(cfg.device)
    data = load_run_data(args, cfg.cache_dir, progress=not cfg.no_progress)
    if data.channels != arch["channels"] or data.image_size != arch["image_size"]:
        raise UserError(f"The data of the networks ({data.channels} channels, {data.image_size}px) does not fit them "
                        f"({arch['channels']} channels, {arch['image_size']}px); nothing was written.")
    if len(data.test) == 0:
        raise UserError(f"The held-out split is empty ({data.source}): there is nothing to measure the ensembles on.")
    with folder_lock(out, "ensembles measurement"):
        return _run(cfg, out, paths, states, arch, data, device, t0)


@torch.no_grad()
def _run(cfg, out: Path, paths, states, arch, data, device, t0) -> dict:
    base = build_model(arch)
    vae = is_vae(base, arch)  # on the CPU, where is_vae's probe batch is
    base = base.to(device)
    has_bn = bool(batchnorms(base))
    bn_images = fixed_subset(data.train, cfg.bn_images, SUBSET_SEED)
    bn_loader = BatchLoader(bn_images, EVAL_BATCH_SIZE, device) if has_bn else None
    test_loader = BatchLoader(data.test, EVAL_BATCH_SIZE, device)
    names = {n for n, _ in base.named_parameters()}
    networks = []
    for state in states:
        params = {k: v.to(device) for k, v in state.items() if k in names}
        networks.append(network_with_bn(base, lambda params=params: params, bn_loader))
    base.eval()
    ssim = data.image_size >= SSIM_WINDOW
    results = evaluate_averages(networks, {k: list(v) for k, v in cfg.averages.items()}, test_loader, ssim)
    notes = [] if ssim else [f"SSIM omitted: {data.image_size}px images are smaller than its {SSIM_WINDOW}x"
                             f"{SSIM_WINDOW} window"]
    if vae:
        notes.append(VAE_NOTE)
    averages = {name: {"members": list(members), "files": [str(paths[i]) for i in members], **results[name]}
                for name, members in cfg.averages.items()}
    record = EnsemblesRecord(config=as_record(cfg), averages=averages, rest={
        "networks": [{"checkpoint": str(p), "sha256": sha256(p)} for p in paths],
        "metrics": list(next(iter(results.values()))),
        "vae": vae,
        "test_images": len(data.test),
        "train_images": len(data.train),
        "bn": {"recomputed": has_bn, "images": len(bn_images) if has_bn else 0, "subset_seed": SUBSET_SEED,
               "batch_size": EVAL_BATCH_SIZE, "what": "every network, on eval-curve's fixed subset"},
        "data": {"source": data.source},
        "notes": notes,
        "device": str(device),
        "seconds": time.perf_counter() - t0,
        "files": {"json": str(out / "ensembles.json")},
    })
    write_json(out / "ensembles.json", record.to_json())  # last: its presence marks a finished measurement
    for name, values in averages.items():
        print(f"{name}: {len(values['members'])} networks, held-out MSE {values['mse']:.6f}, PSNR "
              f"{values['psnr']:.2f} dB" + (f", SSIM {values['ssim']:.4f}" if "ssim" in values else ""))
    print(f"wrote {out / 'ensembles.json'}")
    return {"out": str(out), "averages": averages}
