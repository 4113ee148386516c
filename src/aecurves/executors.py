"""Executors: where a study's stages run. `serial` runs one after another in this process; `local` runs up to N at
once in worker processes on this machine, each with its own device; `slurm` submits each stage as a Slurm job
through submitit, the library facebookresearch projects use for this.

A stage's work is a picklable callable (study.StageJob) that needs only the study folder on a file system every
machine shares. An executor takes it (`submit`), says which have finished (`wait`), and for Slurm can find again a
job that an earlier driver submitted (`attach`). Failures come back as an Outcome with a reason, never as a
half-finished stage: the stage's own command wrote nothing it had not finished.
"""

import concurrent.futures
import contextlib
import dataclasses
import errno
import io
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aecurves.errors import UserError
from aecurves.files import check_no_link

# Slurm job states after which a job will not run again (squeue -t all shows them for MinJobAge seconds)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
        "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
POLL_SECONDS = 1.0
RESULT_GRACE_SECONDS = 5.0
JOB_PREFIX = "aecurves-"


@dataclass
class Handle:
    """A submitted stage: its name, where it runs (job id, device) and its log files."""

    stage: str
    job_id: str | None = None
    device: str | None = None
    logs: dict = field(default_factory=dict)
    task: object = None  # the future, or submitit's job


@dataclass
class Outcome:
    handle: Handle
    result: dict | None = None
    error: str | None = None  # why it failed, with the job id and log file where there is one


# ----------------------------------------------------------------------------------------------------------
# serial: in this process, as `aecurves study` always ran


class SerialExecutor:
    name = "serial"

    def __init__(self):
        self.slots = 1
        self.done: list[Outcome] = []

    def can_start(self, job) -> bool:
        return True

    def submit(self, stage: str, job) -> Handle:
        handle = Handle(stage, device=job.device)
        try:
            self.done.append(Outcome(handle, result=job()))
        except UserError as exc:  # a bug still propagates, with its traceback
            self.done.append(Outcome(handle, error=str(exc)))
        return handle

    def running(self) -> list[Handle]:
        return []

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        done, self.done = self.done, []
        return done

    def attach(self, stage: str, record: dict) -> Handle | None:
        return None

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# local: worker processes on this machine, one device each


def visible_devices() -> list[str]:
    """Every GPU torch sees (cuda:0, cuda:1, ...), else cpu."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def check_devices(devices: list[str]) -> None:
    import torch

    count = torch.cuda.device_count()
    for d in devices:
        if d == "cpu":
            continue
        index = d.removeprefix("cuda:")
        if not d.startswith("cuda:") or not index.isdigit():
            raise UserError(f"--devices takes cpu or cuda:N (comma-separated), got {d!r}.")
        if int(index) >= count:
            raise UserError(f"--devices names {d}, but this machine has {count} GPU(s) that torch can see"
                            f"{' (cuda:0 to cuda:' + str(count - 1) + ')' if count else ''}. Pass devices that exist, "
                            "or leave --devices out to use every visible GPU (or the CPU).")


PARENT_ENV = "AECURVES_PARENT_PID"  # the process a child of a local worker must die with (die_with_parent)
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """This process ends (SIGKILL) when the process `parent` does, so that no local worker, torchrun agent or
    training process outlives the driver that started the chain (a killed driver's workers would otherwise run on
    for as long as their stage, and race the stage a re-run starts). Linux's PR_SET_PDEATHSIG does it at once; a
    thread that watches the parent's id does it within a second elsewhere, and covers a parent that died before
    the call."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # it died before prctl: this process is an orphan already
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="aecurves-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def die_with_this_process(argv: list[str], env: dict) -> tuple[list[str], dict]:
    """(argv, env) that run the command `python -m MODULE ARGS` (argv) so that it dies with this process, and its
    own children that run the same way die with it (the environment names each one's parent)."""
    assert argv[:2] == [sys.executable, "-m"], argv
    return [sys.executable, "-m", "aecurves.executors", *argv[2:]], {**env, PARENT_ENV: str(os.getpid())}


def _start_worker(device: str, threads: int | None, driver: int | None = None) -> None:
    """A local worker's set-up, before anything uses CUDA or torch's threads: it dies with the driver, has its one
    device and its share of cores."""
    if driver is not None:
        die_with_parent(driver)
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
    if threads:
        import torch

        torch.set_num_threads(threads)


