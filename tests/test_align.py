"""Tests for aecurves.align: the aligned endpoint computes B's function, a permuted copy is recovered exactly,
aligning to oneself changes nothing, and bad input is a message."""

import json

import pytest
import torch

from aecurves.checkpoint import load_checkpoint, save_checkpoint
from aecurves.config import ACTIVATION_METHODS
from aecurves.models import build_model
from aecurves.records import EvalRecord
from aecurves.symmetry import find_groups, permute

from conftest import run_cli


def fast(method: str = "activations", latent: str = "permutation") -> list:
    """Quick settings that `method` uses (align refuses one its method would ignore)."""
    images = method in ACTIVATION_METHODS or latent in ("orthogonal", "linear")
    return [*(["--images", 128] if images else []), *(["--steps", 5] if method == "learned" else []), "--no-progress"]


def permuted_copy(path, out, seed=0):
    """Endpoint `path` with every group (the latent included) randomly permuted: the same function."""
    state = load_checkpoint(path, "endpoint")
    net = build_model(state["args"])
    net.load_state_dict(state["model"])
    size = state["args"]["image_size"]
    groups = find_groups(net, torch.rand(2, state["args"]["channels"], size, size))
    g = torch.Generator().manual_seed(seed)
    perms = {grp.name: torch.randperm(grp.size, generator=g) for grp in groups}
    save_checkpoint(out, {**state, "model": permute(net.state_dict(), groups, perms)})
    return out


@pytest.mark.parametrize("method", ["weights", "weights-raw", "activations", "both", "mixed", "learned"])
def test_every_method_recovers_a_permuted_copy_exactly(method, tiny_endpoints, tmp_path):
    a = tiny_endpoints[0]
    b = permuted_copy(a, tmp_path / "b.pt")
    assert run_cli("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", "permutation",
                   *fast(method), "--out", tmp_path / "aligned.pt") == 0
    want, got = load_checkpoint(a, "endpoint")["model"], load_checkpoint(tmp_path / "aligned.pt", "endpoint")
    assert all(torch.allclose(want[k].float(), got["model"][k].float(), atol=1e-6) for k in want)
    assert got["aligned_to"]["units_moved"] > 0 and got["aligned_to"]["max_output_difference"] <= 1e-5
    # the straight line from A to its aligned copy is A all along: no barrier
    assert run_cli("eval-curve", "--segment", a, tmp_path / "aligned.pt", "--num-points", 3, "--bn-images", 64,
                   "--train-images", 64, "--num-images", 0, "--vgg-weights", "random", "--no-progress",
                   "--out", tmp_path / "ev") == 0
    summary = EvalRecord.from_json(json.loads((tmp_path / "ev/eval.json").read_text())).flat_summary()
    assert abs(summary["te_barrier"]) < 1e-6


@pytest.mark.parametrize("method, latent, at", [("activations", "orthogonal", "post"), ("weights", "none", "pre"),
                                               ("activations", "permutation", "pre")])
def test_the_aligned_endpoint_computes_bs_function_and_trains_a_curve(method, latent, at, tiny_endpoints, tmp_path):
    a, b = tiny_endpoints
    out = tmp_path / "aligned.pt"
    assert run_cli("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", latent,
                   "--match-at", at, *fast(method, latent), "--out", out) == 0
    record = load_checkpoint(out, "endpoint")
    assert record["aligned_to"]["max_output_difference"] <= 1e-5 and record["aligned_to"]["method"] == method
    assert record["optimizer"] == {}  # B's Adam moments are in the old order
    if latent == "none":
        assert not torch.equal(record["model"]["decoder_input.weight"].sum(0),
                               load_checkpoint(a, "endpoint")["model"]["decoder_input.weight"].sum(0))
    assert run_cli("train-curve", "--init_start", a, "--init_end", out, "--fix-start", "--fix-end", "--epochs", 1,
                   "--batch-size", 32, "--bn-images", 64, "--no-progress", "--dir", tmp_path / "curve") == 0


