"""The CUDA paths, which only a GPU can run (skipped elsewhere): the uint8 image cache on the device, bf16 autocast
in training, the evaluation engine's automatic points per call, and train/eval on CUDA against the CPU."""

import json

import pytest
import torch

from conftest import TINY, run_cli

pytestmark = pytest.mark.cuda


def test_batches_are_cut_on_the_device_from_the_uint8_cache():
    from aecurves.data import BatchLoader, load_data

    data = load_data("synthetic", image_size=16, limit=64, progress=False)
    loader = BatchLoader(data.train, 16, torch.device("cuda"), shuffle=True, seed=1)
    batch = next(iter(loader))
    assert batch.device.type == "cuda" and batch.dtype == torch.float32 and 0 <= batch.min() <= batch.max() <= 1
    expected = data.train.float().div(255)
    assert any(torch.equal(batch[0].cpu(), img) for img in expected)


def test_bf16_training_on_cuda_reaches_the_fp32_loss(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert run_cli("train", *TINY, "--epochs", 3, "--seed", 1, "--device", "cuda", "--precision", precision,
                       "--out", out) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["precision"] == precision
        losses[precision] = rows[-1]["test_loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_points_per_call_is_chosen_from_the_free_memory():
    from aecurves.metrics import MAX_POINTS_PER_CALL, choose_points_per_call
    from aecurves.models import ConvAutoencoder

    device = torch.device("cuda")
    net = ConvAutoencoder(channels=3, image_size=32, latent_dim=16, width=8).to(device)
    chosen = choose_points_per_call(0, device, net, dict(net.named_parameters()), torch.rand(64, 3, 32, 32,
                                                                                          device=device))
    assert 1 <= chosen <= MAX_POINTS_PER_CALL and chosen & (chosen - 1) == 0
    assert choose_points_per_call(3, device, net, dict(net.named_parameters()), None) == 3


def test_eval_curve_on_cuda_equals_the_cpu(tiny_endpoints, tmp_path):
    common = ["eval-curve", "--segment", *tiny_endpoints, "--num-points", 3, "--bn-images", 64, "--train-images", 64,
              "--num-images", 0, "--vgg-weights", "random", "--no-progress"]
    for device in ("cpu", "cuda"):
        assert run_cli(*common, "--device", device, "--out", tmp_path / device) == 0
    cpu, gpu = (json.loads((tmp_path / d / "eval.json").read_text())["series"] for d in ("cpu", "cuda"))
    for key in ("te_loss", "tr_loss", "te_psnr"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-4), key
