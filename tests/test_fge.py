"""`aecurves fge`: fast geometric ensembling as fge.py does it (schedule and snapshot rule by hand), snapshots with
BatchNorm recomputed, the ensemble's numbers from the saved files, exact resume, and every bad input refused."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from aecurves import runtime
from aecurves.checkpoint import load_checkpoint, load_endpoints
from aecurves.commands import fge
from aecurves.curves import batchnorms, recompute_bn
from aecurves.data import BatchLoader, load_run_data
from aecurves.metrics import fixed_subset
from aecurves.models import arch_of, build_model
from aecurves.records import FgeRecord, snapshot_file
from aecurves.schedules import cyclic_lr, is_snapshot_epoch, snapshot_epochs

from conftest import run_cli

# a network and a data set small enough for a whole FGE run in seconds on a shared 2-core CPU
SMALL = ["--dataset", "synthetic", "--image-size", "16", "--limit", "160", "--width", "4", "--latent-dim", "8",
         "--batch-size", "32", "--lr", "3e-3", "--no-progress", "--precision", "fp32"]
RUN = ["--no-progress", "--precision", "fp32"]
EPOCHS, CYCLE, BN_IMAGES = 6, 4, 100  # snapshots after epochs 1 and 5 (counted from 0), the last one at the end


# ----------------------------------------------------------------------------------------------------------
# the schedule and the snapshot rule, by hand


def fge_py_schedule(epoch, cycle, alpha_1, alpha_2):
    """utils.cyclic_learning_rate of timgaripov/dnn-mode-connectivity, transcribed."""
    def schedule(iter):
        t = ((epoch % cycle) + iter) / cycle
        if t < 0.5:
            return alpha_1 * (1.0 - 2.0 * t) + alpha_2 * 2.0 * t
        return alpha_1 * (2.0 * t - 1.0) + alpha_2 * (2.0 - 2.0 * t)
    return schedule


@pytest.mark.parametrize("epoch, step, lr", [
    (0, 0, 1.0),                       # the first step of a cycle: lr_1
    (0, 5, 0.75 * 1.0 + 0.25 * 0.01),  # t = 0.5 / 4 = 0.125: a quarter of the way down
    (1, 0, 0.5 * 1.0 + 0.5 * 0.01),    # t = 0.25: half way down
    (1, 9, 0.05 * 1.0 + 0.95 * 0.01),  # the last step of epoch 1 (t = 1.9 / 4), just before the snapshot
    (1, 10, 0.01),                     # the end of epoch 1 (t = 0.5): lr_2
    (2, 0, 0.01),                      # the first step of epoch 2 is the lowest lr: lr_2
    (3, 5, 0.75 * 1.0 + 0.25 * 0.01),  # t = 3.5 / 4: back up, three quarters of the way
    (3, 9, 0.95 * 1.0 + 0.05 * 0.01),
    (4, 0, 1.0),                       # the next cycle starts at lr_1 again
    (6, 3, 0.15 * 1.0 + 0.85 * 0.01),  # epoch 6 is epoch 2 of its cycle: t = 2.3 / 4, 2t − 1 = 0.15
])
def test_cyclic_lr_by_hand(epoch, step, lr):
    """cycle 4, 10 steps per epoch, lr_1 1, lr_2 0.01."""
    assert cyclic_lr(epoch, step, 10, 4, 1.0, 0.01) == pytest.approx(lr, abs=1e-12)
    assert cyclic_lr(epoch, step, 10, 4, 1.0, 0.01) == fge_py_schedule(epoch, 4, 1.0, 0.01)(step / 10)


def test_cyclic_lr_equals_fge_py_everywhere():
    for cycle in (2, 4, 6):
        for epoch in range(3 * cycle):
            for step in range(7):
                fge_py = fge_py_schedule(epoch, cycle, 0.05, 1e-4)(step / 7)
                assert cyclic_lr(epoch, step, 7, cycle, 0.05, 1e-4) == fge_py


def test_snapshots_are_taken_where_fge_py_takes_them():
    assert snapshot_epochs(20, 4) == [1, 5, 9, 13, 17]  # fge.py's defaults, epochs counted from 0
    assert [e for e in range(20) if is_snapshot_epoch(e, 4)] == [1, 5, 9, 13, 17]
    assert snapshot_epochs(6, 2) == [0, 2, 4]
    assert snapshot_epochs(12, 6) == [2, 8]
    assert snapshot_epochs(1, 4) == []  # fewer epochs than half a cycle: nothing (refused by the command)
    # the snapshot comes at the end of the epoch whose last step has the cycle's lowest lr so far
    steps = 10
    lrs = [cyclic_lr(e, s, steps, 4, 1.0, 0.01) for e in range(4) for s in range(steps)]
    assert lrs.index(min(lrs[:2 * steps])) == 2 * steps - 1  # the last step of epoch 1


# ----------------------------------------------------------------------------------------------------------
# a tiny run


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fge-endpoint") / "run"
    assert run_cli("train", *SMALL, "--epochs", 1, "--seed", 3, "--out", out) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def straight(endpoint, tmp_path_factory):
    """An uninterrupted run: 6 epochs, cycle 4, BN statistics from a 100-image subset."""
    out = tmp_path_factory.mktemp("fge-straight") / "run"
    assert run_cli("fge", "--ckpt", endpoint, "--epochs", EPOCHS, "--cycle", CYCLE, "--bn-images", BN_IMAGES,
                   "--num-images", 2, *RUN, "--out", out) == 0
    return out


def read(out):
    return json.loads((out / "fge.json").read_text())


def test_a_run_takes_its_snapshots_at_fge_pys_epochs_with_the_cyclic_lr(straight, endpoint):
    record = read(straight)
    assert record["format"] == 1 and record["budget_epochs"] == EPOCHS
    assert record["snapshot_epochs"] == [1, 5] == snapshot_epochs(EPOCHS, CYCLE)
    assert [s["file"] for s in record["snapshots"]] == [str(straight / f"snapshot_{k}.pt") for k in (1, 2)]
    assert sorted(p.name for p in straight.glob("snapshot_*.pt")) == ["snapshot_1.pt", "snapshot_2.pt"]
    assert (straight / "reconstructions.png").is_file()
    # defaults from the endpoint: lr_1 its lr, lr_2 = lr_1 x 0.002, its wd and batch size; Adam state loaded
    ep = load_checkpoint(endpoint, "endpoint")
    cfg = record["config"]
    assert cfg["lr_1"] == ep["args"]["lr"] == 3e-3 and cfg["lr_2"] == pytest.approx(3e-3 * 0.002)
    assert cfg["wd"] == ep["args"]["wd"] and cfg["batch_size"] == ep["args"]["batch_size"] and cfg["cycle"] == CYCLE
    assert record["optimizer"] == "Adam, its state loaded from the endpoint checkpoint"
    # the lr of every epoch's first and last step is the cyclic schedule's
    steps = record["steps_per_epoch"]
    assert steps == 5  # 147 training images in batches of 32
    rows = record["epochs"]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    for r in rows:
        assert r["lr_first"] == cyclic_lr(r["epoch"], 0, steps, CYCLE, cfg["lr_1"], cfg["lr_2"])
        assert r["lr"] == cyclic_lr(r["epoch"], steps - 1, steps, CYCLE, cfg["lr_1"], cfg["lr_2"])
    assert rows[0]["lr_first"] == 3e-3 and rows[2]["lr_first"] == pytest.approx(cfg["lr_2"])
    assert [r["snapshot"] for r in rows] == [None, 1, None, None, None, 2]
    assert [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()] == rows
    # every snapshot is an ordinary endpoint checkpoint: the commands' loader takes them as a pair
    states, arch = load_endpoints([straight / "snapshot_1.pt", straight / "snapshot_2.pt"], ["a", "b"], None, "test")
    assert arch == arch_of(ep["args"]) and states[0]["fge_snapshot"]["epoch"] == 1
    assert states[1]["epoch"] == ep["epoch"] + 6  # the training it has had


def test_fge_json_is_its_record_written_byte_for_byte(straight):
    """fge.json is FgeRecord.to_json() as write_json writes it: read back and written again, the same bytes; the
    files it lists (the snapshots' flattened in) are the run's, named by records.snapshot_file."""
    text = (straight / "fge.json").read_text()
    record = FgeRecord.from_json(json.loads(text), str(straight / "fge.json"))
    assert json.dumps(record.to_json(), indent=2) + "\n" == text
    assert record.budget_epochs == EPOCHS and record.config["cycle"] == CYCLE
    names = [snapshot_file(k) for k in (1, 2)]
    assert sorted(p.name for p in straight.glob("snapshot_*.pt")) == names == ["snapshot_1.pt", "snapshot_2.pt"]
    assert record.listed_files() == [str(straight / n) for n in ("fge.json", "metrics.jsonl", "checkpoint.pt",
                                                                  "reconstructions.png", *names)]
    assert all((straight / f).is_file() for f in record.listed_files())


def _adam_form(optimizer_state: dict) -> tuple:
    group = optimizer_state["param_groups"][0]
    return group.get("fused"), group.get("foreach")


def test_the_ensemble_metrics_match_a_hand_computation_from_the_files(straight):
    record = read(straight)
    snaps = [load_checkpoint(straight / f"snapshot_{k}.pt", "endpoint") for k in (1, 2)]
    data = load_run_data(snaps[0]["args"], progress=False)
    x = data.test.float().div(255)
    assert record["test_images"] == len(x) == 13  # the name-hash split of 160 images
    outputs = []
    for s in snaps:
        net = build_model(arch_of(s["args"]))
        net.load_state_dict(s["model"])
        with torch.no_grad():
            outputs.append(net.eval()(x))
    per_image = [(o - x).pow(2).flatten(1).mean(1) for o in outputs]
    for k in range(2):
        assert record["snapshots"][k]["mse"] == pytest.approx(per_image[k].mean().item(), rel=1e-6)
    average = (outputs[0] + outputs[1]) / 2
    ensemble = (average - x).pow(2).mean().item()
    assert record["ensemble"]["mse"] == pytest.approx(ensemble, rel=1e-6) and record["ensemble"]["members"] == 2
    psnr = (10 * torch.log10(1 / (average - x).pow(2).flatten(1).mean(1))).mean().item()
    assert record["ensemble"]["psnr"] == pytest.approx(psnr, rel=1e-6)
    assert set(record["ensemble"]) >= {"mse", "psnr", "ssim"} and set(record["start"]) >= {"mse", "psnr", "ssim"}
    # averaging can only help MSE over the members' mean (the ambiguity decomposition)
    assert ensemble <= (per_image[0].mean() + per_image[1].mean()).item() / 2 + 1e-9
    assert record["ensemble_mse_gain"]["vs_start"] == pytest.approx(1 - ensemble / record["start"]["mse"], rel=1e-5)


def test_each_snapshot_has_its_batchnorm_statistics_recomputed_on_the_fixed_subset(straight):
    record = read(straight)
    assert record["bn"]["recomputed"] and record["bn"]["images"] == BN_IMAGES
    snap = load_checkpoint(straight / "snapshot_2.pt", "endpoint")  # taken after the last epoch
    trained = load_checkpoint(straight / "checkpoint.pt", "fge")   # the same weights, training's statistics
    net = build_model(arch_of(snap["args"]))
    params = {n for n, _ in net.named_parameters()}
    assert all(torch.equal(snap["model"][n], trained["model"][n]) for n in params)
    data = load_run_data(snap["args"], progress=False)
    subset = fixed_subset(data.train, BN_IMAGES)
    assert len(subset) == BN_IMAGES < len(data.train)
    # by hand, the first BatchNorm: the statistics of the first convolution's output on the subset (one batch)
    x = subset.float().div(255)
    h = F.conv2d(x, snap["model"]["encoder.0.0.weight"], stride=2, padding=1)
    assert torch.allclose(snap["model"]["encoder.0.1.running_mean"], h.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(snap["model"]["encoder.0.1.running_var"], h.var((0, 2, 3), unbiased=True), rtol=1e-5)
    # every BatchNorm: a recomputation on the same subset gives the saved statistics, not training's
    net.load_state_dict(trained["model"])
    recompute_bn(net, dict(net.named_parameters()), BatchLoader(subset, 256))
    buffers = dict(net.named_buffers())
    names = [n for n in buffers if n.endswith(("running_mean", "running_var"))]
    assert len(names) == 2 * len(batchnorms(net))
    for n in names:
        assert torch.allclose(snap["model"][n], buffers[n], rtol=1e-5, atol=1e-7), n
        assert not torch.allclose(snap["model"][n], trained["model"][n], rtol=1e-3), n


def assert_same_run(a, b):
    """The same weights and snapshots, bit for bit, and the same fge.json figures."""
    wa, wb = load_checkpoint(a / "checkpoint.pt", "fge"), load_checkpoint(b / "checkpoint.pt", "fge")
    assert wa["epoch"] == wb["epoch"] == EPOCHS
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    for k in (1, 2):
        sa = load_checkpoint(a / f"snapshot_{k}.pt", "endpoint")["model"]
        sb = load_checkpoint(b / f"snapshot_{k}.pt", "endpoint")["model"]
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    ra, rb = read(a), read(b)
    assert ra["snapshot_epochs"] == rb["snapshot_epochs"]
    for entry in ("start", "ensemble"):
        for m in ("mse", "psnr", "ssim"):
            assert ra[entry][m] == pytest.approx(rb[entry][m], rel=1e-6, abs=1e-9), (entry, m)
    for sa, sb in zip(ra["snapshots"], rb["snapshots"]):
        assert sa["epoch"] == sb["epoch"] and sa["mse"] == pytest.approx(sb["mse"], rel=1e-6)
    keep = ("epoch", "lr", "lr_first", "train_loss", "test_loss", "snapshot")
    assert [{k: r[k] for k in keep} for r in ra["epochs"]] == [{k: r[k] for k in keep} for r in rb["epochs"]]


def test_an_interrupted_run_resumes_to_the_uninterrupted_state(straight, endpoint, tmp_path, monkeypatch, capsys):
    flags = ["--ckpt", endpoint, "--cycle", CYCLE, "--bn-images", BN_IMAGES, "--num-images", 2, *RUN]
    # killed (Ctrl-C) during epoch 3: the finished epochs and snapshot 1 are kept
    real = fge.train_one_epoch

    def interrupted(model, loss_fn, optimizer, loader, device, precision, epoch, *args):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(model, loss_fn, optimizer, loader, device, precision, epoch, *args)

    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(fge, "train_one_epoch", interrupted)
        assert run_cli("fge", *flags, "--epochs", EPOCHS, "--out", killed) == 130
    assert "--resume" in capsys.readouterr().err
    assert load_checkpoint(killed / "checkpoint.pt", "fge")["epoch"] == 3 and not (killed / "fge.json").exists()
    assert run_cli("fge", *flags, "--epochs", EPOCHS, "--out", killed) == 2  # not without --resume
    assert "--resume" in capsys.readouterr().err
    assert run_cli("fge", "--resume", *RUN, "--out", killed) == 0  # alone: the settings come from the checkpoint
    assert "resuming" in capsys.readouterr().out
    assert_same_run(straight, killed)
    assert [json.loads(r)["epoch"] for r in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(EPOCHS))

    # a finished shorter run trained on with --resume --epochs N
    short = tmp_path / "short"
    assert run_cli("fge", *flags, "--epochs", 2, "--out", short) == 0
    assert read(short)["snapshot_epochs"] == [1]
    assert run_cli("fge", "--resume", "--epochs", EPOCHS, *RUN, "--out", short) == 0
    assert_same_run(straight, short)


def test_a_run_resumes_after_its_endpoint_moved(straight, endpoint, tmp_path, monkeypatch, capsys):
    """As train-curve does: --ckpt NEW is the endpoint the run started from when its old path is gone, its content
    checked against the run's record; without --ckpt the message says to pass it; another network is refused."""
    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "old/endpoint.pt", tmp_path / "new/endpoint.pt"
    old.parent.mkdir(), new.parent.mkdir()
    shutil.copyfile(endpoint, old)
    run = tmp_path / "run"
    assert run_cli("fge", "--ckpt", old, "--cycle", CYCLE, "--bn-images", BN_IMAGES, "--num-images", 2, *RUN,
                   "--epochs", 2, "--out", run) == 0
    old.rename(new)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    other = tmp_path / "other.pt"  # a different network (the straight run's first snapshot) under another name
    shutil.copyfile(straight / "snapshot_1.pt", other)
    for flags, words in [([], ["is no longer there", str(old), "pass --ckpt with its new path"]),
                         (["--ckpt", other], [f"The endpoint {other} is not the file", str(old)])]:
        assert run_cli("fge", "--resume", "--epochs", EPOCHS, *flags, *RUN, "--out", run) == 2, flags
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, (flags, err)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before, flags
    # a relative spelling of the new path: it resumes, and ends where the uninterrupted run ended
    assert run_cli("fge", "--resume", "--ckpt", "new/../new/endpoint.pt", "--epochs", EPOCHS, *RUN,
                   "--out", "run") == 0
    assert_same_run(straight, run)
    assert read(run)["config"]["ckpt"] == str(new)


def test_a_snapshot_starts_fge_itself_with_a_fresh_optimizer(straight, tmp_path, capsys):
    """A snapshot holds no optimizer state (like an exported point): FGE from it starts a fresh Adam, and says so.
    That Adam is torch's default form, as fge always built it (runtime.adam's fused form would change its numbers
    by rounding), also once resumed; one that takes the endpoint's state is runtime.adam's, the form train saved."""
    assert run_cli("fge", "--ckpt", straight / "snapshot_1.pt", "--epochs", 1, "--cycle", 2, "--num-images", 0, *RUN,
                   "--out", tmp_path / "again") == 0
    record = read(tmp_path / "again")
    assert record["optimizer"].startswith("fresh Adam") and "fresh Adam" in capsys.readouterr().out
    assert record["snapshot_epochs"] == [0] and not (tmp_path / "again/reconstructions.png").exists()
    probe = [torch.nn.Parameter(torch.zeros(2))]
    default = _adam_form(torch.optim.Adam(probe, lr=1.0).state_dict())
    assert _adam_form(load_checkpoint(tmp_path / "again/checkpoint.pt", "fge")["optimizer"]) == default
    assert run_cli("fge", "--resume", "--epochs", 2, *RUN, "--out", tmp_path / "again") == 0
    assert _adam_form(load_checkpoint(tmp_path / "again/checkpoint.pt", "fge")["optimizer"]) == default
    tuned = _adam_form(runtime.adam(probe, lr=1.0).state_dict())
    assert _adam_form(load_checkpoint(straight / "checkpoint.pt", "fge")["optimizer"]) == tuned != default


# ----------------------------------------------------------------------------------------------------------
# bad inputs: exit 2, a message naming the problem, nothing written


def test_every_bad_input_is_refused_before_any_work(endpoint, straight, tmp_path, capsys):
    ep = load_checkpoint(endpoint, "endpoint")
    curve = tmp_path / "curve.pt"
    torch.save({"kind": "curve", "curve": {}, "model_config": {}, "args": {}, "epoch": 0, "metrics": [],
                "optimizer": {}}, curve)
    no_lr = tmp_path / "point.pt"  # as export-point writes: no lr, no optimizer state
    torch.save({**ep, "optimizer": {}, "args": {k: v for k, v in ep["args"].items() if k != "lr"}}, no_lr)
    data_dir = tmp_path / "images"
    data_dir.mkdir()
    in_folder = tmp_path / "folder_endpoint.pt"
    torch.save({**ep, "args": {**ep["args"], "dataset": "folder", "data_dir": str(data_dir)}}, in_folder)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = [
        (["--ckpt", endpoint, "--cycle", 3], "--cycle must be an even number"),
        (["--ckpt", endpoint, "--cycle", 0], "--cycle must be at least 2"),
        (["--ckpt", endpoint, "--epochs", 1, "--cycle", 4], "no snapshot would be taken"),
        (["--ckpt", endpoint, "--epochs", 2, "--lr-1", "1e-3", "--lr-2", "1e-2"], "is larger than --lr-1"),
        (["--ckpt", endpoint, "--epochs", 2, "--lr_2", "1"], "--lr-2 1 is larger than --lr-1 0.003"),  # vs the default
        (["--ckpt", curve], "is a curve checkpoint"),
        (["--ckpt", straight / "checkpoint.pt"], "the training state of an FGE run"),
        (["--ckpt", tmp_path / "missing.pt"], "does not exist"),
        (["--ckpt", no_lr], "records no training lr"),
        (["--ckpt", in_folder, "--out", data_dir / "fge"], "inside the data folder"),
        (["--ckpt", endpoint, "--out", a_file], "is a file"),
        (["--epochs", 4], "fge needs --ckpt ENDPOINT"),
        (["--resume", "--epochs", 4], "fge needs --ckpt ENDPOINT"),  # nothing to resume in --out
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        argv = ["fge", *flags, *RUN] + ([] if "--out" in flags else ["--out", out])
        assert run_cli(*argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and "Traceback" not in err, (flags, err)
        assert not out.exists() and not (data_dir / "fge").exists() and a_file.read_text() == "mine", flags

    # a finished run is neither overwritten nor taken back; a contradicting setting is named
    before = {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}
    for flags, message in [
        (["--ckpt", endpoint, "--epochs", EPOCHS], "already holds a finished FGE run (6 epochs, 2 snapshots)"),
        (["--resume", "--epochs", 3], "has already trained 6 epochs"),
        (["--resume", "--cycle", 2], "cycle=4 vs cycle=2"),
        (["--resume", "--ckpt", no_lr], "does not match this run"),
    ]:
        assert run_cli("fge", *flags, *RUN, "--out", straight) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
        if "finished" in message:
            assert "--resume --epochs N" in err
    assert {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()} == before


def test_a_custom_model_needs_its_model_flag_and_one_without_batchnorm_runs(tmp_path, capsys):
    """Code outside aecurves runs only when --model names it (as for every command); a network without BatchNorm
    has no statistics to recompute, and says so."""
    from pathlib import Path

    model = f"{Path(__file__).with_name('ae_models.py')}:mlp_autoencoder"
    tiny = [a for a in SMALL if a not in ("--width", "4")]
    assert run_cli("train", *tiny, "--model", model, "--epochs", 1, "--out", tmp_path / "mlp") == 0
    flags = ["--ckpt", tmp_path / "mlp/checkpoint.pt", "--epochs", 1, "--cycle", 2, "--num-images", 0, *RUN]
    capsys.readouterr()
    assert run_cli("fge", *flags, "--out", tmp_path / "refused") == 2
    assert f"pass --model {model}" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert run_cli("fge", *flags, "--model", model, "--out", tmp_path / "fge") == 0
    record = read(tmp_path / "fge")
    assert not record["bn"]["recomputed"] and any("no BatchNorm" in n for n in record["notes"])
    assert record["snapshots"][0]["bn_images"] == 0 and record["snapshot_epochs"] == [0]


def test_snapshots_left_by_a_run_killed_before_its_first_checkpoint(endpoint, tmp_path, capsys):
    """Refused without --resume; with it, the run starts afresh and retakes them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "snapshot_1.pt").write_bytes(b"half written")
    flags = ["--ckpt", endpoint, "--epochs", 2, "--cycle", 4, "--num-images", 0, *RUN, "--out", out]
    assert run_cli("fge", *flags) == 2
    assert "Pass --resume" in capsys.readouterr().err and (out / "snapshot_1.pt").read_bytes() == b"half written"
    assert run_cli("fge", *flags, "--resume") == 0
    assert load_checkpoint(out / "snapshot_1.pt", "endpoint")["fge_snapshot"]["epoch"] == 1