def test_a_least_squares_latent_map_keeps_the_function_or_is_refused(tiny_endpoints, tmp_path, capsys):
    """An unconstrained map can be ill-conditioned: float32 then cannot keep B's function within 1e-5."""
    a, b = tiny_endpoints
    out = tmp_path / "aligned.pt"
    code = run_cli("align", "--init_start", a, "--init_end", b, "--latent", "linear", *fast(), "--out", out)
    if code == 0:
        assert load_checkpoint(out, "endpoint")["aligned_to"]["max_output_difference"] <= 1e-5
    else:
        assert code == 2 and "ill-conditioned" in capsys.readouterr().err and not out.exists()


def test_aligning_an_endpoint_to_itself_changes_nothing(tiny_endpoints, tmp_path):
    a = tiny_endpoints[0]
    for method in ("weights", "activations"):
        out = tmp_path / f"{method}.pt"
        assert run_cli("align", "--init_start", a, "--init_end", a, "--method", method, "--latent", "permutation",
                       *fast(method), "--out", out) == 0
        assert load_checkpoint(out, "endpoint")["aligned_to"]["units_moved"] == 0, method


def test_bad_input(tiny_endpoints, tmp_path, capsys):
    a, b = tiny_endpoints
    assert run_cli("align", "--init_start", a, "--init_end", b, "--out", b) == 2
    assert "one of the endpoints" in capsys.readouterr().err
    (tmp_path / "mine.pt").write_text("mine")
    assert run_cli("align", "--init_start", a, "--init_end", b, "--out", tmp_path / "mine.pt") == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "mine.pt").read_text() == "mine"
    odd = load_checkpoint(b, "endpoint")
    odd["args"]["latent_dim"] = 99
    save_checkpoint(tmp_path / "odd.pt", odd)
    assert run_cli("align", "--init_start", a, "--init_end", tmp_path / "odd.pt", "--out", tmp_path / "x.pt") == 2
    assert "do not match" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_activation_matching_reads_units_before_or_after_the_activation(tiny_endpoints):
    from aecurves.commands.align import _unit_activations

    state = load_checkpoint(tiny_endpoints[0], "endpoint")
    net = build_model(state["args"])
    net.load_state_dict(state["model"])
    size = state["args"]["image_size"]
    x = torch.rand(4, state["args"]["channels"], size, size)
    groups = [g for g in find_groups(net, x) if g.name == "encoder.0.0"]
    net.eval()
    with torch.no_grad():
        conv = net.encoder[0][0](x)
        post = net.encoder[0][2](net.encoder[0][1](conv))
    for at, want in (("pre", conv), ("post", post)):
        got = _unit_activations(net, groups, [x], at)["encoder.0.0"]
        assert torch.allclose(got, want.transpose(0, 1).reshape(groups[0].size, -1).double(), atol=1e-6), at


def test_the_learned_permutation_keeps_its_budget_and_is_never_worse_on_its_monitor(tiny_endpoints, tmp_path):
    """Git Re-Basin's straight-through estimator: it starts from activation matching, which is scored first, and
    keeps the best permutation by the midpoint's loss, so the kept one is never worse than where it began."""
    a, b = tiny_endpoints
    out = tmp_path / "learned.pt"
    assert run_cli("align", "--init_start", a, "--init_end", b, "--method", "learned", "--images", 128, "--steps", 6,
                   "--no-progress", "--out", out) == 0
    record = load_checkpoint(out, "endpoint")["aligned_to"]
    learned = record["learned"]
    assert learned["steps"] == 6 and learned["history"][0]["step"] == 0
    assert learned["history"][-1]["step"] in (0, 6)  # scored at the end only if the permutation changed
    assert learned["best_midpoint_loss"] <= learned["start_midpoint_loss"]
    assert learned["best_midpoint_loss"] == min(h["midpoint_loss"] for h in learned["history"])
    assert record["max_output_difference"] <= 1e-5


