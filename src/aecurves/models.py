"""Autoencoders: the built-in ConvAutoencoder, and any other one named by a factory (`--model MODULE:FACTORY`).

A model is built from an architecture record (`arch`): the factory's name, its extra keyword arguments, and
the settings every factory receives. Checkpoints store that record, so a network can be rebuilt from them.
Models are plain nn.Modules, so curves run them through functional_call.
"""

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

from aecurves.config import BUILTIN_MODEL, MODEL_SIGNATURE
from aecurves.errors import UserError

# Settings that fix the architecture; a checkpoint records them and loading compares them.
ARCH_KEYS = ("model", "model_kwargs", "channels", "image_size", "latent_dim", "width")


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvAutoencoder(nn.Module):
    """Strided convolutions down to 4x4, a linear bottleneck of `latent_dim`, transposed convolutions back.

    With image_size 64 and width 32 the encoder's channels are 32-64-128-256 (each stage halves the
    side), the decoder mirrors them, and the output passes through a sigmoid so it lies in [0, 1].
    """

    def __init__(self, channels: int = 3, image_size: int = 64, latent_dim: int = 128, width: int = 32):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.channels, self.image_size, self.latent_dim, self.width = channels, image_size, latent_dim, width
        stages = int(math.log2(image_size // 4))
        widths = [min(width * 2**i, width * 8) for i in range(stages)]

        enc, cin = [], channels
        for w in widths:
            enc.append(_down(cin, w))
            cin = w
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(cin * 16, latent_dim))

        self.decoder_input = nn.Linear(latent_dim, cin * 16)
        dec = [_up(widths[i], widths[i - 1]) for i in range(stages - 1, 0, -1)]
        dec.append(nn.ConvTranspose2d(widths[0], channels, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)
        self._bottom = (cin, 4, 4)

    def config(self) -> dict:
        """The architecture record that rebuilds this network with build_model."""
        return {"model": BUILTIN_MODEL, "model_kwargs": {}, "channels": self.channels, "image_size": self.image_size,
                "latent_dim": self.latent_dim, "width": self.width}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_input(z).view(z.shape[0], *self._bottom)
        return torch.sigmoid(self.decoder(torch.relu(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def is_builtin(spec: str) -> bool:
    return spec.split(":")[0].split(".")[0] == "aecurves"


def arch_of(args: dict) -> dict:
    """The architecture record of a config or checkpoint dict; one written before --model existed is the
    built-in model's. `width` belongs to the built-in model only."""
    model = args.get("model") or BUILTIN_MODEL
    return {"model": model, "model_kwargs": dict(args.get("model_kwargs") or {}), "channels": args["channels"],
            "image_size": args["image_size"], "latent_dim": args["latent_dim"],
            "width": args.get("width") if model == BUILTIN_MODEL else None}


def load_factory(spec: str):
    """The callable named by MODULE:FACTORY (an importable module) or FILE.py:FACTORY."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"--model takes MODULE:FACTORY or FILE.py:FACTORY (e.g. mypackage.models:build), got "
                        f"{spec!r}.")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"--model {spec}: the file {path} does not exist.")
            module_name = f"aecurves_user_model_{abs(hash(str(path)))}"
            module = sys.modules.get(module_name)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--model {spec}: could not import {where} ({type(exc).__name__}: {exc}). Pass an "
                        "importable module (on PYTHONPATH) or a path to a .py file.") from None
    factory = module
    for part in name.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UserError(f"--model {spec}: {where} has no callable named {name}.")
    return factory


def build_model(arch: dict) -> nn.Module:
    """The network an architecture record describes, checked to map images to images of the same shape."""
    arch = arch_of(arch)
    kwargs = {"channels": arch["channels"], "image_size": arch["image_size"], "latent_dim": arch["latent_dim"]}
    if arch["model"] == BUILTIN_MODEL:
        kwargs["width"] = arch["width"]
    kwargs.update(arch["model_kwargs"])
    factory = load_factory(arch["model"])
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--model {arch['model']} could not be built with {kwargs} ({type(exc).__name__}: {exc}). "
                        f"A factory is called as {MODEL_SIGNATURE}; pass its own arguments with --model-kwargs.") \
            from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {arch['model']} returned a {type(model).__name__}, not a torch.nn.Module.")
    check_shape(model, arch)
    return model


@torch.no_grad()
def check_shape(model: nn.Module, arch: dict) -> None:
    shape = (2, arch["channels"], arch["image_size"], arch["image_size"])
    was_training = model.training
    model.eval()
    try:
        out = model(torch.full(shape, 0.5))  # no random draw: seeded runs stay as they were
    except Exception as exc:
        raise UserError(f"--model {arch['model']} fails on a batch of shape {shape} ({type(exc).__name__}: {exc}); "
                        "an autoencoder takes images [batch, channels, size, size] with values in [0, 1].") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {arch['model']} maps images of shape {shape} to {got}; an autoencoder must return "
                        "images of the shape it was given.")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
