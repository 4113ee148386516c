"""`aecurves export-point`: θ(t) of a curve, with BatchNorm statistics recomputed at t, as an ordinary endpoint
checkpoint that every command accepts, or as plain weights (safetensors or a torch state dict) for use elsewhere,
with the architecture in a JSON file beside them."""

import json
import os
from pathlib import Path

import torch

from aecurves import runtime
from aecurves.checkpoint import appeared, check_file_out, load_curve, save_checkpoint
from aecurves.config import (
    MODEL_SIGNATURE,
    DataConfig,
    ExportPointConfig,
    TrainConfig,
    recorded_value,
    role_fields,
    validate,
)
from aecurves.curves import batchnorms
from aecurves.data import BatchLoader, check_outside_data, load_run_data
from aecurves.errors import UserError
from aecurves.files import atomic_path, finite_or_none
from aecurves.metrics import fixed_subset
from aecurves.models import arch_of


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def save_weights(out: Path, point: dict, fmt: str) -> None:
    """The state dict alone (safetensors or torch.save), and OUT.json: how to build the model that loads it."""
    state = {k: v.contiguous() for k, v in point["model"].items()}
    arch = arch_of(point["args"])
    with atomic_path(out, exclusive=True) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save

            # bytes written by us, so the file gets the same permissions as every other output
            tmp.write_bytes(save(state, metadata={"aecurves_architecture": json.dumps(arch)}))
        else:
            torch.save(state, tmp)
    record = {"architecture": arch, "build": MODEL_SIGNATURE, "format": fmt, "exported_from": point["exported_from"]}
    try:
        with atomic_path(sidecar(out), exclusive=True) as tmp:
            tmp.write_text(json.dumps(finite_or_none(record), indent=2, allow_nan=False) + "\n")  # as write_json
    except FileExistsError:
        out.unlink()  # the weights just linked are this run's: without their sidecar they are not a result
        raise


def run(cfg: ExportPointConfig) -> dict:
    validate(cfg)
    if cfg.ckpt is None or cfg.t is None or cfg.out is None:
        raise UserError("export-point needs --ckpt CURVE_CHECKPOINT, --t T and --out FILE.")
    if not 0.0 <= cfg.t <= 1.0:
        raise UserError(f"--t must lie in [0, 1] (0 is the start endpoint, 1 the end), got {cfg.t}.")
    out = check_file_out(cfg.out, "point.pt", "export-point")
    curve, state = load_curve(cfg.ckpt, cfg.model)
    args = state["args"]
    check_outside_data(out, args.get("data_dir"), "--out")
    inputs = [cfg.ckpt, args.get("init_start"), args.get("init_end")]
    if any(p and Path(p).resolve() == out.resolve() for p in inputs):
        raise UserError(f"--out {out} is one of this command's inputs (the curve checkpoint or one of its endpoints); "
                        "writing the point there would destroy it. Choose another file name; nothing was written.")
    taken = [p for p in (out, sidecar(out) if cfg.format != "checkpoint" else None) if p and os.path.lexists(p)]
    if taken:
        raise UserError(f"{' and '.join(map(str, taken))} already exist{'s' if len(taken) == 1 else ''}; "
                        "export-point never replaces a file. Choose another --out, or delete the old file first; "
                        "nothing was written.")
    device = runtime.resolve_device(cfg.device)
    curve.to(device)
    used = 0
    if cfg.bn_images and batchnorms(curve.base):
        data = load_run_data(args, cfg.cache_dir, progress=not cfg.no_progress)
        used = curve.update_bn(BatchLoader(fixed_subset(data.train, cfg.bn_images), cfg.batch_size, device), cfg.t)
    weights = curve.state_dict_at(cfg.t)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # the curve itself is finite (load_curve checks), so its BatchNorm statistics overflowed at t
        raise UserError(f"θ({cfg.t:g}) of {cfg.ckpt} has non-finite values in {', '.join(bad[:4])} after its "
                        "BatchNorm statistics were recomputed; nothing was written. Try --bn-images 0 to keep the "
                        "curve's own statistics.")
    recorded = (*role_fields(DataConfig, "data"), "loss", "seed")  # the curve's data, loss and seed
    # and its β (a curve from before --kl-weight existed: 1), so train --init, fge and a curve from this point
    # minimise the objective the curve did
    kl_weight = recorded_value(TrainConfig, "kl_weight", args)
    point = {"kind": "endpoint", "model": weights, "optimizer": {}, "epoch": 0, "metrics": [],
             "args": {**{k: args.get(k) for k in recorded}, "kl_weight": kl_weight, **arch_of(state["model_config"])},
             "exported_from": {"curve": str(Path(cfg.ckpt).resolve()), "t": cfg.t, "bn_images": used}}
    try:  # each file is linked into place only if nothing took its name meanwhile
        if cfg.format == "checkpoint":
            save_checkpoint(out, point, exclusive=True)
        else:
            save_weights(out, point, cfg.format)
    except FileExistsError as exc:
        raise appeared(exc.filename2 or out, "export-point") from None
    print(f"wrote θ({cfg.t:g}) of {cfg.ckpt} to {out} as {cfg.format} (BatchNorm statistics recomputed from {used} "
          f"training images)" + (f"; architecture in {sidecar(out)}" if cfg.format != "checkpoint" else ""))
    return {"out": str(out), "t": cfg.t, "bn_images": used, "format": cfg.format}
