"""The study as a graph of stages on its three executors: --plan, the same numbers serially, in local worker
processes and on a real single-node Slurm cluster, and a cluster's faults (a cancelled job, a killed driver), and a
two-task DistributedDataParallel training job against torchrun."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aecurves.commands import study
from aecurves.config import StudyConfig, as_record, make, to_toml
from aecurves.records import EvalRecord

from conftest import run_cli
from slurm_cluster import skip_reason, slurm_cluster

# 2 endpoints, their extra training and FGE, an alignment, a curve to each B, 2 evaluations, a baseline and the
# pair's ensembles: every kind of stage but the plane, on data small enough that the stages cost less than starting
# them
TINY = ["--dataset", "synthetic", "--image-size", 16, "--limit", 128, "--width", 8, "--latent-dim", 8,
        "--batch-size", 32, "--lr", 3e-3, "--epochs", 2, "--curve-epochs", 2, "--curve-lr", 3e-3, "--num-points", 4,
        "--bn-images", 32, "--train-images", 32, "--ensemble", 2, "--losses", "mse", "--seeds", "1,2",
        "--precision", "fp32", "--device", "cpu", "--vgg-weights", "random", "--plane-grid", 0, "--no-progress"]
STAGES = ["endpoint:mse:1", "endpoint:mse:2", "extra:mse:1", "extra:mse:2", "fge:mse:1", "fge:mse:2", "align:mse:1-2",
          "curve:mse:1-2", "aligned-curve:mse:1-2", "eval:mse:1-2", "aligned-eval:mse:1-2", "baseline:mse:1-2",
          "ensembles:mse:1-2", "report"]
SLURM = ["--executor", "slurm", "--slurm-partition", "debug", "--slurm-cpus", 1, "--slurm-time", 10]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numbers(root: Path) -> dict:
    """Every number the evaluations wrote: eval.json's summaries and curve.npz's arrays, by file."""
    found = {}
    for record in sorted(root.rglob("eval.json")):
        rel = str(record.relative_to(root))
        found[rel] = EvalRecord.from_json(json.loads(record.read_text())).flat_summary()
        npz = record.with_name("curve.npz")
        with np.load(npz) as arrays:
            found[rel + ":npz"] = {k: arrays[k] for k in arrays.files}
    return found


def assert_same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 6  # 3 evaluations
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            x, y = np.asarray(a[name][k], dtype=float), np.asarray(b[name][k], dtype=float)
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=f"{name} {k}")


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serial") / "study"
    assert run_cli("study", *TINY, "--out", root) == 0
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


# ----------------------------------------------------------------------------------------------------------
# the graph


def test_dependencies_come_from_the_input_files():
    cfg = study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2,3"}))
    stages = {s.name: s for s in study.plan(cfg, 10, 2)}
    assert stages["endpoint:mse:1"].deps == ()
    assert stages["extra:mse:2"].deps == ("endpoint:mse:2",)
    assert stages["curve:mse:1-3"].deps == ("endpoint:mse:1", "endpoint:mse:3")
    assert stages["aligned-curve:mse:2-3"].deps == ("endpoint:mse:2", "align:mse:2-3")
    assert stages["eval:mse:1-2"].deps == ("curve:mse:1-2",)
    assert stages["baseline:mse:1-3"].deps == ("extra:mse:1", "extra:mse:3")
    assert stages["fge:mse:3"].deps == ("endpoint:mse:3",)
    assert stages["ensembles:mse:2-3"].deps == ("fge:mse:2", "fge:mse:3", "extra:mse:2", "extra:mse:3")
    assert stages["plane:mse:1-2"].deps == ("curve:mse:1-2",)
    assert set(stages["report"].deps) == set(stages) - {"report"}
    order = list(stages)
    assert all(order.index(d) < order.index(name) for name, s in stages.items() for d in s.deps)


@pytest.mark.slow
def test_plan_shows_the_graph_and_changes_nothing(serial, tmp_path, capsys):
    assert run_cli("study", *TINY, "--out", tmp_path / "new", "--plan") == 0
    out = capsys.readouterr().out
    assert "14 stages, 14 to run; with enough workers the study takes the time of its longest chain, 5 stages: " \
        "endpoint:mse:1 -> align:mse:1-2 -> aligned-curve:mse:1-2 -> aligned-eval:mse:1-2 -> report" in out
    assert "curve:mse:1-2" in out and "after: endpoint:mse:1, endpoint:mse:2" in out
    assert not (tmp_path / "new").exists()

    before = sorted((p, p.stat().st_mtime_ns) for p in serial.rglob("*"))
    assert run_cli("study", *TINY, "--out", serial, "--plan", "--force", "endpoint:mse:2") == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.startswith("  ") and ":" in line.split()[0]
                 and not line.strip().startswith("after"))
    assert lines["endpoint:mse:1"].strip() == "done"
    assert lines["endpoint:mse:2"].strip() == "to redo (--force)"
    assert lines["curve:mse:1-2"].strip() == "to redo after endpoint:mse:2"
    assert lines["extra:mse:1"].strip() == "done"
    assert sorted((p, p.stat().st_mtime_ns) for p in serial.rglob("*")) == before


# ----------------------------------------------------------------------------------------------------------
# local


@pytest.mark.slow
def test_local_workers_give_the_serial_numbers(serial, tmp_path, capsys):
    root = tmp_path / "study"
    assert run_cli("study", *TINY, "--out", root, "--executor", "local", "--jobs", 2) == 0
    assert_same_numbers(numbers(serial), numbers(root))
    record = json.loads((root / "curves/mse_seed1-seed2/study_stage.json").read_text())
    assert record["status"] == "done" and record["ran"]["executor"] == "local" and record["ran"]["device"] == "cpu"
    assert record["ran"]["pid"] != os.getpid()
    assert "epoch" in Path(record["ran"]["logs"]["log"]).read_text()  # the stage's output went to its log
    provenance = json.loads((root / "study.json").read_text())["provenance"]
    assert provenance["executor"] == "local" and sorted(provenance["stage_seconds"]) == sorted(STAGES[:-1])
    # a re-run skips every stage, whatever the executor
    capsys.readouterr()
    assert run_cli("study", *TINY, "--out", root) == 0
    assert capsys.readouterr().out.count("finished already, skipped") == len(STAGES) - 1


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing workers among the children of process `pid` (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
def test_a_killed_local_worker_stops_the_study_and_a_rerun_finishes_it(serial, tmp_path):
    """SIGKILL of a worker process in the middle of its stage: the driver names the stage and its log, exits 2,
    and the same command afterwards finishes with the serial numbers."""
    root = tmp_path / "study"
    argv = [sys.executable, "-m", "aecurves", "study", *map(str, TINY), "--executor", "local", "--jobs", "2",
            "--out", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "driver.err", "w+") as err:
        driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("epoch" in p.read_text() for p in (root / "logs").glob("*.log")):
            time.sleep(0.1)  # a stage is training
        workers = _spawned_workers(driver.pid)
        assert workers, "no worker process"
        os.kill(workers[0], signal.SIGKILL)
        assert driver.wait(timeout=300) == 2
        err.seek(0)
        message = err.read()
    assert "its worker process died" in message and "failed" in message and "Traceback" not in message
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_numbers(numbers(serial), numbers(root))


@pytest.mark.parametrize("flags, words", [
    (["--executor", "local", "--jobs", 0], "--jobs must be at least 1"),
    (["--jobs", 2], "--jobs is a setting of --executor local"),
    (["--slurm-partition", "gpu", "--slurm-time", 30], "--slurm-partition, --slurm-time are settings of --executor "
                                                         "slurm"),
    (["--executor", "local", "--devices", "cuda:7"], "--devices names cuda:7, but this machine has"),
    (["--executor", "local", "--devices", "gpu1"], "--devices takes cpu or cuda:N"),
    (["--executor", "slurm", "--slurm-extra", "constraint"], "--slurm-extra takes KEY=VALUE"),
])
def test_bad_executor_settings_are_refused_before_any_work(flags, words, tmp_path, capsys):
    if "cuda:7" in flags and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert run_cli("study", *TINY, "--out", tmp_path / "s", *flags) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not (tmp_path / "s").exists()


def test_slurm_without_sbatch_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    assert run_cli("study", *TINY, "--out", tmp_path / "s", "--executor", "slurm") == 2
    assert "needs Slurm's sbatch on the PATH" in capsys.readouterr().err and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------------------
# Slurm


def _driver(root: Path, *extra) -> subprocess.Popen:
    """`aecurves study` on Slurm in a process of its own; its output goes to files (a pipe nobody reads would fill
    and stop it). Jobs inherit its environment: one thread, as the serial run, and the cluster's SLURM_CONF."""
    argv = [sys.executable, "-m", "aecurves", "study", *map(str, TINY), *map(str, SLURM), "--out", str(root),
            *map(str, extra)]
    root.parent.mkdir(parents=True, exist_ok=True)
    n = len(list(root.parent.glob("driver*.out")))
    out, err = (open(root.parent / f"driver{n}.{kind}", "w+") for kind in ("out", "err"))
    process = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=err, text=True)
    process.logs = (out, err)
    return process


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    process.wait(timeout=timeout)
    texts = []
    for f in process.logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return process.returncode, *texts


