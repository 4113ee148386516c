"""Checkpoints and other outputs, written atomically and read without unpickling arbitrary objects.

An endpoint checkpoint is a dict: kind="endpoint", model, optimizer, epoch, args (the full config
needed to rebuild model and data), metrics (one dict per epoch). Curve checkpoints have kind="curve".
Everything in them is tensors and plain Python values, so `torch.load(weights_only=True)` reads them.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from aecurves.errors import UserError
from aecurves.models import ARCH_KEYS

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
KINDS = {"endpoint": "an autoencoder checkpoint (from `aecurves train` or `aecurves export-point`)",
         "curve": "a curve checkpoint (from `aecurves train-curve`)"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


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
    if kind is not None and state["kind"] != kind:
        extra = (" To use a point of a curve as an endpoint, write one with "
                 "`aecurves export-point --ckpt CURVE --t 0.5 --out FILE`." if kind == "endpoint" else "")
        raise UserError(f"The {what} {path} is {KINDS[state['kind']]}, but {KINDS[kind]} is needed here.{extra}")
    return state


def arch_mismatch(a: dict, b: dict) -> list[str]:
    """Architecture settings that differ between two configs, as 'key: a vs b'."""
    return [f"{k}={a.get(k)!r} vs {k}={b.get(k)!r}" for k in ARCH_KEYS if a.get(k) != b.get(k)]


def check_same_arch(saved: dict, wanted: dict, path, wanted_what: str = "this run") -> None:
    diff = arch_mismatch(saved, wanted)
    if diff:
        raise UserError(f"The checkpoint {path} does not match {wanted_what}: " + "; ".join(diff)
                        + " (checkpoint vs requested). Use the checkpoint's settings (drop the flags that change "
                        "them) or start a new run in another --out folder.")
