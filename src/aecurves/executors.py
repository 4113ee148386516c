"""Executors: where a study's stages run. `serial` runs one after another in this process; `local` runs up to N at
once in worker processes on this machine, each with its own device; `slurm` submits each stage as a Slurm job
through submitit, the library facebookresearch projects use for this.

A stage's work is a picklable callable (study.StageJob) that needs only the study folder on a file system every
machine shares. An executor takes it (`submit`), says which have finished (`wait`), and for Slurm can find again a
job that an earlier driver submitted (`attach`). Failures come back as an Outcome with a reason, never as a
half-finished stage: the stage's own command wrote nothing it had not finished.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aecurves.errors import UserError

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


def _start_worker(device: str, threads: int | None) -> None:
    """A local worker's set-up, before anything uses CUDA or torch's threads: its one device, its share of cores."""
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
            initargs=(device, self.threads if device == "cpu" else None))
        return device, pool

    def can_start(self, job) -> bool:
        return len(self.free) >= job.processes

    def submit(self, stage: str, job) -> Handle:
        """The job on the first free slot's worker; a job of `processes` > 1 (DistributedDataParallel training)
        holds that many slots, and their devices, until it ends."""
        slots = [self.free.pop(0) for _ in range(job.processes)]
        devices = [self.workers[i][0] for i in slots]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{stage.replace(':', '_')}.log"
        future = self.workers[slots[0]][1].submit(dataclasses.replace(job, device=",".join(devices), log=str(log)))
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
            log = handle.logs["log"]
            try:
                outcomes.append(Outcome(handle, result=future.result()))
            except UserError as exc:
                outcomes.append(Outcome(handle, error=f"{exc} (its log: {log})"))
            except concurrent.futures.process.BrokenProcessPool:
                self.workers[slot] = self._worker(self.workers[slot][0])  # a fresh one for the stages to come
                outcomes.append(Outcome(handle, error=f"its worker process died (killed, or out of memory); its "
                                                      f"log: {log}"))
            except Exception as exc:  # a bug in the stage: its traceback is in the log
                outcomes.append(Outcome(handle, error=f"{type(exc).__name__}: {exc} (see {log})"))
        return outcomes

    def attach(self, stage: str, record: dict) -> Handle | None:
        return None

    def close(self) -> None:
        for _, pool in self.workers:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# slurm: one job per stage, through submitit


def check_slurm(partition: str | None) -> None:
    """sbatch on the PATH, submitit installed, and the partition known to the cluster; else a UserError."""
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


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from squeue (every state, for as long as Slurm keeps ended jobs); an id it no longer knows is
    left out."""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True,
                         text=True)
    if out.returncode != 0 and len(job_ids) > 1:  # one id it has forgotten fails the whole query
        return {k: v for j in job_ids for k, v in job_states([j]).items()}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


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


class SlurmExecutor:
    """Each stage one Slurm job. A job's result comes from submitit's result file, its state from squeue: this
    works without an accounting database (sacct), as on many small clusters. Job folders and logs are in
    STUDY/slurm/RUN/JOB_ID/, RUN a folder each driver makes anew."""

    name = "slurm"

    def __init__(self, folder: Path, max_jobs: int, partition: str | None, minutes: int, gpus: int,
                 train_tasks: int | None, cpus: int | None, mem: str | None, account: str | None, qos: str | None,
                 setup: list, extra: list):
        import logging

        import submitit

        logging.getLogger("submitit").setLevel(logging.ERROR)  # it warns at every poll when sacct is missing
        # A folder of this driver's own, new and unguessable: submitit's result files are pickles, so the driver
        # must never read one it did not ask a job of its own to write (a study folder someone sent may hold some)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.run_folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=folder))
        self.slots = max_jobs
        self.gpus = gpus
        self.train_tasks = train_tasks or max(1, gpus)
        self.executor = submitit.AutoExecutor(folder=self.run_folder / "%j", cluster="slurm")
        extra_params = dict(kv.split("=", 1) for kv in extra)
        params = {"timeout_min": minutes, "slurm_setup": list(setup), "slurm_additional_parameters": extra_params}
        for key, value in (("slurm_partition", partition), ("cpus_per_task", cpus), ("slurm_mem", mem),
                           ("slurm_account", account),
                           ("slurm_qos", qos)):
            if value is not None:
                params[key] = value
        self.executor.update_parameters(**params)
        self.handles: dict[str, Handle] = {}
        self.live = live_jobs(folder)  # stage -> job id, for a driver started again while its jobs still run
        self.ended_at: dict[str, float] = {}

    def can_start(self, job) -> bool:
        return len(self.handles) < self.slots

    def submit(self, stage: str, job) -> Handle:
        """A training job of several `processes` gets train_tasks tasks (DistributedDataParallel, one per GPU) and
        every GPU; any other job one task and at most one GPU: evaluations run as one process."""
        tasks = self.train_tasks if job.processes > 1 else 1
        gpus = self.gpus if job.processes > 1 else min(self.gpus, 1)
        self.executor.update_parameters(slurm_job_name=JOB_PREFIX + stage, tasks_per_node=tasks,
                                        **({"gpus_per_node": gpus} if gpus else {}))
        submitted = self.executor.submit(job)
        return self._track(stage, submitted)

    def _track(self, stage: str, submitted) -> Handle:
        handle = Handle(stage, job_id=str(submitted.job_id), task=submitted,
                        logs={"stdout": str(submitted.paths.stdout), "stderr": str(submitted.paths.stderr)})
        self.handles[handle.job_id] = handle
        return handle

    def attach(self, stage: str, record: dict) -> Handle | None:
        """The job an earlier driver submitted for this stage, when Slurm still has it queued or running. Found by
        its name and its folder in squeue, not only by the stage's record: a driver killed just after sbatch had no
        time to write the job id down."""
        import submitit

        if stage not in self.live:
            return None
        job_id, run_folder = self.live[stage]
        return self._track(stage, submitit.SlurmJob(folder=run_folder / "%j", job_id=job_id))

    def running(self) -> list[Handle]:
        return list(self.handles.values())

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.handles:
            outcomes = self._poll()
            if outcomes or (deadline is not None and time.monotonic() >= deadline):
                return outcomes
            time.sleep(POLL_SECONDS)
        return []

    def _poll(self) -> list[Outcome]:
        from submitit.core.utils import pickle_load

        states = job_states(list(self.handles))
        outcomes = []
        for job_id, handle in list(self.handles.items()):
            result_file = handle.task.paths.result_pickle
            state = states.get(job_id)
            if result_file.exists():
                try:
                    kind, value = pickle_load(result_file)
                except Exception:  # still being written
                    continue
                if kind == "success":
                    outcomes.append(Outcome(handle, result=value))
                else:
                    last = [line for line in str(value).strip().splitlines() if line.strip()][-1:]
                    outcomes.append(Outcome(handle, error=f"{last[0] if last else 'it failed'} (Slurm job {job_id}; "
                                                          f"its log: {handle.logs['stderr']})"))
            elif state in LIVE:
                continue
            elif time.monotonic() - self.ended_at.setdefault(job_id, time.monotonic()) < RESULT_GRACE_SECONDS:
                continue  # ended: its result file may still be on its way over a network file system
            elif state in ENDED or state is None:
                outcomes.append(Outcome(handle, error=f"Slurm job {job_id} ended as {state or 'gone from the queue'} "
                                                      f"without a result (cancelled, killed or out of time); its log: "
                                                      f"{handle.logs['stderr']}"))
            else:
                continue
            del self.handles[job_id]
        return outcomes

    def close(self) -> None:
        pass
