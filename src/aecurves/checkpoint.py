"""Checkpoints: written atomically, read without unpickling arbitrary objects, rebuilt into networks and curves.

An endpoint checkpoint is a dict: kind="endpoint", model, optimizer, epoch, args (the run's config as a plain
dict, with the data's `channels`), metrics (one dict per epoch). A curve checkpoint has kind="curve", curve,
model_config (the architecture record), optimizer, epoch, args, metrics. Everything in them is tensors and
plain Python values, so `torch.load(weights_only=True)` reads them.

A checkpoint names its model factory (`args["model"]`, a MODULE:FACTORY string). A factory inside aecurves is
rebuilt freely; one outside is imported only when the same --model is passed (`trusted_arch`): code named in a
file is never imported unasked.
"""

import errno
import os
import shutil
from pathlib import Path

import torch

from aecurves.curves import Curve
from aecurves.errors import UserError
from aecurves.files import atomic_path
from aecurves.models import ARCH_KEYS, arch_of, build_model, is_builtin

FORMAT_VERSION = 1
# What each kind of checkpoint must hold to be used at all (type of each entry).
REQUIRED = {"endpoint": {"model": dict, "args": dict, "epoch": int, "metrics": list, "optimizer": dict},
            "curve": {"curve": dict, "model_config": dict, "args": dict, "epoch": int, "metrics": list,
                      "optimizer": dict}}
KINDS = {"endpoint": "an autoencoder checkpoint (from `aecurves train` or `aecurves export-point`)",
         "curve": "a curve checkpoint (from `aecurves train-curve`)"}


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch's writer reports a full disk as "basic_ios::clear: iostream error"
            if shutil.disk_usage(Path(tmp).parent).free < 64 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, what: str = "checkpoint") -> dict:
    """Reads a checkpoint safely; `kind` ("endpoint"/"curve") is checked when given."""
    path = Path(path)
    if not path.is_file():
        hint = " It is a folder; pass the .pt file inside it." if path.is_dir() else ""
        raise UserError(f"The {what} {path} does not exist.{hint} Check the path (checkpoints are written as "
                        "checkpoint.pt in the run folder of `aecurves train` / `aecurves train-curve`).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"Could not read the {what} {path}: it is not a readable aecurves checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Only files written "
                        "by aecurves are accepted; they are loaded with torch.load(weights_only=True).") from None
    if not isinstance(state, dict) or state.get("kind") not in KINDS:
        raise UserError(f"The {what} {path} is not an aecurves checkpoint (no 'kind' field); "
                        "pass a file written by `aecurves train`, `train-curve` or `export-point`.")
    missing = [k for k, t in REQUIRED[state["kind"]].items() if not isinstance(state.get(k), t)]
    if missing:
        raise UserError(f"The {what} {path} is damaged or was not written by aecurves: it lacks "
                        f"{', '.join(missing)}. Pass a checkpoint written by `aecurves train`, `train-curve` or "
                        "`export-point`.")
    if kind is not None and state["kind"] != kind:
        extra = (" To use a point of a curve as an endpoint, write one with "
                 "`aecurves export-point --ckpt CURVE --t 0.5 --out FILE`." if kind == "endpoint" else "")
        raise UserError(f"The {what} {path} is {KINDS[state['kind']]}, but {KINDS[kind]} is needed here.{extra}")
    return state


def arch_mismatch(a: dict, b: dict) -> list[str]:
    """Architecture settings that differ between two configs, as 'key: a vs b'."""
    a, b = arch_of(a), arch_of(b)
    return [f"{k}={a[k]!r} vs {k}={b[k]!r}" for k in ARCH_KEYS if a[k] != b[k]]


def check_same_arch(saved: dict, wanted: dict, path, wanted_what: str = "this run") -> None:
    diff = arch_mismatch(saved, wanted)
    if diff:
        raise UserError(f"The checkpoint {path} does not match {wanted_what}: " + "; ".join(diff)
                        + " (checkpoint vs requested). Use the checkpoint's settings (drop the flags that change "
                        "them) or start a new run in another --out folder.")


def trusted_arch(args: dict, requested_model: str | None, path) -> dict:
    """The architecture record of a checkpoint, if its factory may be imported: one inside aecurves, or the one
    passed as --model. A different --model is refused: the weights belong to the checkpoint's factory."""
    arch = arch_of(args)
    model = arch["model"]
    if requested_model is not None and requested_model != model:
        raise UserError(f"The checkpoint {path} was made with --model {model}, not {requested_model}; pass "
                        f"--model {model} (or leave --model out if it is built into aecurves).")
    if not is_builtin(model) and requested_model != model:
        raise UserError(f"The checkpoint {path} was made with the model factory {model}, code outside aecurves. "
                        f"aecurves never imports code because a file names it: pass --model {model} to allow it.")
    return arch


def load_endpoint_pair(start_path, end_path, requested_model: str | None = None,
                       flags: str = "--init_start/--init_end") -> tuple[dict, dict, dict]:
    """(start, end, their architecture): both endpoint checkpoints, checked to describe the same network."""
    a = load_checkpoint(start_path, "endpoint", f"start endpoint ({flags})")
    b = load_checkpoint(end_path, "endpoint", f"end endpoint ({flags})")
    arch = trusted_arch(a["args"], requested_model, start_path)
    trusted_arch(b["args"], requested_model, end_path)
    diff = arch_mismatch(a["args"], b["args"])
    if diff:
        raise UserError(f"The endpoints do not match each other: {'; '.join(diff)} ({start_path} vs {end_path}). "
                        "A curve connects two networks of the same architecture; train them with the same "
                        "--model, --latent-dim, --width, --image-size and dataset channels.")
    return a, b, arch


def build_curve(arch: dict, curve_state: dict) -> Curve:
    """A Curve rebuilt from a curve checkpoint's `model_config` and `curve` entries."""
    curve = Curve(build_model(arch), curve_state["curve"], curve_state["num_bends"],
                  curve_state["fix_start"], curve_state["fix_end"])
    curve.load_curve_state(curve_state)
    return curve


def load_curve(path, requested_model: str | None = None) -> tuple[Curve, dict]:
    """(the curve, its checkpoint) from a train-curve checkpoint."""
    state = load_checkpoint(path, "curve", "curve checkpoint")
    arch = trusted_arch(state["model_config"], requested_model, path)
    return build_curve(arch, state["curve"]), state

