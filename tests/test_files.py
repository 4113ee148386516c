"""Tests for aecurves.files: atomic writes and one writer per output folder."""

import os

import pytest

from aecurves.errors import UserError
from aecurves.files import LOCK_NAME, atomic_path, folder_lock

from conftest import TINY, run_cli


def test_atomic_path_keeps_the_old_file_on_failure_and_respects_the_umask(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    with folder_lock(tmp_path, "study"):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):
            with folder_lock(tmp_path, "study"):
                pass
        # a command writing into the folder meanwhile is refused, and writes nothing
        assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 2
        assert "Another aecurves process" in capsys.readouterr().err
        assert not (tmp_path / "checkpoint.pt").exists()
        assert run_cli("study", "--dataset", "synthetic", "--limit", 64, "--losses", "mse", "--seeds", "1,2",
                       "--no-progress", "--out", tmp_path) == 2  # a second study into the same folder
        assert "Another aecurves process" in capsys.readouterr().err
        assert not (tmp_path / "study.json").exists() and not (tmp_path / "endpoints").exists()
    with folder_lock(tmp_path, "study"):  # released: the next writer gets it (as after a killed holder)
        pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import sys, time\nfrom aecurves.files import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with folder_lock(tmp_path):  # the OS released the dead holder's lock
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