def test_the_midpoint_monitor_is_the_loss_of_the_averaged_network_with_bn_recomputed(tiny_endpoints):
    from aecurves.commands.align import _MidpointMonitor
    from aecurves.curves import recompute_bn
    from aecurves.losses import make_loss

    states = [load_checkpoint(p, "endpoint") for p in tiny_endpoints]
    nets = []
    for s in states:
        net = build_model(s["args"])
        net.load_state_dict(s["model"])
        nets.append(net)
    size = states[0]["args"]["image_size"]
    x = torch.rand(8, states[0]["args"]["channels"], size, size)
    groups = find_groups(nets[1], x[:2])
    perms = {g.name: torch.randperm(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    monitor = _MidpointMonitor(nets[0], nets[0].state_dict(), nets[1].state_dict(), groups, [x[:4], x[4:]],
                               make_loss("mse"))
    # by hand: B permuted, averaged with A, BN statistics recomputed on the same batches, MSE in eval mode
    b = permute(nets[1].state_dict(), groups, perms)
    mid = build_model(states[0]["args"])
    mid.load_state_dict({k: (0.5 * (nets[0].state_dict()[k] + b[k]) if k in dict(mid.named_parameters()) else v)
                         for k, v in mid.state_dict().items()})
    recompute_bn(mid, dict(mid.named_parameters()), [x[:4], x[4:]])
    with torch.no_grad():
        want = float(((mid.eval()(x) - x) ** 2).mean())
    assert monitor(perms) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# issue 27: what align and export-point write, and what they refuse before any work


def _curve_of(endpoints, out):
    """A curve checkpoint between the tiny endpoints, its middle bend on the segment (no training needed)."""
    from aecurves.curves import Curve
    from aecurves.models import arch_of

    a, b = (load_checkpoint(p, "endpoint") for p in endpoints)
    curve = Curve(build_model(a["args"]), "bezier", 3, True, True)
    curve.set_endpoints(a["model"], b["model"])
    curve.init_linear()
    save_checkpoint(out, {"kind": "curve", "curve": curve.curve_state(), "model_config": arch_of(a["args"]),
                          "optimizer": {}, "epoch": 1, "metrics": [],
                          "args": {**a["args"], "init_start": str(endpoints[0]), "init_end": str(endpoints[1])}})
    return out


def _taken_meanwhile(monkeypatch, path):
    """Another run takes `path` just after this run began writing its temporary for it (after every check)."""
    from aecurves import files

    real = files.new_temp_file

    def new_temp_file(folder, prefix, suffix=".tmp"):
        if prefix == path.name:
            path.write_bytes(b"the other run's file")
        return real(folder, prefix, suffix)

    monkeypatch.setattr(files, "new_temp_file", new_temp_file)


@pytest.mark.parametrize("command", ["align", "export-point checkpoint", "export-point safetensors",
                                     "export-point sidecar"])
def test_a_file_that_appears_while_writing_is_never_replaced(command, tiny_endpoints, tmp_path, monkeypatch, capsys):
    """Two runs to one --out started together both pass the check for an existing file: the second to finish must
    fail loudly, leave the first one's file byte for byte, and leave no temporary (nor half of a pair) behind."""
    out = tmp_path / "out" / "result.pt"
    out.parent.mkdir()
    taken = out.with_name(out.name + ".json") if command == "export-point sidecar" else out
    if command == "align":
        argv = ["align", "--init_start", tiny_endpoints[0], "--init_end", tiny_endpoints[1], "--method", "weights"]
    else:
        fmt = "checkpoint" if command == "export-point checkpoint" else "safetensors"
        argv = ["export-point", "--ckpt", _curve_of(tiny_endpoints, tmp_path / "curve.pt"), "--t", 0.5,
                "--bn-images", 0, "--format", fmt]
    _taken_meanwhile(monkeypatch, taken)
    assert run_cli(*argv, "--no-progress", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{taken} appeared while this run was writing it" in err and "Traceback" not in err, err
    assert taken.read_bytes() == b"the other run's file"
    assert sorted(p.name for p in out.parent.iterdir()) == [taken.name]


FOLDER_SPELLINGS = ["{d}/new/.", "{d}/new/..", "{d}/new/./", "{d}/new/./.", "{d}/new/", "{d}", ".", "..", "./"]


@pytest.mark.parametrize("spelling", FOLDER_SPELLINGS)
def test_an_out_that_names_a_folder_is_refused(spelling, tiny_endpoints, tmp_path, monkeypatch, capsys):
    """Path() drops a trailing '.', so `--out DIR/new/.` once wrote a file named `new`: every spelling of a folder
    is refused, before any work, and nothing appears."""
    work = tmp_path / "work" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    curve = _curve_of(tiny_endpoints, tmp_path / "curve.pt")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = spelling.format(d=tmp_path / "work")
    for argv in (["align", "--init_start", tiny_endpoints[0], "--init_end", tiny_endpoints[1]],
                 ["export-point", "--ckpt", curve, "--t", 0.5, "--bn-images", 0]):
        assert run_cli(*argv, "--no-progress", "--out", out) == 2, argv[0]
        err = capsys.readouterr().err
        assert f"--out {out} is a folder" in err and "writes one file" in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("method, latent", [("activations", "permutation"), ("both", "permutation"),
                                            ("mixed", "permutation"), ("learned", "permutation"),
                                            ("weights", "orthogonal"), ("activations", "linear")])
def test_every_method_works_at_the_minimum_of_images_and_is_refused_below(method, latent, tiny_endpoints, tmp_path,
                                                                         capsys):
    """--images 1 once crashed every method (one sample of a Linear unit has no correlation): 2 is the minimum,
    and --latent linear needs as many images as the latent size (16 here) to determine its map."""
    from aecurves.config import MIN_ALIGN_IMAGES

    a, b = tiny_endpoints
    least = 16 if latent == "linear" else MIN_ALIGN_IMAGES
    flags = ["--init_start", a, "--init_end", b, "--method", method, "--latent", latent, "--no-progress",
             *(["--steps", 3] if method == "learned" else [])]
    assert run_cli("align", *flags, "--images", least - 1, "--out", tmp_path / "below.pt") == 2
    err = capsys.readouterr().err
    assert (f"it needs at least {least}" if latent == "linear" else f"--images must be at least {least}") in err
    assert "Traceback" not in err and not (tmp_path / "below.pt").exists()
    code = run_cli("align", *flags, "--images", least, "--out", tmp_path / "aligned.pt")
    if latent == "linear" and code == 2:  # determined, but maybe too ill-conditioned for float32: said so
        assert "ill-conditioned" in capsys.readouterr().err
        return
    assert code == 0
    record = load_checkpoint(tmp_path / "aligned.pt", "endpoint")["aligned_to"]
    assert record["images"] == least and record["max_output_difference"] <= 1e-5


IGNORED = [  # a setting and the method (and latent map) that would ignore it
    (["--alpha", 0.3], "activations", "permutation", "--method mixed"),
    (["--steps", 5], "mixed", "permutation", "--method learned"),
    (["--ste-lr", 0.01], "both", "permutation", "--method learned"),
    (["--images", 64], "weights", "permutation", "--method activations, both, mixed or learned, or --latent "
                                                 "orthogonal or linear"),
    (["--match-at", "post"], "weights-raw", "orthogonal", "--method activations, both, mixed or learned"),
    (["--seed", 3], "activations", "permutation", "--method weights, weights-raw, both, mixed or learned"),
    (["--vgg-weights", "random"], "weights", "permutation", "--method learned"),
]


@pytest.mark.parametrize("setting, method, latent, wanted", IGNORED)
def test_a_setting_the_method_ignores_is_refused(setting, method, latent, wanted, tiny_endpoints, tmp_path, capsys):
    a, b = tiny_endpoints
    assert run_cli("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", latent, *setting,
                   "--out", tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert f"{setting[0]} {setting[1]} would be ignored with --method {method}" in err, err
    assert f"it is used only with {wanted}." in err and not (tmp_path / "x.pt").exists()


def test_huge_but_finite_weights_are_refused_naming_the_layer_group(tiny_endpoints, tmp_path, capsys):
    """Weights ×1e30 in two layers are finite in float32, but the activations overflow: activation matching has no
    scores for that group, and says which, instead of scipy's traceback."""
    state = load_checkpoint(tiny_endpoints[1], "endpoint")
    for key in ("encoder.0.0.weight", "encoder.1.0.weight", "encoder.2.0.weight"):
        state["model"][key] = state["model"][key] * 1e30
    save_checkpoint(tmp_path / "huge.pt", state)
    assert run_cli("align", "--init_start", tiny_endpoints[0], "--init_end", tmp_path / "huge.pt", "--images", 64,
                   "--no-progress", "--out", tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert "the matching scores of the units of encoder." in err and "not finite" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