class LocalExecutor:
    """Up to `jobs` stages at once, each slot a worker process of its own (spawned once, then reused: starting
    torch costs seconds) bound to one device; on a CPU each worker gets cores // jobs threads, so the jobs never
    oversubscribe the machine."""

    name = "local"

    def __init__(self, jobs: int, devices: list[str], log_dir: Path):
        self.slots = jobs
        self.log_dir = log_dir
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.workers = [self._worker(devices[i % len(devices)]) for i in range(jobs)]
        self.free = list(range(jobs))
        self.handles: dict[concurrent.futures.Future, tuple[list, Handle]] = {}

    def _worker(self, device: str) -> tuple:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(device, self.threads if device == "cpu" else None, os.getpid()))
        return device, pool

    def can_start(self, job) -> bool:
        return len(self.free) >= job.processes

    def submit(self, stage: str, job) -> Handle:
        """The job on the first free slot's worker; a job of `processes` > 1 (DistributedDataParallel training)
        holds that many slots, and their devices, until it ends."""
        slots = [self.free.pop(0) for _ in range(job.processes)]
        devices = [self.workers[i][0] for i in slots]
        log = self.log_dir / f"{stage.replace(':', '_')}.log"
        try:  # a linked logs/ or log file would take the stage's output elsewhere: the stage fails, naming the link
            check_no_link(self.log_dir.parent, log)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except UserError as exc:
            future = concurrent.futures.Future()
            future.set_exception(exc)
            handle = Handle(stage, device=",".join(devices), task=future)
        else:
            future = self.workers[slots[0]][1].submit(dataclasses.replace(job, device=",".join(devices),
                                                                          log=str(log)))
            handle = Handle(stage, device=",".join(devices), logs={"log": str(log)}, task=future)
        self.handles[future] = (slots, handle)
        return handle

    def running(self) -> list[Handle]:
        return [handle for _, handle in self.handles.values()]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self.handles:
            return []
        done, _ = concurrent.futures.wait(list(self.handles), timeout, concurrent.futures.FIRST_COMPLETED)
        outcomes = []
        for future in done:
            slots, handle = self.handles.pop(future)
            self.free.extend(slots)
            slot = slots[0]
            log = handle.logs.get("log")
            try:
                outcomes.append(Outcome(handle, result=future.result()))
            except UserError as exc:
                outcomes.append(Outcome(handle, error=f"{exc}" + (f" (its log: {log})" if log else "")))
            except concurrent.futures.process.BrokenProcessPool:
                self.workers[slot] = self._worker(self.workers[slot][0])  # a fresh one for the stages to come
                outcomes.append(Outcome(handle, error=f"its worker process died (killed, or out of memory); its "
                                                      f"log: {log}"))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a bug in the stage, or its sys.exit: StageJob wrote the traceback to the log
                outcomes.append(Outcome(handle, error=f"an internal error, {type(exc).__name__}: {exc}; its traceback "
                                                      f"is in its log {log}"))
        return outcomes

    def attach(self, stage: str, record: dict) -> Handle | None:
        return None

    def close(self) -> None:
        for _, pool in self.workers:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# slurm: one job per stage, through submitit

# squeue's reasons for a pending job that never clear while the job asks for what it asks: the request exceeds what
# its partition, account or QOS allows, or names one that does not exist (Slurm's job reason codes,
# https://slurm.schedmd.com/job_reason_codes.html). never_clears() adds the per-job and per-node maxima of an
# account or QOS (AssocMax*PerJob*, QOSMax*PerNode, ...) and a QOS's minima (QOSMin*). Every other reason
# (Resources, Priority, Dependency, BeginTime, ReqNodeNotAvail, a node down, a limit on jobs at once) can clear by
# itself: the driver prints it and waits.
NEVER_CLEAR = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                         "InvalidAccount", "AccountNotAllowed", "InvalidQOS", "QOSNotAllowed",
                         "DependencyNeverSatisfied", "MaxMemPerLimit"})
