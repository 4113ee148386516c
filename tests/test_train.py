import json
import math
import os
import subprocess
import sys

import pytest
import torch

from aecurves.checkpoint import load_checkpoint
from aecurves.models import arch_of, build_model

from conftest import TINY, run_cli


def weights(path):
    return load_checkpoint(path, "endpoint")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--epochs", 2, "--save-every-epoch", 1, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "test_loss" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["test_loss"] < rows[0]["test_loss"]
    # PSNR is the mean of per-image PSNRs: at least the PSNR of the mean MSE (Jensen), and plausible
    assert rows[1]["test_psnr"] >= 10 * math.log10(1 / rows[1]["test_mse"]) - 1e-9 and rows[1]["test_psnr"] > 10
    assert [r["lr"] for r in rows] == [3e-3, 3e-3]  # train's default schedule is constant
    for key in ("train_loss", "test_loss", "test_mse", "test_psnr", "epoch_seconds", "images_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    # every epoch's row is printed with the figures of metrics.jsonl
    assert f"{rows[1]['test_loss']:9.5f}".strip() in printed
    state = load_checkpoint(out / "checkpoint.pt", "endpoint")
    assert state["epoch"] == 2 and state["args"]["latent_dim"] == 16 and state["args"]["channels"] == 3
    assert state["metrics"] == rows
    assert (out / "checkpoint_epoch001.pt").is_file()
    from PIL import Image

    grid = Image.open(out / "reconstructions.png")
    assert grid.size[1] == 2 * 32 + 3 * 2  # originals over reconstructions, 2 px padding


def test_resume_rewrites_a_missing_or_stale_picture(tmp_path):
    """E.g. a kill between the checkpoint write and the picture write: the picture shows the checkpoint again."""
    assert run_cli("train", *TINY, "--epochs", 1, "--precision", "fp32", "--out", tmp_path) == 0
    picture = tmp_path / "reconstructions.png"
    original = picture.read_bytes()
    picture.unlink()
    assert run_cli("train", *TINY, "--epochs", 1, "--resume", "--precision", "fp32", "--out", tmp_path) == 0
    assert picture.read_bytes() == original
    picture.write_bytes(b"stale")
    os.utime(picture, ns=(0, 0))  # older than the checkpoint
    assert run_cli("train", *TINY, "--epochs", 1, "--resume", "--precision", "fp32", "--out", tmp_path) == 0
    assert picture.read_bytes() == original


def test_no_reconstruction_pictures_with_num_images_0(tmp_path):
    assert run_cli("train", *TINY, "--epochs", 1, "--num-images", 0, "--out", tmp_path) == 0
    assert (tmp_path / "checkpoint.pt").is_file() and not list(tmp_path.glob("*.png"))


def test_same_seed_same_weights_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert run_cli("train", *TINY, "--epochs", 1, "--seed", seed, "--out", tmp_path / name) == 0
    assert_same_weights(weights(tmp_path / "a/checkpoint.pt"), weights(tmp_path / "b/checkpoint.pt"))
    assert not torch.equal(weights(tmp_path / "a/checkpoint.pt")["encoder.0.0.weight"],
                           weights(tmp_path / "c/checkpoint.pt")["encoder.0.0.weight"])


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path):
    assert run_cli("train", *TINY, "--epochs", 3, "--out", tmp_path / "straight") == 0
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path / "stopped") == 0
    assert run_cli("train", *TINY, "--epochs", 3, "--resume", "--out", tmp_path / "stopped") == 0
    assert_same_weights(weights(tmp_path / "straight/checkpoint.pt"), weights(tmp_path / "stopped/checkpoint.pt"))
    rows = (tmp_path / "stopped/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_alone_finishes_the_run_as_planned(tmp_path):
    """`--resume` with no setting: data, model, batch size, lr and epochs all come from the checkpoint (runtime
    flags such as --precision do not: they are the machine's)."""
    assert run_cli("train", *TINY, "--epochs", 3, "--save-every-epoch", 1, "--precision", "fp32",
                   "--out", tmp_path / "straight") == 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "straight/checkpoint_epoch001.pt").read_bytes())
    assert run_cli("train", "--resume", "--out", stopped, "--no-progress", "--precision", "fp32") == 0
    state = load_checkpoint(stopped / "checkpoint.pt", "endpoint")
    assert state["epoch"] == 3 and state["args"]["lr"] == 3e-3 and state["args"]["batch_size"] == 32
    assert_same_weights(weights(tmp_path / "straight/checkpoint.pt"), state["model"])


