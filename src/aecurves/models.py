"""Autoencoders: the built-in ConvAutoencoder, ConvVAE and KLAutoencoder, and any other one named by a factory
(`--model MODULE:FACTORY`).

A network maps images [batch, channels, size, size] to either their reconstruction (an autoencoder) or a pair
(reconstruction, kl), kl each image's KL divergence from the prior, shape [batch] (a VAE). A VAE samples its latent
in training mode and is deterministic in eval mode (the posterior's mean); build_model checks what it can of this
contract before any work (losses.Objective is what trains and measures either kind).

A model is built from an architecture record (`arch`): the factory's name, its extra keyword arguments, and
the settings every factory receives. Checkpoints store that record, so a network can be rebuilt from them.
Models are plain nn.Modules, so curves run them through functional_call.
"""

import hashlib
import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

from aecurves.config import (
    BUILTIN_MODEL,
    CONV_VAE,
    KL_AUTOENCODER,
    MODEL_SIGNATURE,
    SIGNATURE_KEYS,
    check_model_kwargs,
    takes_width,
)
from aecurves.errors import UserError

# Settings that fix the architecture; a checkpoint records them and loading compares them.
ARCH_KEYS = ("model", "model_kwargs", "channels", "image_size", "latent_dim", "width")


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


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


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) of each row, in nats: ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class ConvVAE(ConvAutoencoder):
    """ConvAutoencoder with a Gaussian latent of the same size: the encoder's last Linear gives μ and log σ²
    (2·latent_dim outputs, split in halves), training samples z = μ + σ·ε, eval mode decodes μ. Returns
    (reconstruction, kl), kl each image's KL divergence from N(0, I) in nats."""

    def __init__(self, channels: int = 3, image_size: int = 64, latent_dim: int = 128, width: int = 32):
        super().__init__(channels, image_size, latent_dim, width)
        last = self.encoder[-1]
        self.encoder[-1] = nn.Linear(last.in_features, 2 * latent_dim)

    def config(self) -> dict:
        return {**super().config(), "model": CONV_VAE}

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of each image's latent."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decode(z), gaussian_kl(mu, logvar)


def KLAutoencoder(**kwargs):  # noqa: N802 (named as the class it builds: --model aecurves.models:KLAutoencoder)
    """diffusers' AutoencoderKL as an aecurves VAE (aecurves.kl_autoencoder; needs the `diffusers` extra)."""
    from aecurves.kl_autoencoder import KLAutoencoder as build

    return build(**kwargs)


# The factories built into aecurves, by the exact name a checkpoint records. A checkpoint that names one of these
# is rebuilt freely; any other name, however it is spelled, is code outside this table and is imported only when
# the user passes the same --model on the command line (checkpoint.trusted_arch).
BUILTIN_FACTORIES = {BUILTIN_MODEL: ConvAutoencoder, CONV_VAE: ConvVAE, KL_AUTOENCODER: KLAutoencoder}


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec in BUILTIN_FACTORIES