# the setting to change for a reason that never clears, by a word in the reason; the first match counts
SETTING_FOR = (("Time", "--slurm-time"), ("WallDuration", "--slurm-time"), ("Cpu", "--slurm-cpus"),
               ("Mem", "--slurm-mem"), ("GRES", "--slurm-gpus"), ("Account", "--slurm-account"),
               ("QOS", "--slurm-qos"), ("Constraints", "--slurm-extra (its constraint)"))
REQUEST_SETTINGS = "--slurm-cpus, --slurm-mem, --slurm-gpus, --slurm-train-tasks or --slurm-partition"
SBATCH_MEM = re.compile(r"\d+([KMGT]B?)?", re.IGNORECASE)  # sbatch --mem: <size>[units], megabytes by default


def never_clears(reason: str) -> bool:
    return (reason in NEVER_CLEAR or reason.startswith("QOSMin")
            or (reason.startswith(("AssocMax", "QOSMax")) and ("PerJob" in reason or "PerNode" in reason)))


def check_slurm(partition: str | None, mem: str | None = None, root: Path | None = None) -> None:
    """sbatch on the PATH, submitit installed, --slurm-mem in sbatch's syntax, the partition known to the cluster,
    and the study folder `root` fit for submitit's pickles (check_slurm_folder); else a UserError."""
    if mem is not None and not SBATCH_MEM.fullmatch(mem.strip()):
        raise UserError(f"--slurm-mem takes a size as sbatch --mem does, a whole number with an optional unit K, M, "
                        f"G or T (megabytes without one), e.g. 32G; got {mem!r}.")
    if shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs Slurm's sbatch on the PATH, and it is not there: run the study on a "
                        "Slurm login node (or load the Slurm module), or use --executor local.")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--executor slurm needs the submitit package: pip install submitit (or pip install -e "
                        "'.[slurm]').") from None
    if partition is not None:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
        known = [p.strip().rstrip("*") for p in out.stdout.split()]
        if out.returncode == 0 and partition not in known:
            raise UserError(f"--slurm-partition {partition} is not a partition of this cluster; its partitions: "
                            f"{', '.join(known) or 'none'} (sinfo).")
    if root is not None:
        check_slurm_folder(Path(root), Path(root) / "slurm")


def check_slurm_folder(root: Path, folder: Path) -> None:
    """submitit's job and result files are pickles: whoever can write where they lie can run code as this user, in
    the driver or in a job. So the study folder `root` must not be writable by others (unless sticky, as /tmp is:
    then nobody else can rename what is in it), and the Slurm folder `folder` inside it must be no link and, if it
    exists, be this user's and writable by nobody else. UserError naming what is not."""
    check_no_link(root, folder)
    if root.is_dir():
        info = root.stat()
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise UserError(f"The study folder {root} is writable by every user ({stat.filemode(info.st_mode)}), so "
                            "another user could replace the Slurm job files in it, which are pickles: code this user "
                            f"would run. Make it yours alone (chmod o-w {root}), or choose an --out folder of your "
                            "own; nothing was submitted.")
    if folder.exists():
        info = folder.lstat()
        why = _untrusted(info, group=True) if stat.S_ISDIR(info.st_mode) else "not a folder"
        if why:
            raise UserError(f"The Slurm folder {folder} is {why}. The Slurm job files go there, and they are pickles: "
                            "code this user would run, so only a folder of this user's alone can hold them. Remove it "
                            f"if you do not need its logs (rm -r {folder}), or make it yours alone (chmod go-w "
                            f"{folder}); nothing was submitted.")


def _untrusted(info: os.stat_result, group: bool) -> str | None:
    """Why a file or folder with this stat could have been written by someone other than this user, or None."""
    if info.st_uid != os.geteuid():
        return f"owned by user id {info.st_uid}, not by you (user id {os.geteuid()})"
    if info.st_mode & (stat.S_IWOTH | (stat.S_IWGRP if group else 0)):
        return f"writable by {'its group or ' if group else ''}others ({stat.filemode(info.st_mode)})"
    return None


READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_own_folder(name: str | Path, dir_fd: int | None = None) -> int:
    """An fd of the folder `name` (relative to `dir_fd`), opened without following a link, this user's and not
    writable by others; OSError (ELOOP for a link, ENOTDIR) or _NotOurs otherwise."""
    fd = os.open(name, READ_DIR, dir_fd=dir_fd)
    why = _untrusted(os.fstat(fd), group=True)
    if why:
        os.close(fd)
        raise _NotOurs(why)
    return fd