def test_resume_with_another_architecture_names_the_setting(tmp_path, capsys):
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 0
    tiny = [a for a in TINY]
    tiny[tiny.index("--latent-dim") + 1] = "32"
    assert run_cli("train", *tiny, "--epochs", 2, "--resume", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "latent_dim=16" in err and "latent_dim=32" in err and "Traceback" not in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    from aecurves.commands import train
    from aecurves.losses import MSELoss

    class NaNLoss(MSELoss):
        def forward(self, recon, target):
            return super().forward(recon, target) * float("nan")

    monkeypatch.setattr(train, "make_loss", lambda *a, **k: NaNLoss())
    assert run_cli("train", *TINY, "--epochs", 2, "--resume", "--out", tmp_path) == 2
    assert "nan" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_bad_data_dir_is_a_user_error(tmp_path, capsys):
    assert run_cli("train", "--dataset", "celeba", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "img_align_celeba" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "aecurves", "train", *TINY, "--epochs", 2, "--device", "cpu", "--out", out]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # only rank 0 writes
    assert rows[1]["test_loss"] < rows[0]["test_loss"]
    # each rank takes its own half of the shuffled data, so an epoch has half the steps of a single process
    from aecurves.data import BatchLoader, load_data

    data = load_data("synthetic", image_size=32, limit=384)
    per_rank = BatchLoader(data.train, 32, shuffle=True, rank=0, world_size=2)
    assert per_rank.num_samples == len(data.train) // 2
    assert load_checkpoint(out / "checkpoint.pt")["optimizer"]["state"][0]["step"].item() == 2 * len(per_rank)


def test_paper_schedule_and_a_new_lr_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--epochs", 2, "--lr-schedule", "paper", "--save-every-epoch", 1, "--out", out) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 3e-5])  # alpha 1/2 -> 1; alpha 1 -> 1%
    assert "3.00e-05" in capsys.readouterr().out  # the table shows the lr
    # resuming keeps the checkpoint's schedule, refuses another, and applies a new --lr from the next step on
    assert run_cli("train", *TINY, "--epochs", 3, "--resume", "--lr-schedule", "cosine", "--out", out) == 2
    assert "lr_schedule='paper' vs lr_schedule='cosine'" in capsys.readouterr().err
    argv = [a for a in TINY if a not in ("--lr", "3e-3")]
    assert run_cli("train", *argv, "--epochs", 4, "--resume", "--lr", 1e-2, "--out", out) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # --epochs 4 redraws the schedule over 4 epochs: epoch 3 ends at alpha 3/4 -> 1 - 0.25/0.4*0.99 = 0.38125
    assert rows[2]["lr"] == pytest.approx(1e-2 * 0.38125) and rows[3]["lr"] == pytest.approx(1e-4)
    assert load_checkpoint(out / "checkpoint.pt", "endpoint")["args"]["lr_schedule"] == "paper"


def test_tensorboard_is_optional(tmp_path, capsys):
    """With the optional package: scalars and grids in OUT/tensorboard; without it: a clear error, nothing written."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert run_cli("train", *TINY, "--epochs", 1, "--tensorboard", "--out", tmp_path / "run") == 2
        assert "pip install tensorboard" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_cli("train", *TINY, "--epochs", 2, "--tensorboard", "--out", tmp_path / "run") == 0
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [e.value for e in events.Scalars("test_loss")]
    assert losses == pytest.approx([r["test_loss"] for r in rows], rel=1e-6)
    assert "reconstructions" in events.Tags()["images"]


def test_fine_tuning_from_an_exported_point_and_runs_that_would_be_overwritten(tmp_path, capsys):
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path / "a") == 0
    state = load_checkpoint(tmp_path / "a/checkpoint.pt", "endpoint")
    point = {**state, "optimizer": {}, "epoch": 0, "metrics": [], "exported_from": {"t": 0.5}}  # as export-point
    torch.save(point, tmp_path / "point.pt")
    capsys.readouterr()
    assert run_cli("train", *TINY, "--epochs", 2, "--checkpoint", tmp_path / "point.pt", "--out", tmp_path / "ft") == 0
    assert "fresh Adam optimizer" in capsys.readouterr().out
    tuned = load_checkpoint(tmp_path / "ft/checkpoint.pt", "endpoint")
    assert tuned["epoch"] == 2 and [r["epoch"] for r in tuned["metrics"]] == [1, 2]
    # starting another checkpoint over an existing run, or writing a run where a file is, is refused
    before = (tmp_path / "ft/checkpoint.pt").read_bytes()
    assert run_cli("train", *TINY, "--epochs", 3, "--checkpoint", tmp_path / "point.pt", "--out", tmp_path / "ft") == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert (tmp_path / "ft/checkpoint.pt").read_bytes() == before
    (tmp_path / "file").write_text("mine")
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


def test_diverged_state_stops_even_with_a_finite_loss(tmp_path, monkeypatch, capsys):
    """BatchNorm statistics that became inf (as --lr 1e6 does) stop the run; the last good checkpoint stays."""
    from aecurves.commands import train

    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real = train.train_one_epoch

    def diverging(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        with torch.no_grad():
            model.encoder[0][1].running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(train, "train_one_epoch", diverging)
    assert run_cli("train", *TINY, "--epochs", 2, "--resume", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "diverged at epoch 2" in err and "encoder.0.1.running_var" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_init_starts_from_an_endpoint_with_a_fresh_optimizer_and_its_own_schedule(tmp_path, capsys):
    """--init: the endpoint's weights, data and model; this run's epochs, lr and schedule (the study's "endpoint
    given as much extra training as a curve"); resumable like any run."""
    assert run_cli("train", *TINY, "--epochs", 1, "--out", tmp_path / "a") == 0
    a = load_checkpoint(tmp_path / "a/checkpoint.pt", "endpoint")
    # an lr of 1e-30 leaves every parameter where it starts: exactly the endpoint's
    assert run_cli("train", "--init", tmp_path / "a/checkpoint.pt", "--epochs", 1, "--lr", "1e-30", "--no-progress",
                   "--out", tmp_path / "still") == 0
    still = load_checkpoint(tmp_path / "still/checkpoint.pt", "endpoint")
    params = {n for n, _ in build_model(arch_of(a["args"])).named_parameters()}
    assert params and all(torch.equal(still["model"][n], a["model"][n]) for n in params)
    for k in ("dataset", "limit", "width", "latent_dim", "image_size", "loss"):
        assert still["args"][k] == a["args"][k], k
    assert still["args"]["init"] == str((tmp_path / "a/checkpoint.pt").resolve())

    extra = ["--init", tmp_path / "a/checkpoint.pt", "--lr", "1e-3", "--lr-schedule", "paper", "--seed", 5,
             "--save-every-epoch", 1, "--precision", "fp32", "--no-progress"]
    assert run_cli("train", *extra, "--epochs", 3, "--out", tmp_path / "straight") == 0
    rows = [json.loads(r) for r in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == pytest.approx(1e-5)  # paper: 1% at the end
    # interrupted after one epoch and resumed: the same weights as the straight run
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "straight/checkpoint_epoch001.pt").read_bytes())
    assert run_cli("train", "--resume", "--precision", "fp32", "--no-progress", "--out", stopped) == 0
    assert_same_weights(weights(tmp_path / "straight/checkpoint.pt"), weights(stopped / "checkpoint.pt"))

    capsys.readouterr()
    assert run_cli("train", "--init", tmp_path / "a/checkpoint.pt", "--loss", "vgg", "--vgg-weights", "random",
                   "--epochs", 1, "--out", tmp_path / "other") == 2
    assert "loss='mse' vs loss='vgg'" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert run_cli("train", "--init", tmp_path / "a/checkpoint.pt", "--checkpoint", tmp_path / "a/checkpoint.pt",
                   "--epochs", 1, "--out", tmp_path / "both") == 2
    assert "pass one of them" in capsys.readouterr().err


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_channels_last_training_matches_contiguous_to_rounding(tmp_path, capsys):
    """The default trains in channels_last (batches and weights) with fused Adam; the numbers are contiguous
    training's to float rounding, and the checkpoint reads back into an ordinary model."""
    args = [*TINY, "--epochs", 2, "--precision", "fp32"]
    assert run_cli("train", *args, "--out", tmp_path / "cl") == 0
    assert "fp32, channels_last, Adam fused" in capsys.readouterr().out
    assert run_cli("train", *args, "--memory-format", "contiguous", "--out", tmp_path / "nchw") == 0
    assert "fp32, contiguous, Adam fused" in capsys.readouterr().out
    cl, nchw = _rows(tmp_path / "cl"), _rows(tmp_path / "nchw")
    assert [r["memory_format"] for r in cl + nchw] == ["channels_last"] * 2 + ["contiguous"] * 2
    for a, b in zip(cl, nchw):
        for key in ("train_loss", "test_loss", "test_mse"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key
    state = weights(tmp_path / "cl" / "checkpoint.pt")
    conv = next(v for v in state.values() if v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # saved as trained
    model = build_model(arch_of(load_checkpoint(tmp_path / "cl" / "checkpoint.pt")["args"]))
    model.load_state_dict(state)
    other = build_model(arch_of(load_checkpoint(tmp_path / "nchw" / "checkpoint.pt")["args"]))
    other.load_state_dict(weights(tmp_path / "nchw" / "checkpoint.pt"))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), other.eval()(x), rtol=0, atol=2e-3)


def test_a_model_that_cannot_take_channels_last_trains_contiguous_with_a_note(tmp_path, capsys):
    model = f"{os.path.join(os.path.dirname(__file__), 'ae_models.py')}:viewing_autoencoder"
    assert run_cli("train", *[a for a in TINY if a not in ("--width", "8")], "--epochs", 1, "--model", model,
                   "--out", tmp_path) == 0
    printed = capsys.readouterr().out
    assert "note: the batches are contiguous, not channels_last" in printed and "view" in printed
    assert _rows(tmp_path)[0]["memory_format"] == "contiguous"


def test_compile_that_fails_falls_back_with_a_note_and_the_same_numbers(tmp_path, capsys, monkeypatch):
    args = [*TINY, "--epochs", 1, "--precision", "fp32"]
    assert run_cli("train", *args, "--out", tmp_path / "plain") == 0

    def no_compiler(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("InductorError: no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert run_cli("train", *args, "--compile", "--out", tmp_path / "compiled") == 0
    printed = capsys.readouterr().out
    assert "torch.compile could not compile the model (RuntimeError: InductorError: no C++ compiler found)" in printed
    plain, fallback = _rows(tmp_path / "plain"), _rows(tmp_path / "compiled")
    assert fallback[0]["compiled"] is False and plain[0]["compiled"] is False
    assert fallback[0]["train_loss"] == plain[0]["train_loss"] and fallback[0]["test_loss"] == plain[0]["test_loss"]
    assert_same_weights(weights(tmp_path / "plain" / "checkpoint.pt"), weights(tmp_path / "compiled" / "checkpoint.pt"))


def test_held_out_tensors_hold_the_pictures_pixels(tmp_path):
    """reconstructions.pt beside reconstructions.png: the held-out images over their reconstructions, as the PNG
    grid holds them (the report reads the tensors instead of decoding the picture)."""
    import numpy as np
    from PIL import Image

    assert run_cli("train", *TINY, "--epochs", 1, "--num-images", 3, "--out", tmp_path) == 0
    held = torch.load(tmp_path / "reconstructions.pt", weights_only=True)
    assert held["format"] == 1 and held["images"].dtype == held["reconstructions"].dtype == torch.uint8
    assert held["images"].shape == held["reconstructions"].shape == (3, 3, 32, 32)
    grid = np.asarray(Image.open(tmp_path / "reconstructions.png").convert("RGB"))
    for row, key in enumerate(("images", "reconstructions")):
        for i in range(3):
            top, left = 2 + row * 34, 2 + i * 34
            cell = grid[top:top + 32, left:left + 32].transpose(2, 0, 1)
            assert np.array_equal(cell, held[key][i].numpy()), (key, i)
    assert (tmp_path / "reconstructions_epoch001.pt").is_file()


def test_run_epochs_mirrors_history_saves_every_n_and_the_last_and_prints_one_header(tmp_path):
    """The loop train and train-curve share: rows a crashed run logged past its checkpoint are dropped from
    metrics.jsonl, every row joins history and metrics.jsonl, saves come every `every` epochs and after the last."""
    from aecurves.training import TABLE_HEAD, TABLE_TAIL, run_epochs, run_folder

    table = (*TABLE_HEAD, ("test_loss", "test_loss", "9.5f"), *TABLE_TAIL)
    history = [{"epoch": 2, "lr": 1e-3, "train_loss": 0.5, "test_loss": 0.6, "epoch_seconds": 1.0,
                "images_per_s": 9.0}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(history[0]) + "\n" + json.dumps({"epoch": 3}) + "\n")
    saved, printed = [], []

    def one_epoch(epoch):
        return {**history[0], "epoch": epoch, "train_loss": 1 / epoch}

    with run_folder(tmp_path, "training run", True, history):
        assert [json.loads(r)["epoch"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
        run_epochs(range(3, 8), history, one_epoch, table, printed.append, tmp_path, 2,
                   lambda epoch: saved.append((epoch, len(history))))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == history and [r["epoch"] for r in rows] == [2, 3, 4, 5, 6, 7]
    assert saved == [(4, 3), (6, 5), (7, 6)]  # each save sees its own epoch's row
    assert "train_loss" in printed[0] and all("train_loss" not in line for line in printed[1:])
    assert printed[-1].split()[:3] == ["7", "1.00e-03", f"{1 / 7:.5f}"]


def test_run_epochs_on_another_rank_writes_nothing(tmp_path):
    from aecurves.training import TABLE_HEAD, TABLE_TAIL, run_epochs, run_folder

    history = []
    with run_folder(tmp_path / "run", "training run", False, history):
        run_epochs(range(1, 3), history, lambda e: {"epoch": e, "lr": 0.1, "train_loss": 1.0, "epoch_seconds": 0.0,
                                                    "images_per_s": 0.0}, (*TABLE_HEAD, *TABLE_TAIL),
                   lambda line: None, None, 1, lambda epoch: pytest.fail("rank 1 saved"))
    assert [r["epoch"] for r in history] == [1, 2] and not (tmp_path / "run").exists()


def test_metrics_row_and_epoch_line_put_a_vaes_terms_after_the_loss():
    from aecurves.training import TABLE_HEAD, TABLE_TAIL, epoch_line, metrics_row

    held_out = {"loss": 0.25, "mse": 0.125, "psnr": 9.0, "distortion": 0.2, "rate": 0.1, "ssim": 0.5}
    row = metrics_row(4, 1e-3, {"loss": 0.5, "l2_term": 0.01, "distortion": 0.4, "rate": 0.2}, held_out, "mid_test_",
                      (0.0, 2.0, 64), {"precision": "fp32"})
    assert list(row) == ["epoch", "lr", "train_loss", "train_l2_term", "train_distortion", "train_rate",
                         "mid_test_loss", "mid_test_distortion", "mid_test_rate", "mid_test_mse", "mid_test_psnr",
                         "epoch_seconds", "images_per_s", "precision"]
    assert row["images_per_s"] == 32.0 and row["mid_test_mse"] == 0.125 and row["train_l2_term"] == 0.01
    table = (*TABLE_HEAD, ("l2_term", "train_l2_term", "9.5f"), *TABLE_TAIL)
    header, _, line = epoch_line(row, table, header=True).splitlines()
    assert header.split() == ["epoch", "lr", "train_loss", "distortion", "rate", "l2_term", "seconds", "images/s"]
    assert line.split()[2:6] == ["0.50000", "0.40000", "0.20", "0.01000"]


def test_tensorboard_gets_each_epochs_figures_and_picture(tmp_path, monkeypatch):
    """What --tensorboard writes, through a stand-in writer (the package is optional): the metrics row's figures
    under their own names at each epoch, the reconstruction grid at each save, and the writer closed."""
    from aecurves.commands import train

    class Board:
        scalars, images, closed = [], [], False

        def add_scalar(self, key, value, step):
            self.scalars.append((key, value, step))

        def add_image(self, key, grid, step):
            self.images.append((key, tuple(grid.shape), step))

        def close(self):
            Board.closed = True

    monkeypatch.setattr(train, "tensorboard_writer", lambda out: Board())
    assert run_cli("train", *TINY, "--epochs", 2, "--save-every-epoch", 2, "--tensorboard", "--out", tmp_path) == 0
    rows = _rows(tmp_path)
    assert Board.scalars == [(k, r[k], r["epoch"]) for r in rows
                             for k in ("train_loss", "test_loss", "test_mse", "test_psnr", "lr", "images_per_s")]
    assert Board.images == [("reconstructions", (3, 2 * 32 + 3 * 2, 8 * 34 + 2), 2)] and Board.closed
