"""The local executor fails loudly and leaves no orphans (issue 27): no write of a stage's log or torchrun file follows
a link, --gpus-per-train runs the study's defaults to the end, a stage's internal error is exit 2 with its traceback
in the stage's log, and no worker, torchrun agent or training process outlives a killed driver."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_executors import TINY, assert_same_numbers, numbers

from aecurves.cli import parse
from aecurves.commands import study
from aecurves.commands.study.driver import _output_to
from aecurves.config import as_record, replace_given
from aecurves.errors import UserError
from aecurves.executors import LocalExecutor

from conftest import run_cli

DDP = ["--executor", "local", "--devices", "cpu,cpu", "--gpus-per-train", "2"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    """The serial study, on one thread as the local workers' runs (OMP_NUM_THREADS=1): the same numbers exactly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("serial") / "study"
        assert run_cli("study", *TINY, "--out", root) == 0
    finally:
        torch.set_num_threads(before)
    return root


def _study(root: Path, *flags) -> tuple[dict, study.Study]:
    _, config = parse(["study", *map(str, TINY), *map(str, flags), "--out", str(root)])
    cfg = study.resolve(config)
    s = study.Study(cfg)
    s.stages = study.plan(cfg, 0, 0)
    return cfg, s


def _stage_config(s: study.Study, name: str):
    """The config a local worker on CPUs gives the stage `name` (StageJob sets its device so)."""
    return replace_given(s.config(next(st for st in s.stages if st.name == name)), device="cpu")


# ----------------------------------------------------------------------------------------------------------
# N15: the torchrun file holds what the stage was given, and nothing else


@pytest.mark.parametrize("stage", ["endpoint:mse:1", "extra:mse:1"])
def test_the_torchrun_file_rebuilds_exactly_the_stage_config(stage, tmp_path):
    """`train --config FILE` from the file the local executor hands torchrun gives the config the serial executor
    runs, the same values and the same settings counted as given: an extra stage's file once held the defaults
    of data and model (dataset lfw, latent 128, width 32) as if given, and `train --init` refused them."""
    _, s = _study(tmp_path / "study", *DDP)
    config = _stage_config(s, stage)
    file = study.torchrun_file(config, tmp_path / "study")
    assert file == tmp_path / "study" / "logs" / f"{Path(config.out).name}.toml"
    _, back = parse(["train", "--config", str(file)])
    assert as_record(back) == as_record(config)
    assert set(back.given) == set(config.given)
    if stage.startswith("extra"):
        text = file.read_text()
        assert "dataset" not in text and "latent_dim" not in text and "width" not in text and "init = " in text


# ----------------------------------------------------------------------------------------------------------
# N3: no write of a log or a torchrun file follows a link


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    return outside