class _NotOurs(Exception):
    """A file or folder on the way to a result that this user does not own alone: it is never read."""


class _Unreadable(Exception):
    """A result file that is this user's own but cannot be read (yet)."""


@dataclass
class QueueEntry:
    """A job as squeue shows it: its state, why it pends (None when it does not), and what it asks for."""

    state: str
    reason: str = "None"
    request: str = ""


def job_queue(job_ids: list[str]) -> dict[str, QueueEntry]:
    """{job id: its QueueEntry} from squeue (every state, for as long as Slurm keeps ended jobs); an id it no longer
    knows is left out."""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%P|%C|%m|%b", "-j", ",".join(job_ids)],
                         capture_output=True, text=True)
    if out.returncode != 0 and len(job_ids) > 1:  # one id it has forgotten fails the whole query
        return {k: v for j in job_ids for k, v in job_queue([j]).items()}
    found = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 7:
            job_id, state, reason, partition, cpus, mem, gres = parts
            asks = ", ".join([f"{cpus} CPU(s)", *([f"{mem} memory"] if mem not in ("0", "") else []),
                              *([gres] if gres not in ("N/A", "") else [])]) + f" in partition {partition}"
            found[job_id] = QueueEntry(state, reason, asks)
    return found


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from squeue; an id it no longer knows is left out."""
    return {job_id: entry.state for job_id, entry in job_queue(job_ids).items()}


def live_jobs(folder: Path) -> dict[str, tuple[str, Path]]:
    """{stage: (job id, its job folder)} of this user's queued or running jobs whose submission script lies in
    `folder` (this study's)."""
    import getpass

    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j|%T|%o"], capture_output=True,
                         text=True)
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) != 4 or not parts[1].startswith(JOB_PREFIX) or parts[2] not in LIVE:
            continue
        script = Path(parts[3])
        try:
            ours = script.resolve().is_relative_to(folder.resolve())
        except (OSError, ValueError):
            ours = False
        if ours:  # sbatch ran RUN/.submission_file_*.sh, which submitit then moves to RUN/JOB_ID/
            run_folder = script.parent.parent if script.parent.name == parts[0] else script.parent
            found[parts[1].removeprefix(JOB_PREFIX)] = (parts[0], run_folder)
    return found


@dataclass(frozen=True)
class SlurmSettings:
    """What every stage job asks Slurm for: the study's --slurm-* settings (config.StudyConfig holds their defaults
    and help), without the prefix."""

    partition: str | None
    time: int                 # minutes
    gpus: int
    train_tasks: int | None   # DistributedDataParallel tasks of a training job (None: gpus, at least 1)
    cpus: int | None
    mem: str | None
    account: str | None
    qos: str | None
    setup: tuple              # shell lines run before aecurves
    extra: tuple              # KEY=VALUE for sbatch
    max_jobs: int


