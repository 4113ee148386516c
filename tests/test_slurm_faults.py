"""The Slurm executor against a real single-node cluster (tests/slurm_cluster.py): it reads a result pickle only
from a run folder that is really its own (issue 27, N1), and it fails loudly where it used to crash or wait: an
sbatch refusal (N14), a job pending for a reason that never clears (N18), a result that cannot be read once its job
has ended (N19). Each fault is a tiny study that fails before any training, or a tiny job driven through
SlurmExecutor directly."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_executors import SLURM, TINY

from aecurves import executors
from aecurves.errors import UserError
from aecurves.executors import SlurmExecutor, SlurmSettings, job_states, never_clears

from conftest import run_cli
from slurm_cluster import skip_reason, slurm_cluster

QUICK = [*TINY, "--no-align", "--no-extra-training", "--no-fge"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def quick_grace(monkeypatch):
    monkeypatch.setattr(executors, "RESULT_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(executors, "POLL_SECONDS", 0.2)


class _Planted:
    """What a crafted result file would hold: unpickling it runs code (writes the marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("a planted pickle ran",))


def _plant(file: Path, marker: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(pickle.dumps(("success", _Planted(str(marker)))))


@dataclasses.dataclass
class _Job:
    """A tiny stage job: sleeps, or leaves a damaged result file and dies (FAILED) before submitit writes one."""

    seconds: float = 0
    damage: bool = False
    started: str | None = None  # a file it writes once it runs (it has read its own pickle by then)
    processes: int = 1

    def __call__(self) -> dict:
        if self.started:
            Path(self.started).write_text("running")
        if self.damage:
            import submitit

            submitit.JobEnvironment().paths.result_pickle.write_bytes(b"not a pickle")
            os._exit(3)
        time.sleep(self.seconds)
        return {"ran": {}}


def _submit(executor: SlurmExecutor, stage: str, job: _Job):
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the job cannot import this test module
    try:
        return executor.submit(stage, job)
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _executor(root: Path, *extra: str) -> SlurmExecutor:
    settings = SlurmSettings(partition="debug", time=10, gpus=0, train_tasks=None, cpus=1, mem=None, account=None,
                             qos=None, setup=(), extra=tuple(extra), max_jobs=4)
    return SlurmExecutor(root / "slurm", settings)


def _wait_for(executor: SlurmExecutor, timeout: float = 90) -> list:
    deadline = time.monotonic() + timeout
    outcomes = []
    while not outcomes and time.monotonic() < deadline:
        outcomes = executor.wait(timeout=2)
    assert outcomes, f"no outcome within {timeout:.0f} s: the driver waits for ever"
    return outcomes


def _wait_until(handle, states: set, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_states([handle.job_id]).get(handle.job_id) in states:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {handle.job_id} never reached {states}")


def _record(root: Path, folder: str = "endpoints/mse_seed1") -> dict:
    return json.loads((root / folder / "study_stage.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# N1: the driver unpickles results only from a run folder that is its own


@pytest.mark.parametrize("spelling", ["absolute link", "relative link", "dangling link", "a file"])
def test_a_slurm_folder_that_is_a_link_is_refused_before_anything_is_submitted(spelling, cluster, tmp_path, capsys):
    """STUDY/slurm/ linked to a folder another user can write, holding result pickles for the next job ids (as a
    run folder's and as a job folder's): exit 2 naming it, before any work, and nothing is unpickled."""
    root, elsewhere, marker = tmp_path / "study", tmp_path / "shared", tmp_path / "MARKER"
    for job_id in range(1, 40):
        for folder in (elsewhere / str(job_id), elsewhere / "run" / str(job_id)):
            _plant(folder / f"{job_id}_0_result.pkl", marker)
    root.mkdir()
    slurm = root / "slurm"
    if spelling == "a file":
        slurm.write_text("not a folder")
    else:
        target = {"absolute link": elsewhere, "relative link": Path("../shared"),
                  "dangling link": tmp_path / "nothing"}[spelling]
        slurm.symlink_to(target)
    assert run_cli("study", *QUICK, *SLURM, "--out", root) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing was" in err.lower()
    if spelling == "a file":
        assert f"The Slurm folder {slurm} is not a folder" in err
        with pytest.raises(UserError, match="is not a folder"):
            _executor(root)
    else:
        assert f"{slurm} -> {os.readlink(slurm)}" in err or f"{slurm} is a symbolic link" in err
        with pytest.raises(UserError, match="is a symbolic link"):  # the executor's own check, after any earlier one
            _executor(root)
    assert not marker.exists() and "aecurves-" not in cluster.squeue()
    assert not (root / "endpoints").exists()


@pytest.mark.parametrize("change, words", [
    (lambda p: os.chown(p, 65534, 65534), "owned by user id 65534, not by you"),
    (lambda p: os.chmod(p, 0o777), "writable by its group or others (drwxrwxrwx)"),
    (lambda p: os.chmod(p, 0o770), "writable by its group or others (drwxrwx---)"),
])
def test_a_slurm_folder_someone_else_can_write_is_refused(change, words, cluster, tmp_path, capsys):
    root = tmp_path / "study"
    (root / "slurm").mkdir(parents=True)
    change(root / "slurm")
    assert run_cli("study", *QUICK, *SLURM, "--out", root) == 2
    err = capsys.readouterr().err
    assert f"The Slurm folder {root / 'slurm'} is {words}" in err and "chmod go-w" in err and "Traceback" not in err
    assert os.listdir(root / "slurm") == [] and "aecurves-" not in cluster.squeue()


def test_a_study_folder_writable_by_everyone_is_refused_unless_sticky(cluster, tmp_path, capsys):
    root = tmp_path / "study"
    root.mkdir()
    os.chmod(root, 0o777)
    assert run_cli("study", *QUICK, *SLURM, "--out", root, "--plan") == 2
    err = capsys.readouterr().err
    assert f"The study folder {root} is writable by every user (drwxrwxrwx)" in err and f"chmod o-w {root}" in err
    with pytest.raises(UserError, match="writable by every user"):
        _executor(root)
    assert not (root / "slurm").exists()
    os.chmod(root, 0o1777)  # as /tmp: nobody else can rename or remove what is in it
    assert run_cli("study", *QUICK, *SLURM, "--out", root, "--plan") == 0
    executor = _executor(root)
    executor.close()
    run = executor.run_folder
    assert (root / "slurm").stat().st_mode & 0o777 == 0o700 and run.stat().st_mode & 0o777 == 0o700


def test_a_result_is_read_through_the_run_folder_the_driver_made(cluster, tmp_path):
    executor = _executor(tmp_path / "study")
    handle = _submit(executor, "quick", _Job(0))
    (outcome,) = _wait_for(executor)
    executor.close()
    assert outcome.error is None and outcome.result == {"ran": {}} and outcome.handle is handle
    run = executor.run_folder
    assert run.parent == tmp_path / "study" / "slurm" and run.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "study" / "slurm").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("swap", ["a link", "another folder"])
def test_a_run_folder_swapped_while_its_job_runs_is_never_read(swap, cluster, tmp_path, quick_grace):
    """Someone renames the driver's run folder away while a job runs and puts a link, or a folder of their own,
    with a result pickle for that job in its place: the driver reads through the folder it made (its fd), finds
    no result there, and fails the stage; the planted pickle never runs."""
    root, marker = tmp_path / "study", tmp_path / "MARKER"
    executor = _executor(root)
    handle = _submit(executor, "sleep", _Job(3, started=str(tmp_path / "started")))
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run = executor.run_folder
    run.rename(run.with_name(run.name + "-moved"))
    if swap == "a link":
        planted = tmp_path / "planted"
        run.symlink_to(planted)
    else:
        planted = run
    _plant(planted / handle.job_id / f"{handle.job_id}_0_result.pkl", marker)
    (outcome,) = _wait_for(executor)
    executor.close()
    assert not marker.exists()
    assert outcome.result is None and f"Slurm job {handle.job_id} ended as COMPLETED without a result" in outcome.error


@pytest.mark.parametrize("plant", ["a linked file", "a linked job folder", "a file of another user",
                                   "a file others can write", "a FIFO"])
def test_a_planted_result_file_is_never_read_and_fails_its_stage_at_once(plant, cluster, tmp_path, quick_grace):
    root, marker, elsewhere = tmp_path / "study", tmp_path / "MARKER", tmp_path / "elsewhere"
    executor = _executor(root)
    handle = _submit(executor, "sleep", _Job(60))
    job, name = executor.run_folder / handle.job_id, f"{handle.job_id}_0_result.pkl"
    if plant == "a linked file":
        _plant(elsewhere / name, marker)
        (job / name).symlink_to(elsewhere / name)
    elif plant == "a linked job folder":
        _plant(elsewhere / name, marker)
        for p in job.iterdir():
            p.unlink()
        job.rmdir()
        job.symlink_to(elsewhere)
    elif plant == "a FIFO":
        os.mkfifo(job / name)
    else:
        _plant(job / name, marker)
        os.chown(job / name, 65534, 65534) if plant == "a file of another user" else os.chmod(job / name, 0o666)
    t0 = time.monotonic()
    (outcome,) = _wait_for(executor)
    executor.close()
    assert time.monotonic() - t0 < 15  # at once, not when the job ends
    assert not marker.exists()
    why = {"a linked file": f"its result file {job / name} is a symbolic link",
           "a linked job folder": f"its result folder {job} is a symbolic link",
           "a file of another user": f"its result file {job / name} is owned by user id 65534",
           "a file others can write": f"its result file {job / name} is writable by others (-rw-rw-rw-)",
           "a FIFO": f"its result file {job / name} is not a regular file"}[plant]
    assert outcome.error.startswith(why), outcome.error
    assert "so it was not read" in outcome.error and handle.job_id in outcome.error
    _wait_until(handle, {"CANCELLED", "COMPLETING"})  # the job whose result cannot be trusted is cancelled



# ----------------------------------------------------------------------------------------------------------
# N14: an sbatch refusal fails the stage with sbatch's reason; N18: a job that can never start is not waited on


@pytest.mark.parametrize("flags, sbatch_says", [
    (["--slurm-extra", "bogusopt=1"], "sbatch: unrecognized option '--bogusopt=1'"),
    (["--slurm-gpus", "1"], "sbatch: error: Invalid generic resource (gres) specification"),  # a cluster without GPUs
])
def test_an_sbatch_refusal_fails_the_stage_quoting_sbatch(flags, sbatch_says, cluster, tmp_path, capsys):
    root = tmp_path / "study"
    assert run_cli("study", *QUICK, *SLURM, *flags, "--out", root) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "submitit" not in err
    assert "stage endpoint:mse:1 (" in err and f"failed: sbatch refused its job: {sbatch_says}" in err
    assert "Try \"sbatch --help\"" not in err and "re-run the same command" in err
    record = _record(root)
    assert record["status"] == "failed" and sbatch_says in record["error"]
    assert not list((root / "slurm").glob("*/*.pkl")), "the refused job's pickle is left behind"


@pytest.mark.parametrize("mem", ["lots", "1.5G", "-1", "32 G"])
def test_a_memory_request_sbatch_cannot_read_is_refused_before_any_work(mem, tmp_path, capsys):
    assert run_cli("study", *QUICK, "--executor", "slurm", "--slurm-mem", mem, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert "--slurm-mem takes a size as sbatch --mem does" in err and repr(mem) in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_sbatch_memory_sizes_are_accepted():
    assert all(executors.SBATCH_MEM.fullmatch(m) for m in ["32G", "32g", "500", "500M", "100MB", "1T", "0", "64k"])


def test_a_job_that_can_never_start_is_cancelled_and_fails_its_stage(cluster, tmp_path):
    """--slurm-cpus 64 on this 2-CPU cluster: the job pends with reason PartitionConfig for ever. The driver runs in
    a process of its own, so that waiting for ever fails this test instead of hanging it."""
    root = tmp_path / "study"
    flags = ["--executor", "slurm", "--slurm-partition", "debug", "--slurm-cpus", "64", "--slurm-time", "10"]
    done = subprocess.run([sys.executable, "-m", "aecurves", "study", *map(str, QUICK), *flags, "--out", str(root)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = done.stdout, done.stderr
    assert done.returncode == 2, err
    job_id = _record(root)["job_id"]
    assert f"    endpoint:mse:1: Slurm job {job_id} pending (PartitionConfig)" in out
    assert out.count(f"Slurm job {job_id} pending (PartitionConfig)") == 1  # printed when it changes, not each poll
    assert "stage endpoint:mse:1 (" in err and f"Slurm job {job_id} can never start" in err
    assert "reason PartitionConfig" in err and "64 CPU(s) in partition debug" in err and "--slurm-cpus" in err
    assert "Traceback" not in err and _record(root)["status"] == "failed"
    assert job_states([job_id]).get(job_id) in ("CANCELLED", None)


def test_a_pending_reason_that_clears_is_printed_once_and_waited_on(cluster, tmp_path, capsys, quick_grace):
    executor = _executor(tmp_path / "study", "begin=now+600")  # pends with reason BeginTime for ten minutes
    handle = _submit(executor, "later", _Job(0))
    assert executor.wait(timeout=3) == [] and executor.wait(timeout=2) == []
    out = capsys.readouterr().out
    assert out.count(f"    later: Slurm job {handle.job_id} pending (BeginTime)") == 1
    subprocess.run(["scancel", handle.job_id], check=True)
    (outcome,) = _wait_for(executor)
    executor.close()
    assert f"Slurm job {handle.job_id} ended as CANCELLED without a result" in outcome.error


@pytest.mark.parametrize("reason, never", [
    ("PartitionConfig", True), ("BadConstraints", True), ("InvalidAccount", True), ("InvalidQOS", True),
    ("PartitionTimeLimit", True), ("QOSMaxCpuPerJobLimit", True), ("AssocMaxWallDurationPerJobLimit", True),
    ("QOSMaxMemoryPerNode", True), ("QOSMinGRES", True), ("DependencyNeverSatisfied", True),
    ("Resources", False), ("Priority", False), ("Dependency", False), ("BeginTime", False),
    ("ReqNodeNotAvail", False), ("QOSMaxJobsPerUserLimit", False), ("AssocGrpCpuLimit", False),
    ("QOSMaxCpuPerUserLimit", False), ("JobHeldUser", False),
])
def test_which_pending_reasons_never_clear(reason, never):
    assert never_clears(reason) is never


# ----------------------------------------------------------------------------------------------------------
# N19: a result that cannot be read once its job has ended fails the stage


def test_an_unreadable_result_after_its_job_failed_fails_the_stage(cluster, tmp_path, quick_grace):
    executor = _executor(tmp_path / "study")
    handle = _submit(executor, "damaged", _Job(damage=True))
    (outcome,) = _wait_for(executor)
    executor.close()
    file = executor.run_folder / handle.job_id / f"{handle.job_id}_0_result.pkl"
    assert file.read_bytes() == b"not a pickle"
    assert outcome.error.startswith(f"its result file {file} cannot be read (UnpicklingError")
    assert f"Slurm job {handle.job_id} has ended (FAILED)" in outcome.error and handle.logs["stderr"] in outcome.error


# ----------------------------------------------------------------------------------------------------------
# the driver: a stage that could not be started is recorded as failed


def test_a_stage_the_executor_cannot_start_is_recorded_as_failed(tmp_path, monkeypatch, capsys):
    from aecurves.commands import study

    class Refusing(executors.SerialExecutor):
        def submit(self, stage, job):
            raise UserError(f"no room for {stage}")

    monkeypatch.setattr(study, "make_executor", lambda cfg, root: Refusing())
    root = tmp_path / "study"
    assert run_cli("study", *QUICK, "--out", root) == 2
    err = capsys.readouterr().err
    assert "stage endpoint:mse:1 (" in err and "failed: no room for endpoint:mse:1" in err and "Traceback" not in err
    record = _record(root)
    assert record["status"] == "failed" and record["error"] == "no room for endpoint:mse:1"
