"""Faults of the machine, injected: a full disk and a folder that cannot be written are messages and exit 2, and
leave nothing half-written behind."""

import errno
import os

from PIL import Image

from conftest import TINY, run_cli


def _no_temporaries(folder) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_a_full_disk_while_building_the_image_cache(tmp_path, monkeypatch, capsys):
    from aecurves import data

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.os, "posix_fallocate", full, raising=False)
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(images / f"{i:03d}.png")
    monkeypatch.setenv("AECURVES_CACHE", str(cache))
    assert run_cli("train", "--dataset", "folder", "--data-dir", images, "--image-size", 16, "--epochs", 1,
                   "--no-progress", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "The disk is full" in err and "Traceback" not in err
    assert list(cache.iterdir()) == []  # no sparse temporary left to fill the disk
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from aecurves import checkpoint

    def failing_save(obj, f):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch's writer says on ENOSPC

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(100, 100, 0))
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 2
    assert "The disk is full" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists() and _no_temporaries(tmp_path)


def test_a_folder_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """As root, chmod does not stop writes, so the refusal the OS would give is injected."""
    from aecurves import files

    def forbidden(folder, prefix, suffix=".tmp"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))

    monkeypatch.setattr(files, "new_temp_file", forbidden)
    for argv in (["train", *TINY, "--epochs", 1, "--out", tmp_path / "run"],
                 ["study", "--dataset", "synthetic", "--limit", 64, "--losses", "mse", "--seeds", "1,2",
                  "--no-progress", "--out", tmp_path / "study"]):
        assert run_cli(*argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "Permission denied: choose a folder you can write" in err and "Traceback" not in err