def _unchanged(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "precious\n"


@pytest.mark.parametrize("spelling", ["linked logs folder", "dangling logs link", "linked file", "hard link",
                                      "dotdot", "linked study subfolder"])
def test_a_stage_log_is_never_written_through_a_link(spelling, tmp_path):
    root = tmp_path / "study"
    (root / "logs").mkdir(parents=True)
    outside = _outside(tmp_path)
    log = root / "logs" / "endpoint_mse_1.log"
    if spelling == "linked logs folder":
        (root / "logs").rmdir()
        (root / "logs").symlink_to(outside)
    elif spelling == "dangling logs link":
        (root / "logs").rmdir()
        (root / "logs").symlink_to(outside / "made-by-aecurves")
    elif spelling == "linked file":
        log.symlink_to(outside / "victim.txt")
    elif spelling == "hard link":
        os.link(outside / "victim.txt", log)
    elif spelling == "dotdot":
        log = root / "logs" / ".." / ".." / "elsewhere" / "victim.txt"
    else:  # a stage folder that is a link, the log written below it
        (root / "endpoints").symlink_to(outside)
        log = root / "endpoints" / "x.log"
    ran = []
    with pytest.raises(UserError) as refused:
        with _output_to(str(log), str(root)):
            ran.append(True)
    assert not ran  # the stage does not start
    words = {"linked logs folder": f"{root / 'logs'} is a symbolic link",
             "dangling logs link": f"{root / 'logs'} is a symbolic link",
             "linked file": f"{log} is a symbolic link", "hard link": f"{log} is a hard link to another file",
             "dotdot": f"{outside / 'victim.txt'} is outside the folder {root}",
             "linked study subfolder": f"{root / 'endpoints'} is a symbolic link"}[spelling]
    assert words in str(refused.value)
    _unchanged(outside)


@pytest.mark.parametrize("spelling", ["linked logs folder", "linked file", "dangling file link"])
def test_the_torchrun_file_is_never_written_through_a_link(spelling, tmp_path):
    root = tmp_path / "study"
    _, s = _study(root, *DDP)
    config = _stage_config(s, "extra:mse:1")
    outside = _outside(tmp_path)
    (root / "logs").mkdir(parents=True)
    file = root / "logs" / "mse_seed1_extra.toml"
    if spelling == "linked logs folder":
        (root / "logs").rmdir()
        (root / "logs").symlink_to(outside)
    elif spelling == "linked file":
        file.symlink_to(outside / "victim.txt")
    else:
        file.symlink_to(outside / "new.toml")
    with pytest.raises(UserError, match="is a symbolic link"):
        study.torchrun_file(config, root)
    _unchanged(outside)


def test_a_hard_linked_torchrun_file_is_replaced_not_written_through(tmp_path):
    root = tmp_path / "study"
    _, s = _study(root, *DDP)
    config = _stage_config(s, "extra:mse:1")
    outside = _outside(tmp_path)
    (root / "logs").mkdir(parents=True)
    os.link(outside / "victim.txt", root / "logs" / "mse_seed1_extra.toml")
    file = study.torchrun_file(config, root)
    _unchanged(outside)
    assert "init = " in file.read_text() and file.stat().st_nlink == 1


def test_a_linked_logs_folder_fails_the_stage_by_name_before_a_worker_starts(tmp_path):
    """The executor checks the log's path when it submits (the worker checks again when it opens it): the stage's
    outcome is a failure naming the link; no worker process is started for it."""
    root = tmp_path / "study"
    cfg, _ = _study(root, "--executor", "local", "--devices", "cpu")
    outside = _outside(tmp_path)
    root.mkdir(parents=True)
    (root / "logs").symlink_to(outside)
    executor = LocalExecutor(1, ["cpu"], root / "logs")
    handle = executor.submit("endpoint:mse:1", study.StageJob(cfg, "endpoint:mse:1"))
    [outcome] = executor.wait(timeout=1)
    assert executor.free == [0] and not executor.workers[0][1]._processes  # its slot is free again; no process ran
    executor.close()
    assert outcome.handle is handle and outcome.result is None
    assert f"{root / 'logs'} is a symbolic link (to {outside})" in outcome.error
    _unchanged(outside)


# ----------------------------------------------------------------------------------------------------------
# N25: a stage's internal error: exit 2, the stage named, its traceback in its log

BUGGY_MODEL = '''
import torch
from torch import nn


class Buggy(nn.Module):
    def __init__(self, channels, image_size, latent_dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if x.shape[0] != 2:  # the shape probe passes; training does not
            raise RuntimeError("a bug in the forward of the model under test")
        return x * self.scale


def buggy(channels, image_size, latent_dim):
    return Buggy(channels, image_size, latent_dim)
'''


def test_an_internal_error_in_a_local_stage_is_exit_2_with_its_traceback_in_the_stage_log(tmp_path, capsys):
    (tmp_path / "buggy_model.py").write_text(BUGGY_MODEL)
    root = tmp_path / "study"
    model = f"{tmp_path / 'buggy_model.py'}:buggy"
    i = TINY.index("--width")
    assert run_cli("study", *TINY[:i], *TINY[i + 2:], "--model", model, "--no-fge", "--no-align", "--no-extra-training",
                   "--executor", "local", "--jobs", 1, "--out", root) == 2
    err = capsys.readouterr().err
    log = root / "logs" / "endpoint_mse_1.log"
    assert (f"stage endpoint:mse:1 (train mse seed 1) failed: an internal error, RuntimeError: a bug in the forward "
            f"of the model under test; its traceback is in its log {log}") in err
    assert "Traceback" not in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in forward" in text
    assert "RuntimeError: a bug in the forward of the model under test" in text
    record = json.loads((root / "endpoints/mse_seed1/study_stage.json").read_text())
    assert record["status"] == "failed" and "RuntimeError" in record["error"]


# ----------------------------------------------------------------------------------------------------------
# N20 (and N15 end to end): no process outlives a killed driver


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a child belongs to the thread that started it)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it ended meanwhile
            pass
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None once it has ended (a zombie has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _tree(pid: int) -> dict[int, tuple[str, bytes]]:
    """{pid: (start time, command line)} of every descendant of `pid`."""
    tree, todo = {}, _children(pid)
    while todo:
        p = todo.pop()
        start = _start_time(p)
        if start is not None:
            try:
                tree[p] = (start, Path(f"/proc/{p}/cmdline").read_bytes())
            except OSError:
                continue
            todo += _children(p)
    return tree


def _kill_driver_when(argv: list[str], tmp_path: Path, ready) -> dict:
    """Starts the study `argv`, waits until its process tree satisfies `ready(tree)`, SIGKILLs the driver alone and
    returns that tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline, tree = time.monotonic() + 180, {}
            while time.monotonic() < deadline and driver.poll() is None and not ready(tree):
                time.sleep(0.02)
                tree = _tree(driver.pid)
            assert ready(tree), (tmp_path / "driver.out").read_text()[-3000:]
        finally:
            driver.kill()
            driver.wait()
    return tree


def _mentioning(root: Path) -> dict[int, tuple[str, bytes]]:
    """Every process whose command line names a path in `root` (a torchrun file, say), wherever it is in the
    process tree: one that a snapshot of the tree missed is found so too."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or it ended meanwhile
            continue
        start = _start_time(int(proc.name)) if proc.name.isdigit() else None
        if start is not None and str(root).encode() in cmdline:
            found[int(proc.name)] = (start, cmdline)
    return found


def _assert_all_end(tree: dict, root: Path, seconds: float = 10.0) -> None:
    """Every process of `tree`, and every process naming the study folder `root`, ends within `seconds`."""
    deadline = time.monotonic() + seconds
    alive = {**tree, **_mentioning(root)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {p: v for p, v in {**alive, **_mentioning(root)}.items() if _start_time(p) == v[0]}
    for p in alive:  # not to leave them running after a failure
        os.kill(p, signal.SIGKILL)
    commands = [v[1].replace(b"\0", b" ")[:120] for v in alive.values()]
    assert not alive, f"outlived their driver: {commands}"


def _is_worker(cmdline: bytes) -> bool:
    return b"spawn_main" in cmdline


@pytest.mark.slow
def test_a_killed_local_driver_leaves_no_process_and_a_rerun_finishes_with_the_serial_numbers(serial, tmp_path):
    """SIGKILL of the driver while its two workers run stages: the workers and multiprocessing's resource tracker
    end within seconds (they once ran on for 30 minutes, one of them finishing a stage the re-run was running),
    and the same command afterwards finishes with the serial numbers."""
    root = tmp_path / "study"
    argv = [sys.executable, "-m", "aecurves", "study", *map(str, TINY), "--executor", "local", "--jobs", "2",
            "--out", str(root)]

    def ready(tree):
        logs = list((root / "logs").glob("*.log")) if (root / "logs").is_dir() else []
        return sum(map(_is_worker, (c for _, c in tree.values()))) == 2 and any("epoch" in p.read_text() for p in logs)

    tree = _kill_driver_when(argv, tmp_path, ready)
    assert any(b"resource_tracker" in c for _, c in tree.values())
    _assert_all_end(tree, root)
    done = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_numbers(numbers(serial), numbers(root))


@pytest.mark.slow
def test_gpus_per_train_runs_the_default_study_and_a_killed_driver_leaves_no_torchrun_process(tmp_path):
    """--executor local --gpus-per-train 2 (two gloo processes on CPUs) with the study's defaults, extra training on:
    killed while torchrun trains an endpoint, no worker, agent or training process remains; the re-run finishes
    every stage (extra training included) and writes the report."""
    root = tmp_path / "study"
    argv = [sys.executable, "-m", "aecurves", "study", *map(str, TINY), *DDP, "--epochs", "20", "--out", str(root)]

    def ready(tree):  # torchrun's two training processes run, and one has begun its epochs
        trainers = sum(b"-u\0-m\0aecurves.executors\0aecurves\0train" in c for _, c in tree.values())
        return trainers == 2 and any("epoch" in log.read_text() for log in root.glob("logs/endpoint_*.log"))

    tree = _kill_driver_when(argv, tmp_path, ready)
    assert any(map(_is_worker, (c for _, c in tree.values())))  # one: the stage holds the other slot's device
    assert any(b"torch.distributed.run" in c for _, c in tree.values())
    _assert_all_end(tree, root)

    done = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "report.html").is_file() and (root / "report.json").is_file()
    for folder in ("endpoints/mse_seed1", "endpoints/mse_seed2", "endpoints/mse_seed1_extra",
                   "endpoints/mse_seed2_extra"):
        record = json.loads((root / folder / "study_stage.json").read_text())
        assert record["status"] == "done" and record["ran"]["device"] == "cpu,cpu", folder
    found = numbers(root)
    assert len(found) == 6
    for name, values in found.items():
        for k, v in values.items():
            if v is not None and not isinstance(v, str):
                assert np.isfinite(np.asarray(v, dtype=float)).all(), (name, k, v)
