"""Checkpoints: written atomically, read without unpickling arbitrary objects, rebuilt into networks and curves.

An endpoint checkpoint is a dict: kind="endpoint", model, optimizer, epoch, args (the run's config as a plain
dict, with the data's `channels`), metrics (one dict per epoch). A curve checkpoint has kind="curve", curve,
model_config (the architecture record), optimizer, epoch, args, metrics. The training state of an FGE run
(`aecurves fge`) has kind="fge", model, model_config, optimizer, epoch, args (the FGE config), metrics and fge
(its snapshots and what it started from). Everything in them is tensors and plain Python values, so
`torch.load(weights_only=True)` reads them.

A checkpoint names its model factory (`args["model"]`, a MODULE:FACTORY string). A factory of the built-in table
(models.BUILTIN_FACTORIES, matched exactly) is rebuilt freely; any other name is imported only when the same
--model is passed (`trusted_arch`): code named in a file is never imported unasked. Everything else a file holds
is checked before use too: its structure and types, finite weights, and weights that fit the network exactly.
"""

import errno
import os
import shutil
from pathlib import Path

import torch

from aecurves.config import VAL_FRACTION, DataConfig, role_fields
from aecurves.curves import Curve
from aecurves.errors import UserError
from aecurves.files import atomic_path
from aecurves.models import ARCH_KEYS, arch_of, build_model, is_builtin

FORMAT_VERSION = 1
# What each kind of checkpoint must hold to be used at all (type of each entry).
REQUIRED = {"endpoint": {"model": dict, "args": dict, "epoch": int, "metrics": list, "optimizer": dict},
            "curve": {"curve": dict, "model_config": dict, "args": dict, "epoch": int, "metrics": list,
                      "optimizer": dict},
            "fge": {"model": dict, "model_config": dict, "args": dict, "epoch": int, "metrics": list,
                    "optimizer": dict, "fge": dict}}
# The entries of a curve checkpoint's "curve" (Curve.curve_state), with their types.
CURVE_STATE = {"bends": torch.Tensor, "buffers": dict, "endpoint_buffers": list, "curve": str, "num_bends": int,
               "fix_start": bool, "fix_end": bool}
KINDS = {"endpoint": "an autoencoder checkpoint (from `aecurves train` or `aecurves export-point`)",
         "curve": "a curve checkpoint (from `aecurves train-curve`)",
         "fge": "the training state of an FGE run (OUT/checkpoint.pt of `aecurves fge`; its snapshots, "
                "OUT/snapshot_K.pt, are autoencoder checkpoints)"}


def save_checkpoint(path: str | os.PathLike, state: dict, exclusive: bool = False) -> None:
    """`exclusive`: never replace a file (files.atomic_path): FileExistsError when one appeared meanwhile."""
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path, exclusive=exclusive) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError:  # torch's writer reports a full disk as "basic_ios::clear: iostream error"
            if shutil.disk_usage(Path(tmp).parent).free < 64 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise


def check_file_out(value: str, example: str, command: str) -> Path:
    """--out of a command that writes one file: a name that ends in a separator, '.' or '..' names a folder (Path()
    would drop a trailing '.', and the file would take the folder's name), as does an existing folder."""
    out = Path(value)
    if os.path.basename(value) in ("", ".", "..") or value.endswith(("/", os.sep)) or out.is_dir():
        suggestion = os.path.normpath(os.path.join(value, example))
        raise UserError(f"--out {value} is a folder; {command} writes one file: pass a file name such as "
                        f"{suggestion}. Nothing was written.")
    return out