def arch_of(args: dict) -> dict:
    """The architecture record of a config or checkpoint dict, its types checked (a file may hold anything); one
    written before --model existed is the built-in model's. `width` belongs to the built-in model only."""
    model = args.get("model") or BUILTIN_MODEL
    kwargs = args.get("model_kwargs") or {}
    sizes = {k: args.get(k) for k in SIGNATURE_KEYS}
    width = args.get("width") if takes_width(model) else None
    wrong = [k for k, v in sizes.items() if not _is_count(v)]
    if not isinstance(model, str):
        wrong.append("model")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        wrong.append("model_kwargs")
    if takes_width(model) and not _is_count(width):
        wrong.append("width")
    if wrong:
        raise UserError(f"The architecture record is incomplete or damaged: {', '.join(wrong)} "
                        f"({', '.join(f'{k}={args.get(k)!r}' for k in wrong)}).")
    return {"model": model, "model_kwargs": dict(kwargs), **sizes, "width": width}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_factory(spec: str):
    """The callable named by MODULE:NAME (an importable module) or FILE.py:NAME. NAME is a plain identifier, a
    class or function defined in that module: no attribute walk (`module:a.b`) and no name the module merely
    imported, so a spec can only reach code its module defines."""
    if is_builtin(spec):
        return BUILTIN_FACTORIES[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(f"--model takes MODULE:FACTORY or FILE.py:FACTORY, FACTORY a name defined in that module "
                        f"(e.g. mypackage.models:build), got {spec!r}.")
    module = _import(spec, where)
    factory = vars(module).get(name)
    if not callable(factory):
        raise UserError(f"--model {spec}: {where} has no callable named {name}.")
    if getattr(factory, "__module__", None) != module.__name__:
        raise UserError(f"--model {spec}: {name} is not defined in {where} but imported into it (from "
                        f"{getattr(factory, '__module__', None) or 'elsewhere'}); name the module that defines it.")
    return factory


def _import(spec: str, where: str):
    """The module of a --model spec: a .py file by path, or a module by its dotted name."""
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if path.is_dir():
            raise UserError(f"--model {spec}: {path} is a folder; pass a .py file (FILE.py:FACTORY) or a module.")
        if not path.is_file():
            raise UserError(f"--model {spec}: the file {path} does not exist.")
        module_name = f"aecurves_user_model_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    else:
        if not all(part.isidentifier() for part in where.split(".")):
            raise UserError(f"--model {spec}: {where!r} is neither a module name (a.b.c) nor a .py file.")
        module_name, path = where, None
    if module_name in sys.modules:
        return sys.modules[module_name]
    try:
        if path is None:
            return importlib.import_module(where)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
        return module
    except KeyboardInterrupt:
        sys.modules.pop(module_name, None)
        raise
    except BaseException as exc:  # sys.exit(), GeneratorExit or any BaseException while imported is a failure too
        sys.modules.pop(module_name, None)
        raise UserError(f"--model {spec}: could not import {where} ({type(exc).__name__}: {exc}). Pass an "
                        "importable module (on PYTHONPATH) or a path to a .py file.") from None


def factory_kwargs(arch: dict) -> dict:
    """The keyword arguments of the factory call: the flags' sizes, then --model-kwargs, which may not restate one
    of them."""
    kwargs = {k: arch[k] for k in SIGNATURE_KEYS}
    if takes_width(arch["model"]):
        kwargs["width"] = arch["width"]
    check_model_kwargs(arch["model"], arch["model_kwargs"], kwargs)
    return {**kwargs, **arch["model_kwargs"]}


def build_model(arch: dict) -> nn.Module:
    """The network an architecture record describes, checked to have parameters and to map images to images of the
    same shape. Whatever the factory does wrong (raises, exits, returns something else, changes torch's default
    dtype) is a UserError naming it."""
    arch = arch_of(arch)
    kwargs = factory_kwargs(arch)
    factory = load_factory(arch["model"])
    dtype = torch.get_default_dtype()
    try:
        model = factory(**kwargs)
    except (KeyboardInterrupt, UserError):  # an interrupt keeps its meaning (exit 130); a UserError says it all
        raise
    except BaseException as exc:  # SystemExit, GeneratorExit, any BaseException subclass: a failure to build
        hint = (f" A factory is called as {MODEL_SIGNATURE}; pass its own arguments with --model-kwargs."
                if isinstance(exc, TypeError) else "")
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise UserError(f"--model {arch['model']} could not be built with {kwargs} ({detail}).{hint}") from None
    finally:
        changed = torch.get_default_dtype() != dtype
        torch.set_default_dtype(dtype)
    if changed:
        raise UserError(f"--model {arch['model']} changed torch's default dtype while building the network; a "
                        "factory must leave global settings as it found them (build in float32, or convert the "
                        "model itself).")
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {arch['model']} returned a {type(model).__name__}, not a torch.nn.Module.")
    if num_parameters(model) == 0:
        raise UserError(f"--model {arch['model']} returned a network without parameters: there is no weight space "
                        "to connect two networks in.")
    check_shape(model, arch)
    return model


CONTRACT = ("an autoencoder must return images of the shape it was given, and a VAE a pair (reconstruction, kl) "
            "with kl each image's KL divergence, shape [batch]")


@torch.no_grad()
def check_shape(model: nn.Module, arch: dict) -> None:
    """The network keeps the contract (module docstring) on a batch of two images, in eval mode: the output's
    shapes, and two calls giving the same output (a VAE decodes its posterior's mean there, not a sample)."""
    shape = (2, arch["channels"], arch["image_size"], arch["image_size"])
    was_training = model.training
    model.eval()
    x = torch.linspace(0, 1, math.prod(shape)).view(shape)  # no random draw: seeded runs stay as they were
    try:
        out = model(x)
        again = model(x)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise UserError(f"--model {arch['model']} fails on a batch of shape {shape} ({type(exc).__name__}: {exc}); "
                        "an autoencoder takes images [batch, channels, size, size] with values in [0, 1].") from None
    finally:
        model.train(was_training)
    wrong = output_problem(out, shape)
    if wrong:
        raise UserError(f"--model {arch['model']} maps images of shape {shape} to {wrong}; {CONTRACT}.")
    if not all(torch.equal(a, b) for a, b in zip(_flat(out), _flat(again), strict=True)):
        raise UserError(f"--model {arch['model']} gives two different outputs for the same images in eval mode; a "
                        "network must be deterministic there (a VAE decodes its posterior's mean or mode in eval "
                        "mode and samples only in training mode), or no loss along a path can be measured.")


def output_problem(out, shape: tuple) -> str:
    """What is wrong with a network's output for images of `shape`, or '' when it keeps the contract."""
    if isinstance(out, torch.Tensor):
        return "" if tuple(out.shape) == shape else f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(f"shape {tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__
                          for o in out)
        if (len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out) and tuple(out[0].shape) == shape
                and tuple(out[1].shape) == shape[:1] and out[1].is_floating_point()):
            return ""
        return f"a {type(out).__name__} of {len(out)} ({kinds})"
    return f"a {type(out).__name__}"


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def is_vae(model: nn.Module, arch: dict) -> bool:
    """Whether the network returns (reconstruction, kl): one eval-mode call on a batch of two."""
    shape = (2, arch["channels"], arch["image_size"], arch["image_size"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return isinstance(model(torch.full(shape, 0.5)), (tuple, list))
    finally:
        model.train(was_training)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
