"""Tests for aecurves.align: the aligned endpoint computes B's function, a permuted copy is recovered exactly,
aligning to oneself changes nothing, and bad input is a message."""

import json

import pytest
import torch

from aecurves.checkpoint import load_checkpoint, save_checkpoint
from aecurves.models import build_model
from aecurves.records import EvalRecord
from aecurves.symmetry import find_groups, permute

from conftest import run_cli

FAST = ["--images", 128, "--no-progress", "--steps", 5]


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
                   *FAST, "--out", tmp_path / "aligned.pt") == 0
    want, got = load_checkpoint(a, "endpoint")["model"], load_checkpoint(tmp_path / "aligned.pt", "endpoint")
    assert all(torch.allclose(want[k].float(), got["model"][k].float(), atol=1e-6) for k in want)
    assert got["aligned_to"]["units_moved"] > 0 and got["aligned_to"]["max_output_difference"] <= 1e-5
    # the straight line from A to its aligned copy is A all along: no barrier
    assert run_cli("eval-curve", "--segment", a, tmp_path / "aligned.pt", "--num-points", 3, "--bn-images", 64,
                   "--train-images", 64, "--num-images", 0, "--vgg-weights", "random", "--no-progress",
                   "--out", tmp_path / "ev") == 0
    summary = EvalRecord.from_json(json.loads((tmp_path / "ev/eval.json").read_text())).flat_summary()
    assert abs(summary["te_barrier"]) < 1e-6


@pytest.mark.parametrize("method, latent, at", [("activations", "orthogonal", "post"), ("weights", "none", "post"),
                                               ("activations", "permutation", "pre")])
def test_the_aligned_endpoint_computes_bs_function_and_trains_a_curve(method, latent, at, tiny_endpoints, tmp_path):
    a, b = tiny_endpoints
    out = tmp_path / "aligned.pt"
    assert run_cli("align", "--init_start", a, "--init_end", b, "--method", method, "--latent", latent,
                   "--match-at", at, *FAST, "--out", out) == 0
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
    code = run_cli("align", "--init_start", a, "--init_end", b, "--latent", "linear", *FAST, "--out", out)
    if code == 0:
        assert load_checkpoint(out, "endpoint")["aligned_to"]["max_output_difference"] <= 1e-5
    else:
        assert code == 2 and "ill-conditioned" in capsys.readouterr().err and not out.exists()


def test_aligning_an_endpoint_to_itself_changes_nothing(tiny_endpoints, tmp_path):
    a = tiny_endpoints[0]
    for method in ("weights", "activations"):
        out = tmp_path / f"{method}.pt"
        assert run_cli("align", "--init_start", a, "--init_end", a, "--method", method, "--latent", "permutation",
                       *FAST, "--out", out) == 0
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