def appeared(out, command: str) -> UserError:
    """The refusal when `out`, checked free before any work, was taken by the time the result was linked there."""
    return UserError(f"{out} appeared while this run was writing it (another {command} run with the same --out?). "
                     f"{command} never replaces a file: that file was left as it is, and this run's result was "
                     "discarded. Choose another --out and run again.")


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, what: str = "checkpoint") -> dict:
    """Reads a checkpoint safely; `kind` ("endpoint"/"curve") is checked when given."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"The {what} {path} is a folder, not a file; pass the .pt file inside it (checkpoints are "
                        "written as checkpoint.pt in the run folder of `aecurves train` / `aecurves train-curve`).")
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist. Check the path (checkpoints are written as "
                        "checkpoint.pt in the run folder of `aecurves train` / `aecurves train-curve`).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"Could not read the {what} {path}: it is not a readable aecurves checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Only files written "
                        "by aecurves are accepted; they are loaded with torch.load(weights_only=True).") from None
    if not isinstance(state, dict) or not isinstance(state.get("kind"), str) or state["kind"] not in KINDS:
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
    check_content(state, path, what)
    return state


def check_content(state: dict, path, what: str) -> None:
    """The parts of a checkpoint every command relies on: an architecture record of the right types, tensors
    where weights belong, and only finite values in them (a NaN network evaluates to NaN everywhere, and would
    be blamed on the settings of the run that reads it)."""
    try:
        arch_of(state["args"] if state["kind"] == "endpoint" else state["model_config"])
    except UserError as exc:
        raise UserError(f"The {what} {path} is damaged or was not written by aecurves: {exc}") from None
    if state["kind"] in ("endpoint", "fge"):
        tensors = state["model"]
    else:
        curve = state["curve"]
        wrong = [k for k, t in CURVE_STATE.items() if not isinstance(curve.get(k), t)]
        if wrong:
            raise UserError(f"The {what} {path} is damaged or was not written by aecurves: its curve lacks "
                            f"{', '.join(wrong)}.")
        tensors = {"bends": curve["bends"], **{f"buffers.{k}": v for k, v in curve["buffers"].items()}}
        for i, buffers in enumerate(curve["endpoint_buffers"]):
            tensors.update({f"endpoint_buffers[{i}].{k}": v for k, v in (buffers or {}).items()})
    not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"The {what} {path} is damaged or was not written by aecurves: {', '.join(not_tensors[:4])} "
                        "should be tensors.")
    complex_ = [k for k, v in tensors.items() if v.is_complex()]
    if complex_:  # torch would cast them to real, dropping the imaginary part with a mere warning
        raise UserError(f"The {what} {path} holds complex tensors in {_names(complex_)}: a network's weights are "
                        "real. The file is damaged or was not written by aecurves.")
    refuse_non_finite([(k, v) for k, v in tensors.items() if v.is_floating_point()], path, what)
    negative = [k for k, v in tensors.items() if k.endswith("running_var") and v.is_floating_point()
                and bool((v < 0).any())]
    if negative:  # a variance below 0 makes BatchNorm's 1/sqrt(var + eps) NaN, and weight matching's cost too
        raise UserError(f"The {what} {path} holds negative BatchNorm variances in {_names(negative)}: a running_var "
                        "is never below 0, so the file is damaged. Pass a checkpoint written by aecurves.")


def _names(keys: list) -> str:
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def refuse_non_finite(tensors, path, what: str, cast: str = "") -> None:
    """UserError naming the tensors (name, tensor) with a NaN or an infinity; `cast` says when they only became so
    as the network's dtype (a float64 1e300 is finite in the file and inf in float32)."""
    bad = [k for k, v in tensors if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"The {what} {path} holds non-finite values (NaN or inf){cast} in {_names(bad)}: it is not a "
                        "usable network (aecurves stops a run that diverges before it saves). Pass a checkpoint "
                        "whose weights are finite.")


def check_fits(want: dict, state: dict, path, what: str = "checkpoint") -> None:
    """The state dict must be exactly `want` (a model's state_dict): no missing, no unexpected entry, every shape
    the same (an extra entry would be silently ignored, a reshaped one silently scrambled)."""
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    problems = [f"{label} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("shapes (file vs model)", shapes))
                if names]
    if problems:
        raise UserError(f"The weights in the {what} {path} do not fit its network: {'; '.join(problems)}. The file "
                        "is damaged or does not belong to the model it names.")
    kinds = [f"{k} ({state[k].dtype} vs {want[k].dtype})" for k in want
             if state[k].is_floating_point() != want[k].is_floating_point()]
    if kinds:  # load_state_dict would cast an int or complex tensor into a float one without a word
        raise UserError(f"The weights in the {what} {path} do not fit its network: the wrong kind of number in "
                        f"{_names(kinds)} (file vs model). The file is damaged or does not belong to the model it "
                        "names.")
    # as the network holds them: a float64 value beyond float32's range is finite in the file, inf once loaded
    refuse_non_finite([(k, state[k].to(want[k].dtype)) for k in want if want[k].is_floating_point()
                       and state[k].dtype != want[k].dtype], path, what, " once cast to the network's dtype")


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


