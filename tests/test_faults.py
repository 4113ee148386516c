"""Faults, injected: a full disk and a folder that cannot be written are messages and exit 2 and leave nothing
half-written behind; a SIGKILL at a random moment of training loses nothing that a resume does not restore."""

import errno
import os

import pytest
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


def _kill_during(argv, out, epochs_done: int, extra: float) -> bool:
    """Runs `aecurves ARGV` in a new process and SIGKILLs it `extra` seconds after its metrics.jsonl shows
    `epochs_done` epochs (mid-epoch, or while it writes a checkpoint); False if it finished first."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    # the same thread count as this process: float sums in another order would differ in the last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "aecurves", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs_done:
            time.sleep(extra)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 4])
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(seed, tiny_endpoints, tmp_path):
    """train and train-curve, killed at a moment drawn from `seed` (an epoch, or a checkpoint write), then
    resumed: the same weights and optimizer state as a run that was never stopped."""
    import random

    import torch

    from aecurves.checkpoint import load_checkpoint

    rng = random.Random(seed)
    epochs_done, extra = rng.randint(1, 3), rng.uniform(0.0, 0.2)
    a, b = tiny_endpoints
    runs = {
        "train": (["train", *TINY, "--epochs", 6, "--save-every-epoch", 1, "--precision", "fp32", "--seed", seed],
                  "endpoint", "model"),
        "train-curve": (["train-curve", "--init-start", a, "--init-end", b, "--fix-start", "--fix-end", "--epochs", 6,
                         "--batch-size", 32, "--bn-images", 64, "--precision", "fp32", "--no-progress",
                         "--seed", seed], "curve", "curve"),
    }
    for name, (argv, kind, _weights) in runs.items():
        straight, stopped = tmp_path / f"{name}-straight", tmp_path / f"{name}-stopped"
        assert run_cli(*argv, "--out", straight) == 0
        assert _kill_during([*argv, "--out", stopped], stopped, epochs_done, extra), f"{name} finished before the kill"
        assert run_cli(*argv, "--out", stopped, "--resume") == 0
        x, y = (load_checkpoint(d / "checkpoint.pt", kind) for d in (straight, stopped))
        assert x["epoch"] == y["epoch"] == 6, name
        if kind == "curve":
            assert torch.equal(x["curve"]["bends"], y["curve"]["bends"]), name
        else:
            assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]), name
        for group_x, group_y in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values()):
            assert all(torch.equal(group_x[k], group_y[k]) for k in group_x), name


def test_eval_curve_checks_its_folder_before_the_long_part(tiny_endpoints, tmp_path, monkeypatch, capsys):
    from aecurves import files
    from aecurves.commands import eval_curve

    real = files.new_temp_file

    def read_only(folder, prefix, suffix=".tmp"):
        if prefix == "write-check":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        return real(folder, prefix, suffix)

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before the folder was checked")

    monkeypatch.setattr(files, "new_temp_file", read_only)
    monkeypatch.setattr(eval_curve, "evaluate_paths", never)
    assert run_cli("eval-curve", "--segment", *tiny_endpoints, "--out", tmp_path / "ev", "--no-progress") == 2
    assert "read-only" in capsys.readouterr().err


def test_a_segment_between_different_losses_needs_loss(tiny_endpoints, tmp_path, capsys):
    from aecurves.checkpoint import load_checkpoint, save_checkpoint

    b = load_checkpoint(tiny_endpoints[1], "endpoint")
    b["args"]["loss"] = "vgg"
    save_checkpoint(tmp_path / "b.pt", b)
    common = ["eval-curve", "--segment", tiny_endpoints[0], tmp_path / "b.pt", "--num-points", 2, "--bn-images", 32,
              "--train-images", 32, "--num-images", 0, "--vgg-weights", "random", "--no-progress"]
    assert run_cli(*common, "--out", tmp_path / "a") == 2
    assert "different losses (mse and vgg)" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert run_cli(*common, "--loss", "mse", "--out", tmp_path / "b") == 0


BAD_INPUT = [  # (command line after the command, phrase of the message); each was a traceback once
    (["train", *TINY, "--image-size", 48], "power of two"),
    (["train", *TINY, "--image-size", 7], "power of two"),
    (["train", *TINY, "--lr", "1e38"], "--lr must be at most 100"),
    (["train", *TINY, "--lr", "nan"], "--lr must be a finite number"),
    (["train", *TINY, "--lr", -1], "--lr must be positive"),
    (["train", *TINY, "--wd", -1], "--wd must be at least 0"),
    (["train", *TINY, "--num-images", -1], "--num-images must be at least 0"),
    (["train", *TINY, "--out", ""], "--out must name a folder"),
    (["train", *TINY, "--out", "{file}"], "is a file"),
    (["train", "--dataset", "folder", "--data-dir", "{file}", "--no-progress"], "is a file, not a folder"),
    (["train-curve", "--init-start", "{a}", "--init-end", "{b}", "--out", "{file}"], "is a file"),
    (["eval-curve", "--segment", "{a}", "{b}", "--out", "{file}"], "existing file"),
    (["eval-curve", "--segment", "{a}", "{b}", "--bn-images", -1], "--bn-images must be at least 1"),
    (["study", "--out", "{file}", "--losses", "mse", "--dataset", "synthetic", "--limit", 64], "is a file"),
    # every number has a range, checked before any work (each of these gave a traceback, or hung, before)
    (["train", *TINY, "--seed", 10**23], "--seed must be at most 4,294,967,295"),
    (["train", *TINY, "--seed", -1], "--seed must be at least 0"),
    (["train", *TINY, "--width", 100000], "--width must be at most 1,024"),
    (["train", *TINY, "--image-size", 100000], "--image-size must be at most 1,024"),
    (["train", *TINY, "--latent-dim", 10**11], "--latent-dim must be at most 65,536"),
    (["train", *TINY, "--limit", 10**23], "--limit must be at most 1,000,000,000"),
    (["train", "--dataset", "synthetic", "--limit", 10**8, "--no-progress"], "at most 65,536 images"),
    (["train-curve", "--init-start", "{a}", "--init-end", "{b}", "--num-bends", 10**5],
     "--num-bends must be at most 64"),
    (["eval-curve", "--segment", "{a}", "{b}", "--num-points", 10**8], "--num-points must be at most 10,001"),
    (["plane", "--points", "{a}", "{b}", "{a}", "--grid", 100000], "--grid must be at most 201"),
    (["plane", "--points", "{a}", "{b}", "{a}", "--margin", 1e30], "--margin must be at most 10"),
    (["study", "--num-bends", 10**6, "--losses", "mse"], "--num-bends must be at most 64"),
    (["study", "--seeds", f"1,2,{10**23}", "--losses", "mse"], "each from 0 to 4294967295"),
    (["study", "--seeds", "1,2,1e23", "--losses", "mse"], "comma-separated list of integers"),
    # a --model-kwargs entry may not contradict a flag
    (["train", *TINY, "--model-kwargs", '{"width": 4}'], "--model-kwargs sets width=4, which --width sets (to 8)"),
    (["train", *TINY, "--model-kwargs", '{"latent_dim": 4}'], "latent_dim=4, which --latent-dim sets"),
    (["study", "--losses", "mse", "--model-kwargs", '{"channels": 3}'], "channels=3, which the data sets"),
    # the study checks every stage's settings before its first stage
    (["study", "--losses", "mse", "--dataset", "synthetic", "--limit", 64, "--ensemble", 1], "--ensemble 1 is not"),
    (["study", "--losses", "mse", "--dataset", "synthetic", "--limit", 64, "--plane-grid", 1],
     "--grid must be at least 2"),
]


@pytest.mark.parametrize("argv, phrase", BAD_INPUT, ids=[" ".join(map(str, a[:1] + a[-2:])) for a, _ in BAD_INPUT])
def test_bad_input_is_a_message_and_exit_2(argv, phrase, tiny_endpoints, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    values = {"file": tmp_path / "file", "a": tiny_endpoints[0], "b": tiny_endpoints[1]}
    for key, value in values.items():
        argv = [a.replace("{" + key + "}", str(value)) if isinstance(a, str) else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", tmp_path / "out"]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_cache_whose_header_has_another_shape_is_rebuilt(tmp_path, capsys):
    import numpy as np
    import torch

    from aecurves.data import load_data

    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(images / f"{i:03d}.png")
    first = load_data("folder", images, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    train = first.train.clone()
    npy = next((tmp_path / "cache").glob("*.npy"))
    np.save(npy, np.zeros((10, 3, 4, 4), dtype=np.uint8))  # a valid .npy of another shape
    capsys.readouterr()
    again = load_data("folder", images, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    assert "damaged" in capsys.readouterr().err and torch.equal(again.train, train)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs, when this process may mount one (root in a container that allows it); else skip."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_really_full_disk(small_disk, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(120):  # 120 x 3 x 64 x 64 bytes: more than the 1 MB disk holds
        Image.new("RGB", (70, 70), (i, 2 * i % 256, 50)).save(images / f"{i:03d}.png")
    monkeypatch.setenv("AECURVES_CACHE", str(small_disk / "cache"))
    assert run_cli("train", "--dataset", "folder", "--data-dir", images, "--epochs", 1, "--no-progress",
                   "--out", tmp_path / "run") == 2
    # refused before decoding, from the disk's free space (a disk that fills while decoding: the test above)
    assert "more than the 1.0 MiB free" in capsys.readouterr().err
    assert not (small_disk / "cache").exists() or list((small_disk / "cache").iterdir()) == []
    # a checkpoint larger than the disk: a message, not "basic_ios::clear", and no partial file
    monkeypatch.setenv("AECURVES_CACHE", str(tmp_path / "cache"))
    assert run_cli("train", "--dataset", "synthetic", "--image-size", 32, "--limit", 64, "--width", 32,
                   "--epochs", 1, "--no-progress", "--out", small_disk / "run") == 2
    assert "The disk is full" in capsys.readouterr().err
    assert not [p for p in (small_disk / "run").iterdir() if p.suffix == ".pt" or ".tmp" in p.name]


def test_a_really_read_only_folder(tmp_path, capsys):
    """A read-only tmpfs (root could write through chmod): every writing command says so, before any work."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    disk = tmp_path / "ro"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        assert run_cli("train", *TINY, "--epochs", 1, "--out", disk / "run") == 2
        assert "read-only" in capsys.readouterr().err
        assert run_cli("study", "--dataset", "synthetic", "--limit", 64, "--losses", "mse", "--seeds", "1,2",
                       "--no-progress", "--out", disk / "study") == 2
        assert "read-only" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_two_studies_at_once(tmp_path, capsys):
    """A second study into a folder another process is writing is refused (they used to interleave every file)."""
    import signal
    import subprocess
    import sys
    import time

    study = ["study", "--dataset", "synthetic", "--image-size", 32, "--limit", 128, "--width", 4, "--latent-dim", 8,
             "--epochs", 30, "--curve-epochs", 2, "--losses", "mse", "--seeds", "1,2", "--num-points", 3,
             "--no-progress", "--out", tmp_path / "s"]
    first = subprocess.Popen([sys.executable, "-m", "aecurves", *map(str, study)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "s" / ".aecurves.lock"
        while first.poll() is None and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.01)
        assert first.poll() is None, "the first study ended before the second one started"
        assert run_cli(*study) == 2
        assert f"PID {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert run_cli(*study) == 0  # the killed study's lock is taken over, and the study finishes
