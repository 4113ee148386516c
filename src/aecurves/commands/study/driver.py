"""Running the stages: the Driver hands every stage whose dependencies are finished to an executor (executors.py:
serial, local worker processes or Slurm jobs), each running a StageJob, a picklable call of COMMAND.run(config)."""

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aecurves.config import BUILTIN_MODEL, replace_given, to_toml
from aecurves.errors import UserError, call_guarded

from .kinds import KINDS
from .planning import Stage, stage_named
from .settings import Settings, gpus_per_train, local_devices, slurm_settings
from .state import Study, fmt_seconds, read_stage_record, stage_command


def check_executor_machine(settings: Settings) -> None:
    """What the executor needs of this machine: the devices it names, or sbatch and the partition."""
    from aecurves import executors

    if settings.executor == "local":
        devices = local_devices(settings)
        executors.check_devices(devices)
        slots = settings.jobs or len(devices)
        if settings.gpus_per_train > slots:
            raise UserError(f"--gpus-per-train {settings.gpus_per_train} needs as many devices at once, but the local "
                            f"executor runs {slots} at a time ({', '.join(devices)}); pass more --devices (or --jobs), "
                            "or a smaller --gpus-per-train.")
    if settings.executor == "slurm":
        executors.check_slurm(settings.slurm_partition, settings.slurm_mem, settings.root)


def make_executor(settings: Settings, root: Path):
    from aecurves import executors

    if settings.executor == "local":
        devices = local_devices(settings)
        return executors.LocalExecutor(settings.jobs or len(devices), devices, root / "logs")
    if settings.executor == "slurm":
        return executors.SlurmExecutor(root / "slurm", slurm_settings(settings))
    return executors.SerialExecutor()