def data_of(args: dict) -> dict:
    """The data an endpoint was trained on (DataConfig's settings of role data), in comparable form (paths resolved;
    a checkpoint from before a setting existed has its default). Two endpoints of one curve (or plane) must agree."""
    data = {k: args.get(k) for k in role_fields(DataConfig, "data")}
    data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve()) if data["data_dir"] else None
    data["val_fraction"] = data["val_fraction"] or VAL_FRACTION
    data["use_test"] = bool(data["use_test"])
    return data


def load_endpoints(paths: list, names: list, requested_model: str | None, flags: str, what: str = "endpoints",
                   data_chosen: bool | None = None) -> tuple[list, dict]:
    """(the endpoint checkpoints, their architecture), checked to describe one network: the same architecture,
    weights that fit it, and the same training data unless the command was told which data to use
    (`data_chosen` True, e.g. by --dataset; None: the command has no such flag). Otherwise the first one's data
    would be a silent choice."""
    states = [load_checkpoint(p, "endpoint", f"{name} ({flags})") for p, name in zip(paths, names)]
    arch = trusted_arch(states[0]["args"], requested_model, paths[0])
    for p, s, name in zip(paths[1:], states[1:], names[1:]):
        trusted_arch(s["args"], requested_model, p)
        diff = arch_mismatch(states[0]["args"], s["args"])
        if diff:
            raise UserError(f"The {what} do not match each other: {'; '.join(diff)} ({names[0]} {paths[0]} vs "
                            f"{name} {p}). They must be networks of the same architecture: train them with the same "
                            "--model, --latent-dim, --width, --image-size and dataset channels.")
        data = [data_of(states[0]["args"]), data_of(s["args"])]
        diff = [f"{k}={data[0][k]!r} vs {k}={data[1][k]!r}" for k in data[0] if data[0][k] != data[1][k]]
        if diff and not data_chosen:
            remedy = ("Pass --dataset (and --data-dir) to say which data to use, or" if data_chosen is False
                      else "Pass")
            raise UserError(f"The {what} were trained on different data: {'; '.join(diff)} ({names[0]} {paths[0]} vs "
                            f"{name} {p}). {remedy} networks trained on the same data.")
    model = build_model(arch)
    for p, s, name in zip(paths, states, names):
        check_fits(model.state_dict(), s["model"], p, f"{name} ({flags})")
    return states, arch


def load_endpoint_pair(start_path, end_path, requested_model: str | None = None,
                       flags: str = "--init_start/--init_end",
                       data_chosen: bool | None = None) -> tuple[dict, dict, dict]:
    """(start, end, their architecture): both endpoint checkpoints, checked by load_endpoints."""
    (a, b), arch = load_endpoints([start_path, end_path], ["start endpoint", "end endpoint"], requested_model, flags,
                                  data_chosen=data_chosen)
    return a, b, arch


def build_curve(arch: dict, curve_state: dict, base=None) -> Curve:
    """A Curve rebuilt from a curve checkpoint's `model_config` and `curve` entries (on `base`, when built)."""
    curve = Curve(base if base is not None else build_model(arch), curve_state["curve"], curve_state["num_bends"],
                  curve_state["fix_start"], curve_state["fix_end"])
    curve.load_curve_state(curve_state)
    return curve


def load_curve(path, requested_model: str | None = None) -> tuple[Curve, dict]:
    """(the curve, its checkpoint) from a train-curve checkpoint, its buffers checked to fit the network."""
    state = load_checkpoint(path, "curve", "curve checkpoint")
    arch = trusted_arch(state["model_config"], requested_model, path)
    base = build_model(arch)
    buffers = dict(base.named_buffers())
    for i, given in enumerate([state["curve"]["buffers"], *state["curve"]["endpoint_buffers"]]):
        if given is not None:
            check_fits(buffers, given, path, "curve checkpoint" + (f" (endpoint {i})" if i else ""))
    if not state["curve"]["bends"].is_floating_point():  # copied into float weights, it would be cast silently
        raise UserError(f"The curve checkpoint {path} holds bends of {state['curve']['bends'].dtype}, not floating "
                        "point: the file is damaged or was not written by aecurves.")
    curve = build_curve(arch, state["curve"], base)
    refuse_non_finite([(f"bends[{k}]", b.detach()) for k, b in enumerate(curve.bends)], path, "curve checkpoint",
                      " once cast to the network's dtype")
    return curve, state

