"""Where and how a command runs: device, precision, torchrun/DDP set-up, seeding."""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aecurves.config import DEVICES, PRECISIONS
from aecurves.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but PyTorch sees no CUDA GPU "
                            "(torch.cuda.is_available() is False). Use --device cpu, or --device auto to pick.")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"Unknown --device {name!r}; choose one of: {', '.join(DEVICES)}.")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise UserError(f"Unknown --precision {name!r}; choose one of: {', '.join(PRECISIONS)}.")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass; weights, optimizer state and evaluation stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch.optim.Adam in its fastest form for the parameters' device: fused (one kernel for every parameter)
    where torch has that kernel, else for-each (one kernel per operation over all parameters). Both compute
    Adam's update; they differ from each other and from the single-tensor loop only in float rounding."""
    params = list(params)
    if all(_has_fused_adam(p) for p in params):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _has_fused_adam(p: torch.Tensor) -> bool:
    """torch's own test (it runs only at the first step, too late to choose): a real floating-point tensor on a
    device with fused kernels."""
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused
    except ImportError:  # a torch without it: the for-each form is always there
        return False
    try:
        _device_dtype_check_for_fused(p)
    except RuntimeError:
        return False
    return True


def adam_implementation(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "single-tensor"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads a saved optimizer state into `optimizer` but keeps its own implementation (fused, foreach): a
    checkpoint written with another one, or on a device without the fused kernel, resumes on this one. The flags
    are set before loading because loading places the step counters by them (on the device for fused)."""
    keep = ("fused", "foreach", "capturable", "differentiable")
    own = optimizer.param_groups
    groups = [{**saved, **{k: mine[k] for k in keep if k in mine}} for saved, mine in zip(state["param_groups"], own)]
    optimizer.load_state_dict({**state, "param_groups": groups})


class CompiledOrEager:
    """`fn` through torch.compile when `enabled`, falling back to `fn` itself if compiling fails on the first call
    (no C++ compiler, an operation dynamo cannot trace...), with a note through `log`, also added to `notes` when
    given (once: a command's record then says it ran uncompiled, and why). After one compiled call succeeds, errors
    propagate: a fault in the model is not hidden by a silent retry."""

    def __init__(self, fn, enabled: bool, what: str, log=print, notes: list | None = None):
        self.fn, self.what, self.log, self.notes = fn, what, log, notes
        self.compiled = torch.compile(fn) if enabled else None
        self.proven = False
        self.failure: str | None = None

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        if self.proven:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # dynamo and inductor raise many types; the eager call below re-raises real faults
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            self.failure = f"{type(exc).__name__}: {first}"
            note = (f"--compile: torch.compile could not compile the {self.what} ({self.failure}); it runs "
                    "uncompiled, with the same numbers")
            self.log(f"note: {note}")
            if self.notes is not None and note not in self.notes:
                self.notes.append(note)
            self.compiled = None
            return self.fn(*args, **kwargs)
        self.proven = True
        return out


def setup_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Reads torchrun's environment; starts a process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    info = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_name: str = "auto"):
    """setup_distributed() for the duration of a command; the process group is always torn down."""
    info, device = setup_distributed(device_name)
    try:
        yield info, device
        barrier()  # tear down together: a rank leaving while rank 0 still writes files can abort in gloo
    finally:
        cleanup_distributed()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def provenance(device_name: str = "auto", precision: str = "auto") -> dict:
    """What ran where: versions, the git commit of a checkout, the host, the device and the training precision."""
    import platform
    import socket

    from aecurves import __version__

    device = resolve_device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"aecurves": __version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "host": socket.gethostname(), "device": f"{device.type} ({name})",
            "precision": resolve_precision(precision, device)}


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("model name")), "")
    except OSError:
        line = ""
    return line.split(":", 1)[1].strip() if ":" in line else (platform.processor() or platform.machine() or "cpu")


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (marked when it has uncommitted changes), else None."""
    import subprocess
    from pathlib import Path

    package = Path(__file__).resolve().parent

    def git(*args):
        out = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or (Path(top) / "src" / "aecurves").resolve() != package:  # e.g. a venv inside another repo
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (with uncommitted changes)" if commit and dirty else commit