class Driver:
    """Submits each stage as soon as the stages it depends on are finished, at most the executor's slots at once,
    and records how each ran. A failure stops new submissions; the running stages are waited for, then the
    study stops with every failure named (serially: at once, as it always did)."""

    def __init__(self, study: Study, executor, will_run: set):
        self.study, self.executor, self.will_run = study, executor, will_run
        self.waiting = [st for st in study.stages if st.kind != "report"]
        self.finished: set[str] = set()
        self.failures: list[str] = []
        self.started: dict[str, tuple[float, object]] = {}  # name -> (perf_counter, handle)

    def run(self) -> None:
        while self.waiting or self.executor.running():
            if not self.failures:
                self.submit_ready()
            if not self.executor.running():
                if self.waiting and not self.failures:  # nothing runs and nothing can start: cannot happen
                    raise RuntimeError(f"stages left that can never start: {[s.name for s in self.waiting]}")
                break
            for outcome in self.executor.wait(timeout=5.0):
                self.finish(outcome)
        if self.failures:
            running_note = "" if self.executor.name == "serial" else " (the stages that were running have finished)"
            raise UserError("\n".join(self.failures) + f"\nThe finished stages are kept{running_note}; fix the "
                            "cause and re-run the same command to continue: only what is unfinished runs.")

    def submit_ready(self) -> None:
        for st in list(self.waiting):
            if self.failures:
                return
            if all(d in self.finished for d in st.deps) and self.executor.can_start(self.job(st)):
                self.waiting.remove(st)
                self.start(st)
                if self.executor.name == "serial":  # it ran already: record it before judging the next stage
                    for outcome in self.executor.wait():
                        self.finish(outcome)

    def start(self, st: Stage) -> None:
        """Follows the stage's job when an earlier driver's still runs, skips it when finished, else clears what a
        redo replaces and submits it."""
        study, i = self.study, self.study.stages.index(st) + 1
        todo = [s for s in study.stages[i - 1:] if s.name in self.will_run and s.name not in self.finished]
        record = read_stage_record(study.root / st.folder)
        # only a stage an earlier driver left started or submitted can have a job of its own in the queue; a finished
        # job stays in squeue for a moment (COMPLETING) after its result is read, and its stage is judged, not followed
        left = record is not None and record.status in ("started", "submitted")
        handle = self.executor.attach(st.name, record.to_json()) if left else None
        if handle is not None:  # submitted by an earlier driver and still queued or running: follow it
            study.progress(i, st, todo, f": following Slurm job {handle.job_id}, submitted by an earlier run")
            self.started[st.name] = (time.perf_counter(), handle)
            return
        state, why = ("forced", "--force") if st.name in study.forced else study.status(st)
        if state == "done":
            self.skip(st, i, [s for s in todo if s is not st], adopted=why == "adopted")
            return
        note = {"resume": f": resuming ({why})", "redo": f": redoing ({why})", "forced": ": redoing (--force)",
                "new": ""}[state]
        if state in ("redo", "forced"):
            study.clear(st)
        job = self.job(st, resume=state == "resume")
        study.write_record(st, "started", executor=self.executor.name)
        if self.executor.name != "serial":
            note += f" [{len(self.executor.running()) + 1} running]"
        study.progress(i, st, todo, note)
        self.submit(st, job)

    def skip(self, st: Stage, i: int, todo: list, adopted: bool) -> None:
        self.study.skipped.append(st.name)
        self.finished.add(st.name)
        self.study.progress(i, st, todo, ": finished already, skipped" + " (adopted existing outputs)" * adopted)
        if adopted:
            self.study.write_record(st, "done", adopted=True)

    def submit(self, st: Stage, job: "StageJob") -> None:
        study, where = self.study, ""
        t0 = time.perf_counter()  # before submit: the serial executor runs the stage inside it
        try:
            handle = self.executor.submit(st.name, job)
        except UserError as exc:  # it could not be started: the stage failed, and its record says so
            study.write_record(st, "failed", error=str(exc), executor=self.executor.name)
            self.failures.append(f"stage {st.name} ({st.label}) failed: {exc}")
            return
        except Exception as exc:  # a bug: its traceback follows, but the record must not say "started"
            study.write_record(st, "failed", error=f"an internal error, {type(exc).__name__}: {exc}",
                               executor=self.executor.name)
            raise
        if handle.job_id is not None:
            study.write_record(st, "submitted", executor=self.executor.name, job_id=handle.job_id, logs=handle.logs)
            where = f"Slurm job {handle.job_id}, log {handle.logs.get('stderr')}"
        elif self.executor.name == "local" and handle.logs:  # none when its log was refused: it failed already
            where = f"on {handle.device}, log {handle.logs['log']}"
        if where:
            print(f"    {st.name}: {where}", flush=True)
        self.started[st.name] = (t0, handle)

    def job(self, st: Stage, resume: bool = False) -> "StageJob":
        """The stage's job; a distributed kind's (endpoint, extra training) runs as gpus_per_train
        DistributedDataParallel processes."""
        return StageJob(self.study.settings, st.name, resume=resume,
                        processes=gpus_per_train(self.study.settings) if KINDS[st.step].distributed else 1)

    def finish(self, outcome) -> None:
        study = self.study
        st = next(s for s in study.stages if s.name == outcome.handle.stage)
        t0, handle = self.started.pop(st.name)
        ran = {"executor": self.executor.name, **({"job_id": handle.job_id} if handle.job_id else {}),
               **({"logs": handle.logs} if handle.logs else {}), **(outcome.result or {}).get("ran", {})}
        if outcome.error is not None:
            study.write_record(st, "failed", error=outcome.error, **ran)
            self.failures.append(f"stage {st.name} ({st.label}) failed: {outcome.error}")
            if self.executor.running():
                print(f"\nstage {st.name} failed; no new stage starts, waiting for the "
                      f"{len(self.executor.running())} running", flush=True)
            return
        seconds = time.perf_counter() - t0
        state_after, why_after = study.status(st)
        if state_after != "done":
            study.write_record(st, "failed", error=why_after or state_after, **ran)
            self.failures.append(f"stage {st.name} ran but its outputs are not complete ({why_after or state_after});"
                                 f" see {study.root / st.folder}.")
            return
        self.record_done(st, seconds, ran, (outcome.result or {}).get("result"))

    def record_done(self, st: Stage, seconds: float, ran: dict, result) -> None:
        study = self.study
        for key in (st.kind, (st.kind, st.loss)):
            s, u = study.rates.get(key, (0.0, 0.0))
            study.rates[key] = (s + seconds, u + st.units)
        study.ran.append(st.name)
        self.finished.add(st.name)
        study.provenance["stage_seconds"][st.name] = round(seconds, 1)
        study.write_record(st, "done", ran=ran, **({"result": result} if KINDS[st.step].keeps_result else {}))
        study.write_study_json()
        if self.executor.name != "serial":
            print(f"    {st.name}: done in {fmt_seconds(seconds)} [{len(self.finished)} finished, "
                  f"{len(self.executor.running())} running, {len(self.waiting)} waiting]", flush=True)