def _our_jobs(root: Path) -> list[tuple[str, str]]:
    """(job id, stage) of every job the study's drivers submitted, from submitit's submission scripts."""
    jobs = []
    for script in (root / "slurm").glob("*/*/*_submission.sh"):  # RUN/JOB_ID/JOB_ID_submission.sh
        name = next(line.split("--job-name=")[1] for line in script.read_text().splitlines() if "--job-name=" in line)
        jobs.append((script.parent.name, name.strip().removeprefix("aecurves-")))
    return sorted(jobs)


def _wait_for_running_job(root: Path, timeout: float = 120) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %j"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            job_id, name = line.split()
            if name.startswith("aecurves-") and any((root / "slurm").glob(f"*/{job_id}")):
                return job_id, name.removeprefix("aecurves-")
        time.sleep(0.2)
    raise AssertionError("no stage job started running")


def test_an_unknown_partition_is_refused_before_anything_is_submitted(cluster, tmp_path, capsys):
    assert run_cli("study", *TINY, "--executor", "slurm", "--slurm-partition", "gpu-nope", "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert "--slurm-partition gpu-nope is not a partition of this cluster; its partitions: debug" in err
    assert not (tmp_path / "s").exists() and "aecurves-" not in cluster.squeue()


class _Planted:
    """What a crafted result file would hold: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("a planted pickle ran",))


@pytest.mark.slow
def test_result_files_in_a_study_folder_someone_sent_are_never_unpickled(cluster, tmp_path, monkeypatch):
    """submitit's result files are pickles. A study folder may arrive holding some for the job ids the cluster will
    hand out next; the driver reads results only from a folder it made itself, new and unguessable."""
    import pickle

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, marker = tmp_path / "study", tmp_path / "MARKER"
    for job_id in range(1, 400):  # the flat layout STUDY/slurm/JOB_ID/ and a run folder's, for the next ids
        for folder in (root / "slurm" / str(job_id), root / "slurm" / "run" / str(job_id)):
            folder.mkdir(parents=True)
            (folder / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", _Planted(str(marker)))))
    flags = [*TINY, "--no-align", "--no-extra-training"]
    assert run_cli("study", *flags, *SLURM, "--out", root) == 0
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.slow
def test_a_cancelled_job_stops_the_study_and_a_rerun_finishes_it(cluster, serial, tmp_path):
    root = tmp_path / "study"
    driver = _driver(root)
    job_id, stage = _wait_for_running_job(root)
    subprocess.run(["scancel", job_id], check=True)
    code, _, err = _finish(driver)
    assert code == 2, err
    assert f"stage {stage}" in err and f"Slurm job {job_id}" in err and "log" in err and "Traceback" not in err
    assert json.loads((root / _folder(stage) / "study_stage.json").read_text())["status"] == "failed"
    code, _, err = _finish(_driver(root))
    assert code == 0, err
    assert_same_numbers(numbers(serial), numbers(root))


@pytest.mark.slow
def test_a_killed_driver_follows_its_jobs_again_and_submits_no_stage_twice(cluster, serial, tmp_path):
    root = tmp_path / "study"
    driver = _driver(root)
    _wait_for_running_job(root)
    driver.send_signal(signal.SIGKILL)
    _finish(driver)
    from aecurves.executors import live_jobs

    still_running = live_jobs(root / "slurm")  # the jobs go on without their driver
    assert still_running
    code, out, err = _finish(_driver(root))
    assert code == 0, err
    followed = [s for s in still_running if f"following Slurm job {still_running[s][0]}" in out]
    assert followed, out  # at least the one that was running when the driver died (others may end meanwhile)
    jobs = _our_jobs(root)
    stages = [stage for _, stage in jobs]
    assert sorted(stages) == sorted(set(stages)), "a stage was submitted twice"
    assert sorted(stages) == sorted(STAGES[:-1])  # each stage one job (the report: the driver), none missing
    # the Slurm executor gives the serial numbers (this test stands for the uninterrupted one too: it also
    # checks them, after a driver was killed in the middle)
    assert_same_numbers(numbers(serial), numbers(root))
    last = STAGES[-2]  # the ensembles, last of all: submitted by the second driver
    record = json.loads((root / _folder(last) / "study_stage.json").read_text())
    assert record["ran"]["executor"] == "slurm" and (record["ran"]["job_id"], last) in jobs
    assert Path(record["ran"]["logs"]["stderr"]).is_file()


def _folder(stage: str) -> str:
    cfg = study.resolve(make(StudyConfig, {"losses": "mse", "seeds": "1,2"}))
    return next(s.folder for s in study.plan(cfg, 10, 2) if s.name == stage)


@pytest.mark.slow
def test_a_two_task_ddp_endpoint_on_slurm_equals_torchrun(cluster, tmp_path, monkeypatch):
    """One Slurm job of two tasks (gloo on CPUs) trains the endpoint exactly as torchrun --nproc_per_node 2 does."""
    submission = _ddp_endpoint_equals_torchrun([*SLURM, "--slurm-train-tasks", 2], tmp_path, monkeypatch)
    assert "--ntasks-per-node=2" in submission


@pytest.mark.slow
def test_a_two_process_ddp_endpoint_on_local_workers_equals_torchrun(tmp_path, monkeypatch):
    """--executor local --gpus-per-train 2 holds two devices (here two CPU slots) for one training stage."""
    _ddp_endpoint_equals_torchrun(["--executor", "local", "--devices", "cpu,cpu", "--gpus-per-train", 2], tmp_path,
                                  monkeypatch)


def _ddp_endpoint_equals_torchrun(flags: list, tmp_path: Path, monkeypatch) -> str:
    """Runs endpoint:mse:1 of TINY as a 2-process job on the executor `flags` choose and the same TrainConfig under
    torchrun; asserts equal weights; returns the job's submission script (Slurm) or ''."""
    from aecurves.checkpoint import load_checkpoint
    from aecurves.cli import parse

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, config = parse(["study", *map(str, TINY), *map(str, flags), "--out", str(tmp_path / "study")])
    cfg = study.resolve(config)
    executor = study.make_executor(cfg, tmp_path / "study")
    job = study.StageJob(cfg, "endpoint:mse:1", processes=2)
    assert executor.can_start(job)
    handle = executor.submit("endpoint:mse:1", job)
    outcomes = []
    while not outcomes:
        outcomes = executor.wait(timeout=120)
    executor.close()
    assert outcomes[0].error is None, outcomes[0].error

    train = _endpoint_config(cfg, tmp_path / "torchrun")
    (tmp_path / "train.toml").write_text(to_toml({k: v for k, v in as_record(train).items() if v is not None}))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), "-m", "aecurves", "train", "--config", str(tmp_path / "train.toml")],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    a = load_checkpoint(tmp_path / "study/endpoints/mse_seed1/checkpoint.pt", "endpoint")
    b = load_checkpoint(tmp_path / "torchrun/checkpoint.pt", "endpoint")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    if handle.job_id is None:
        return ""
    return next(Path(handle.logs["stdout"]).parent.glob("*_submission.sh")).read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_preempted_training_job_is_requeued_and_resumes_to_the_uninterrupted_weights(cluster, tmp_path, monkeypatch):
    """USR2 is what Slurm sends before a time limit or a preemption: submitit calls StageJob.checkpoint, the job is
    requeued under the same id, and the endpoint resumes from its last checkpoint to the weights of a run that
    was never stopped."""
    from aecurves.checkpoint import load_checkpoint
    from aecurves.cli import parse

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    long = [*map(str, TINY), "--epochs", "30", "--save-every-epoch", "2"]
    _, config = parse(["study", *long, *map(str, SLURM), "--out", str(tmp_path / "study")])
    cfg = study.resolve(config)
    executor = study.make_executor(cfg, tmp_path / "study")
    handle = executor.submit("endpoint:mse:1", study.StageJob(cfg, "endpoint:mse:1"))
    checkpoint = tmp_path / "study/endpoints/mse_seed1/checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.exists(), "the job wrote no checkpoint"
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True)
    _start_now_once_requeued(handle.job_id)
    outcomes = []
    while not outcomes:
        outcomes = executor.wait(timeout=180)
    assert outcomes[0].error is None, outcomes[0].error
    log = Path(handle.logs["stdout"]).read_text()
    assert "resuming from" in log, log[-2000:]  # the requeued job went on from the checkpoint

    _, uninterrupted = parse(["study", *long, "--out", str(tmp_path / "serial")])
    assert run_cli("train", "--config", _toml(_endpoint_config(study.resolve(uninterrupted),
                                                               tmp_path / "plain"), tmp_path)) == 0
    a = load_checkpoint(checkpoint, "endpoint")
    b = load_checkpoint(tmp_path / "plain/checkpoint.pt", "endpoint")
    assert a["epoch"] == b["epoch"] == 30
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def _endpoint_config(cfg: dict, out: Path):
    """The config of the study's stage endpoint:mse:1, writing into `out` instead."""
    st = next(s for s in study.plan(cfg, 0, 0) if s.name == "endpoint:mse:1")
    return dataclasses.replace(study.Study(cfg).config(st), out=str(out))


def _toml(config, folder: Path) -> Path:
    file = folder / "train.toml"
    file.write_text(to_toml({k: v for k, v in as_record(config).items() if v is not None}))
    return file


def _start_now_once_requeued(job_id: str, timeout: float = 60) -> None:
    """Slurm holds a requeued job for two minutes (EligibleTime); the test lets it start at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        if "JobState=PENDING" in shown and "Reason=BeginTime" in shown:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was not requeued")
