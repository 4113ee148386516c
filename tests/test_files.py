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


def test_an_exclusive_write_never_replaces_a_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.pt"
    target.write_text("theirs")
    with pytest.raises(FileExistsError):
        with atomic_path(target, exclusive=True) as tmp:
            tmp.write_text("mine")
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out.pt"]
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "link.pt").symlink_to(outside)  # a dangling or live link at the name counts as taken too
    with pytest.raises(FileExistsError):
        with atomic_path(tmp_path / "link.pt", exclusive=True) as tmp:
            tmp.write_text("mine")
    assert outside.read_text() == "keep"
    with atomic_path(tmp_path / "new.pt", exclusive=True) as tmp:
        tmp.write_text("mine")
    assert (tmp_path / "new.pt").read_text() == "mine" and (tmp_path / "new.pt").stat().st_nlink == 1


@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink", "folder"])
def test_an_append_follows_no_link_and_changes_nothing_outside(kind, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    log = tmp_path / "logs" / "stage.log"
    log.parent.mkdir()
    if kind == "symlink":
        log.symlink_to(outside)
    elif kind == "dangling":
        log.symlink_to(tmp_path / "would-be-created.txt")
    elif kind == "hardlink":
        os.link(outside, log)
    else:
        log.mkdir()
    with pytest.raises(UserError, match="not the plain file aecurves writes"):
        files.append_jsonl(log, {"a": 1})
    assert outside.read_text() == "precious\n" and not (tmp_path / "would-be-created.txt").exists()
    fresh = tmp_path / "logs" / "fresh.log"
    files.append_jsonl(fresh, {"a": 1})
    files.append_jsonl(fresh, {"a": 2})
    assert files.read_jsonl(fresh) == [{"a": 1}, {"a": 2}]


def _tree_with_links(root):
    (root / "stage").mkdir(parents=True)
    outside = root.parent / f"{root.name}-outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious.pt").write_text("x")
    (outside / "sub" / "deep.pt").write_text("y")
    return outside


@pytest.mark.parametrize("spelling", ["stage folder", "parent folder", "file inside", "folder inside",
                                      "relative ../", "dangling"])
def test_clearing_follows_no_link_and_refuses_a_linked_folder(spelling, tmp_path):
    root = tmp_path / "study"
    outside = _tree_with_links(root)
    folder = root / "stage"
    if spelling == "stage folder":
        folder.rmdir()
        folder.symlink_to(outside)
    elif spelling == "parent folder":
        (root / "stage").rmdir()
        (root / "stage").symlink_to(outside)
        folder = root / "stage" / "sub"
    elif spelling == "relative ../":
        folder.rmdir()
        folder.symlink_to(os.path.relpath(outside, root))
    elif spelling == "file inside":
        (folder / "checkpoint.pt").symlink_to(outside / "precious.pt")
    elif spelling == "folder inside":
        (folder / "eval").symlink_to(outside / "sub")
    else:
        (folder / "gone").symlink_to(tmp_path / "nothing")
    if spelling in ("stage folder", "parent folder", "relative ../"):
        with pytest.raises(UserError, match="is a symbolic link"):
            files.clear_folder(root, folder)
    else:
        files.clear_folder(root, folder)  # the links themselves go; what they point at stays
        assert list(folder.iterdir()) == []
    assert (outside / "precious.pt").read_text() == "x" and (outside / "sub" / "deep.pt").read_text() == "y"


def test_check_no_link_refuses_paths_outside_the_root(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    with pytest.raises(UserError, match="outside the folder"):
        files.check_no_link(root, root / ".." / "elsewhere")
    files.check_no_link(root, root / "not" / "there" / "yet")  # nothing exists yet: nothing to follow


def test_refuse_links_names_every_link_at_any_depth(tmp_path):
    root = tmp_path / "study"
    (root / "a" / "b").mkdir(parents=True)
    files.refuse_links(root, "study folder")
    (root / "a" / "b" / "report_files").symlink_to(tmp_path)
    (root / "logs").symlink_to("/etc")
    with pytest.raises(UserError) as info:
        files.refuse_links(root, "study folder")
    assert "report_files -> " in str(info.value) and "logs -> /etc" in str(info.value)
    (tmp_path / "clean" / "x").mkdir(parents=True)
    link_root = tmp_path / "named-by-the-user"
    link_root.symlink_to(tmp_path / "clean")  # the folder the user names may itself be a link
    files.refuse_links(link_root, "study folder")