class SlurmExecutor:
    """Each stage one Slurm job. A job's result comes from submitit's result file, its state from squeue: this
    works without an accounting database (sacct), as on many small clusters. Job folders and logs are in
    STUDY/slurm/RUN/JOB_ID/, RUN a folder each driver makes anew.

    Result files are pickles, so the driver reads one only through the run folder it made (opened once, its fd
    kept), following no link, and only when the job folder and the file are this user's and not writable by others:
    a folder someone sent, swapped or linked in is never unpickled. A stage fails loudly, never silently waits: an
    sbatch refusal, a job pending for a reason that never clears (NEVER_CLEAR), a result that cannot be read once
    its job has ended."""

    name = "slurm"

    def __init__(self, folder: Path, settings: "SlurmSettings"):
        import logging

        import submitit

        logging.getLogger("submitit").setLevel(logging.ERROR)  # it warns at every poll when sacct is missing
        self.folder = Path(os.path.abspath(folder))
        self.folder_fd, self.run_folder, self.run_fd = self._make_run_folder(self.folder)
        self.run_fds = {self.run_folder.name: self.run_fd}  # run folder name -> its fd (earlier drivers' too)
        self.slots = settings.max_jobs
        self.gpus = settings.gpus
        self.train_tasks = settings.train_tasks or max(1, settings.gpus)
        self.executor = submitit.AutoExecutor(folder=self.run_folder / "%j", cluster="slurm")
        extra_params = dict(kv.split("=", 1) for kv in settings.extra)
        params = {"timeout_min": settings.time, "slurm_setup": list(settings.setup),
                  "slurm_additional_parameters": extra_params}
        for key, value in (("slurm_partition", settings.partition), ("cpus_per_task", settings.cpus),
                           ("slurm_mem", settings.mem), ("slurm_account", settings.account),
                           ("slurm_qos", settings.qos)):
            if value is not None:
                params[key] = value
        self.executor.update_parameters(**params)
        self.handles: dict[str, Handle] = {}
        self.job_run: dict[str, str] = {}  # job id -> the name of its run folder
        self.refused: list[Outcome] = []  # stages sbatch refused, or an earlier driver's job not followed
        self.reasons: dict[str, str] = {}  # job id -> the pending reason last printed
        self.live = live_jobs(self.folder)  # stage -> job id, for a driver started again while its jobs still run
        self.ended_at: dict[str, float] = {}

    @staticmethod
    def _make_run_folder(folder: Path) -> tuple[int, Path, int]:
        """(fd of STUDY/slurm/, STUDY/slurm/RUN/, fd of RUN): slurm/ checked (check_slurm_folder), made 0o700 if
        missing; RUN new, unguessable, 0o700, made and opened relative to slurm/'s fd, so no link on the way."""
        import secrets

        root = folder.parent
        check_slurm_folder(root, folder)
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        check_slurm_folder(root, folder)  # again: it exists now, whoever made it
        try:
            folder_fd = _open_own_folder(folder)
        except (OSError, _NotOurs) as exc:
            raise UserError(f"The Slurm folder {folder} cannot be used ({exc}); remove it and run again. "
                            "Nothing was submitted.") from None
        name = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(6)
        os.mkdir(name, 0o700, dir_fd=folder_fd)
        run_fd = os.open(name, READ_DIR, dir_fd=folder_fd)
        os.fchmod(run_fd, 0o700)  # whatever the umask
        return folder_fd, folder / name, run_fd

    def can_start(self, job) -> bool:
        return len(self.handles) + len(self.refused) < self.slots

    def submit(self, stage: str, job) -> Handle:
        """A training job of several `processes` gets train_tasks tasks (DistributedDataParallel, one per GPU) and
        every GPU; any other job one task and at most one GPU: evaluations run as one process. A submission sbatch
        refuses comes back from wait() as a failed Outcome quoting sbatch."""
        from submitit.core.utils import FailedSubmissionError, UncompletedJobError

        tasks = self.train_tasks if job.processes > 1 else 1
        gpus = self.gpus if job.processes > 1 else min(self.gpus, 1)
        self.executor.update_parameters(slurm_job_name=JOB_PREFIX + stage, tasks_per_node=tasks,
                                        **({"gpus_per_node": gpus} if gpus else {}))
        before = set(os.listdir(self.run_fd))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaint itself, then raises
                submitted = self.executor.submit(job)
        except (UncompletedJobError, FailedSubmissionError, subprocess.SubprocessError, OSError) as exc:
            return self._refuse(stage, f"sbatch refused its job: {sbatch_reason(exc)}. Change the setting this names "
                                       f"and re-run the same command{self._left_behind(before)}.")
        return self._track(stage, submitted, self.run_folder.name)

    def _left_behind(self, before: set) -> str:
        """Removes the job pickle of a refused submission; names the script sbatch was given."""
        new = set(os.listdir(self.run_fd)) - before
        for name in new:
            if name.endswith(".pkl"):
                os.unlink(name, dir_fd=self.run_fd)
        scripts = sorted(n for n in new if n.startswith(".submission_file_"))
        return f" (the job's script: {self.run_folder / scripts[0]})" if scripts else ""

    def _refuse(self, stage: str, error: str) -> Handle:
        handle = Handle(stage)
        self.refused.append(Outcome(handle, error=error))
        return handle

    def _track(self, stage: str, submitted, run_name: str) -> Handle:
        handle = Handle(stage, job_id=str(submitted.job_id), task=submitted,
                        logs={"stdout": str(submitted.paths.stdout), "stderr": str(submitted.paths.stderr)})
        self.handles[handle.job_id] = handle
        self.job_run[handle.job_id] = run_name
        return handle

    def attach(self, stage: str, record: dict) -> Handle | None:
        """The job an earlier driver submitted for this stage, when Slurm still has it queued or running. Found by
        its name and its folder in squeue, not only by the stage's record: a driver killed just after sbatch had no
        time to write the job id down. Its run folder must be one of STUDY/slurm/ and this user's alone, as this
        driver's: otherwise the stage fails, naming it."""
        import submitit

        if stage not in self.live:
            return None
        job_id, run_folder = self.live[stage]
        run_folder = Path(os.path.abspath(run_folder))
        try:
            if run_folder.parent.resolve() != self.folder.resolve():  # the study named through another link: same
                raise _NotOurs(f"not a folder of {self.folder}")
            if run_folder.name not in self.run_fds:
                self.run_fds[run_folder.name] = _open_own_folder(run_folder.name, self.folder_fd)
        except (OSError, _NotOurs) as exc:
            why = _link_or(exc, run_folder.name, self.folder_fd) if isinstance(exc, OSError) else exc
            return self._refuse(stage, f"Slurm job {job_id}, submitted for it by an earlier run, works in {run_folder}"
                                       f", which is {why}: its result is never read. Cancel it (scancel {job_id}) and "
                                       "re-run the same command.")
        return self._track(stage, submitit.SlurmJob(folder=run_folder / "%j", job_id=job_id), run_folder.name)

    def running(self) -> list[Handle]:
        return [*self.handles.values(), *(outcome.handle for outcome in self.refused)]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if self.refused:
            refused, self.refused = self.refused, []
            return refused
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.handles:
            outcomes = self._poll()
            if outcomes or (deadline is not None and time.monotonic() >= deadline):
                return outcomes
            time.sleep(POLL_SECONDS)
        return []

    def _poll(self) -> list[Outcome]:
        queue = job_queue(list(self.handles))
        outcomes = []
        for job_id, handle in list(self.handles.items()):
            outcome = self._judge(handle, queue.get(job_id))
            if outcome is not None:
                outcomes.append(outcome)
                del self.handles[job_id]
        return outcomes

    def _judge(self, handle: Handle, entry: QueueEntry | None) -> Outcome | None:
        """The job's Outcome once it has one, else None (it is still queued or running, or its result is on its way
        over a network file system: RESULT_GRACE_SECONDS after it ended)."""
        job_id, state = handle.job_id, entry.state if entry else None
        try:
            loaded = self._load_result(handle)
        except _NotOurs as exc:  # never read, and never will be: the job's output went elsewhere
            if state in LIVE:
                subprocess.run(["scancel", job_id], capture_output=True)
            return Outcome(handle, error=f"its result {exc}, so it was not read: the driver unpickles a result only "
                                         "from its own run folder, through no link, from a file of yours that nobody "
                                         f"else can write (docs/reliability.md). Slurm job {job_id}, "
                                         f"{state or 'gone from the queue'}; its log: {handle.logs['stderr']}")
        except _Unreadable as exc:
            if not self._ended_long_enough(job_id, state):
                return None  # still being written
            return Outcome(handle, error=f"{exc}, and Slurm job {job_id} has ended ({state or 'gone from the queue'}); "
                                         f"its log: {handle.logs['stderr']}")
        if loaded is not None:
            return self._result(handle, loaded)
        if state in LIVE:
            return self._pending(handle, entry)
        if not self._ended_long_enough(job_id, state):
            return None
        return Outcome(handle, error=f"Slurm job {job_id} ended as {state or 'gone from the queue'} without a result "
                                     f"(cancelled, killed or out of time); its log: {handle.logs['stderr']}")

    def _ended_long_enough(self, job_id: str, state: str | None) -> bool:
        """The job has ended (or left the queue) at least RESULT_GRACE_SECONDS ago, as this driver saw it."""
        if state in LIVE or (state is not None and state not in ENDED):
            return False
        return time.monotonic() - self.ended_at.setdefault(job_id, time.monotonic()) >= RESULT_GRACE_SECONDS

    def _result(self, handle: Handle, loaded) -> Outcome:
        kind, value = loaded
        if kind == "success":
            return Outcome(handle, result=value)
        last = [line for line in str(value).strip().splitlines() if line.strip()][-1:]
        return Outcome(handle, error=f"{last[0] if last else 'it failed'} (Slurm job {handle.job_id}; its log: "
                                     f"{handle.logs['stderr']})")

    def _pending(self, handle: Handle, entry: QueueEntry) -> Outcome | None:
        """Prints why a job pends when that changes; cancels it, and fails its stage, on a reason that never
        clears."""
        job_id, reason = handle.job_id, entry.reason
        if entry.state != "PENDING" or reason in ("None", "", "(null)"):
            return None
        if self.reasons.get(job_id) != reason:
            self.reasons[job_id] = reason
            print(f"    {handle.stage}: Slurm job {job_id} pending ({reason})", flush=True)
        if not never_clears(reason):
            return None
        subprocess.run(["scancel", job_id], capture_output=True)
        setting = next((s for word, s in SETTING_FOR if word in reason), REQUEST_SETTINGS)
        return Outcome(handle, error=f"Slurm job {job_id} can never start: it pends with reason {reason} (it asks for "
                                     f"{entry.request}), which does not clear while the job asks for the same. It was "
                                     f"cancelled; change {setting} and re-run the same command.")

    def _load_result(self, handle: Handle):
        """The job's (kind, value) from submitit's result file, or None while there is none. Read through the fd of
        its run folder, following no link: the job folder and the file must be this user's and not writable by
        others (else _NotOurs, and nothing is read); a file that is ours but not a complete pickle: _Unreadable."""
        paths = handle.task.paths
        file = paths.result_pickle
        try:
            run_fd = self.run_fds[self.job_run[handle.job_id]]
            job_fd = os.open(paths.folder.name, READ_DIR, dir_fd=run_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _not_read(exc, f"folder {paths.folder}", paths.folder.name, run_fd) from None
        try:
            why = _untrusted(os.fstat(job_fd), group=False)
            if why:
                raise _NotOurs(f"folder {paths.folder} is {why}")
            try:  # O_NONBLOCK: a FIFO there must not hang the driver (it is refused below)
                fd = os.open(file.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                             dir_fd=job_fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _not_read(exc, f"file {file}", file.name, job_fd) from None
        finally:
            os.close(job_fd)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            why = _untrusted(info, group=False) if stat.S_ISREG(info.st_mode) else "not a regular file"
            if why:
                raise _NotOurs(f"file {file} is {why}")
            try:
                return pickle.load(f)
            except Exception as exc:  # truncated, or not a pickle: whatever it holds, it is no result
                raise _Unreadable(f"its result file {file} cannot be read ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        for fd in [*self.run_fds.values(), self.folder_fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.run_fds = {}


def _link_or(exc: OSError, name: str, dir_fd: int) -> str:
    """What a name that open(O_NOFOLLOW) refused with `exc` is: a link (ELOOP for a file, ENOTDIR for a folder), a
    file where a folder belongs, or unreadable."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return "a symbolic link"
    return "not a folder" if exc.errno == errno.ENOTDIR else f"unreadable ({exc.strerror})"


def _not_read(exc: OSError, what: str, name: str, dir_fd: int) -> Exception:
    """A link or a non-folder on the way to a result is never read (_NotOurs); another error (no permission) may
    pass (_Unreadable)."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return _NotOurs(f"{what} is {_link_or(exc, name, dir_fd)}")
    return _Unreadable(f"its result {what} cannot be opened ({exc.strerror})")


def sbatch_reason(exc: BaseException) -> str:
    """sbatch's own words from a failed submission: its error lines (not its 'Try sbatch --help' hint)."""
    text = str(exc).strip() or (getattr(exc.__cause__, "stderr", None) or "").strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("Try ")]
    return "; ".join(lines) or text


if __name__ == "__main__":  # python -m aecurves.executors MODULE ARGS: `python -m MODULE ARGS`, dying with its parent
    import runpy

    die_with_parent(int(os.environ[PARENT_ENV]))
    os.environ[PARENT_ENV] = str(os.getpid())  # the parent of the children it starts so (torchrun's training processes)
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