@dataclass
class StageJob:
    """One stage's work as a picklable callable: the study's resolved settings and the stage's name, nothing else,
    so it runs in this process, in a worker process or as a Slurm job on another machine, given the study folder on
    a shared file system. It makes its own stage alone (planning.stage_named) and returns how it ran and its
    command's result."""

    settings: Settings
    stage: str
    resume: bool = False
    device: str | None = None      # local: its worker's device, cuda:N (the worker sees only that GPU) or cpu
    log: str | None = None         # local: the file its output goes to
    processes: int = 1             # DistributedDataParallel processes: Slurm tasks, or local devices (torchrun)

    def __call__(self) -> dict:
        with _output_to(self.log, self.settings.out):
            try:
                return self._run()
            except UserError as exc:
                if self.log is not None:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                raise
            except BaseException:  # a bug: the driver says its traceback is in the log, so it must be
                if self.log is not None:
                    import traceback

                    traceback.print_exc()
                raise

    def _run(self) -> dict:
        in_slurm = "SLURM_JOB_ID" in os.environ
        if self.processes > 1 and in_slurm:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR...
        st = stage_named(self.settings, self.stage)
        config = Study(self.settings).config(st, self.resume)
        if getattr(config, "wandb", None):  # its W&B run is named by the stage (as if a flag: torchrun's file has it)
            config = replace_given(config, wandb_name=self.stage)
        if self.device:  # as if a flag: the torchrun file writes the given settings only
            config = replace_given(config, device="cpu" if self.device.startswith("cpu") else "cuda")
        if self.processes > 1 and not in_slurm:
            result = torchrun(config, self.device.split(","), self.settings.root)
        elif in_slurm:  # submitit's preemption handler requeues the job by raising SystemExit: it must go through
            result = stage_command(st).run(config)
        else:  # a --model's sys.exit(0) fails the stage, naming it (errors.call_guarded), in this process or a worker
            model = config.model if getattr(config, "model", BUILTIN_MODEL) != BUILTIN_MODEL else None
            result = call_guarded(lambda: stage_command(st).run(config), model, f"the study's stage {self.stage}")
        import socket

        return {"ran": {"host": socket.gethostname(), "pid": os.getpid(),
                        "device": self.device or self.settings.device},
                "result": result if isinstance(result, dict) else None}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit when the job is preempted or reaches its time limit: it is requeued, and a training
        stage resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, resume=True))


def torchrun(config, devices: list[str], root: Path) -> None:
    """`torchrun --nproc_per_node len(devices) -m aecurves train --config FILE`: the stage's config through the
    file round trip every command has, on these devices (GPUs), or on CPUs with gloo. The agent and its training
    processes die with this worker (executors.die_with_this_process)."""
    import socket
    import subprocess

    from aecurves.executors import die_with_this_process

    file = torchrun_file(config, root)
    env = dict(os.environ)
    gpus = [d.removeprefix("cuda:") for d in devices if d.startswith("cuda:")]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(len(devices)), "--master_port",
            str(port), "-m", "aecurves.executors", "aecurves", "train", "--config", str(file)]
    if config.model != BUILTIN_MODEL:
        argv += ["--model", config.model]  # named on the command line: the trust rule
    argv, env = die_with_this_process(argv, env)
    done = subprocess.run(argv, env=env)
    if done.returncode != 0:
        raise UserError(f"the {len(devices)} training processes (torchrun) exited with code {done.returncode}; their "
                        "output, with the traceback of any internal error, is in the stage's log")
    return None


def torchrun_file(config, root: Path) -> Path:
    """ROOT/logs/NAME.toml, holding the settings the stage's config was given (the study's, as if they were flags)
    and nothing else: `train --config` rebuilds from it exactly the config the serial executor runs (a default
    written out would count as given, and `train --init` refuses a given data or model setting that differs from
    its endpoint's). Written atomically, through no link."""
    from aecurves.files import atomic_path, check_no_link

    file = root / "logs" / f"{Path(config.out).name}.toml"
    check_no_link(root, file)
    with atomic_path(file) as tmp:
        tmp.write_text(to_toml({k: getattr(config, k) for k in config.given}))
    return file


@contextlib.contextmanager
def _output_to(log: str | None, root: str):
    """Everything the stage prints (Python's and C's, progress bars too) appended to `log`, when given: a file in
    the study folder `root`, reached and opened through no link (a linked logs/ or log file is refused)."""
    if log is None:
        yield
        return
    from aecurves.files import check_no_link, open_append

    check_no_link(root, log)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    with open_append(log) as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
