"""Tests for aecurves.files: atomic writes and one writer per output folder."""

import os

import pytest

from aecurves import files
from aecurves.errors import UserError
from aecurves.files import LOCK_NAME, atomic_path, folder_lock, write_all

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


def test_write_all_renames_every_file_in_order_or_none(tmp_path, monkeypatch):
    for name in ("a.npz", "b.png", "c.json"):
        (tmp_path / name).write_text("old")

    def boom(path):
        path.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # the second of three fails: the first is not renamed either
        write_all({tmp_path / "a.npz": lambda p: p.write_text("new"), tmp_path / "b.png": boom,
                   tmp_path / "c.json": lambda p: p.write_text("new")})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == dict.fromkeys(("a.npz", "b.png", "c.json"), "old")
    renamed = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)), real(src, dst)))
    write_all({tmp_path / name: lambda p, name=name: p.write_text(name) for name in ("a.npz", "b.png", "c.json")})
    assert renamed == ["a.npz", "b.png", "c.json"]  # the record readers look for, last
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: n for n in ("a.npz", "b.png", "c.json")}


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


@pytest.mark.parametrize("kind", ["symlink", "hard link", "folder", "fifo"])
def test_a_lock_that_is_not_our_own_plain_file_is_refused_and_nothing_is_written(kind, tmp_path, capsys):
    """A lock opened through a link would truncate, then overwrite, the file it points to."""
    victim = tmp_path / "precious.txt"
    victim.write_text("results of a week")
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    words = {"symlink": "a symbolic link", "hard link": "a hard link", "folder": "a folder",
             "fifo": "not a regular file"}[kind]
    with pytest.raises(UserError, match=words):
        with folder_lock(out, "run"):
            pass
    assert victim.read_text() == "results of a week"
    assert run_cli("train", *TINY, "--epochs", 1, "--out", out) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert victim.read_text() == "results of a week" and not (out / "checkpoint.pt").exists()


def test_atomic_path_names_the_file_when_a_writer_does_not(tmp_path):
    """np.savez or a plotting library writing to a file object raise OSError without a file name (a full disk);
    the CLI's message must still say where."""
    import errno

    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "curve.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "curve.npz")
    assert list(tmp_path.iterdir()) == []


def test_write_json_writes_standard_json_for_non_finite_numbers(tmp_path):
    import json
    import math

    from aecurves.files import write_json

    write_json(tmp_path / "a.json", {"loss": math.nan, "series": [1.0, math.inf, -math.inf], "n": (2, 3), "ok": 0.5})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    back = json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse)
    assert back == {"loss": None, "series": [1.0, None, None], "n": [2, 3], "ok": 0.5}
