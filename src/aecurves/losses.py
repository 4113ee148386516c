"""Reconstruction losses (mean squared error, a perceptual loss on frozen VGG16 features) and the objective a
network is trained and measured with.

A network's output is either its reconstruction (an autoencoder) or a pair (reconstruction, kl) with each image's
KL divergence from the prior, shape [batch] (a VAE; split_output). For a VAE the objective is

    objective = distortion + β · KL / D

with `distortion` the reconstruction loss (a mean over the D = channels·height·width values of each image, and
over the images), KL each image's KL divergence in nats, summed over the latent dimensions (its mean over the
images is the *rate*), and β = --kl-weight. With the MSE loss and β = 1 this is the negative ELBO of a Gaussian
decoder N(x̂, σ²I) with σ² = 1/2, divided by D and up to a constant: −log p(x|z) = ‖x − x̂‖²/(2σ²) + const. A
β-VAE written as ‖x − x̂‖²/(2σ²) + β'·KL is --kl-weight 2σ²·β' here; one written with a summed squared error and
no σ (Higgins et al.'s Gaussian case, σ² = 1/2) is --kl-weight β'. An autoencoder's objective is its distortion,
bit for bit.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aecurves.config import LOSSES
from aecurves.errors import UserError

# Indices in torchvision's vgg16().features right after relu1_2, relu2_2, relu3_3 and relu4_3.
VGG_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MSELoss(nn.Module):
    perceptual = False
    description = "mean squared error"

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon.float(), target.float())

    def per_image(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each image's loss: their mean is forward's value."""
        return (recon.float() - target.float()).pow(2).flatten(1).mean(1)


def _vgg_weights_file() -> Path:
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name


def vgg_missing_message(reason: str = "") -> str:
    from torchvision.models import VGG16_Weights

    return (
        "The VGG16 ImageNet weights for the perceptual loss are not available"
        + (f" ({reason})" if reason else "")
        + f". On a machine with internet they are downloaded automatically from {VGG16_Weights.IMAGENET1K_V1.url}. "
        f"Offline, copy that file to {_vgg_weights_file()} (torchvision's cache; set TORCH_HOME to move it) "
        "or pass --vgg-weights PATH to a saved vgg16 state dict. "
        "For a smoke test only, --vgg-weights random uses untrained VGG features (the loss is then not perceptual)."
    )


class VGGUnavailable(UserError):
    """The VGG16 weights cannot be loaded: str() gives the reason and the remedy, `short` one line."""

    def __init__(self, reason: str):
        super().__init__(vgg_missing_message(reason))
        self.reason = reason
        self.short = (f"the VGG16 ImageNet weights are not available ({reason}); pass --vgg-weights PATH, or see "
                      "'VGG weights offline' in docs/study.md")


# One download attempt per process: a study that lacks the weights tries once, not once per stage.
_IMAGENET_FAILURE: list[str] = []


def _vgg16_features() -> nn.Sequential:
    """vgg16().features up to relu4_3, built without the 120M-parameter classifier (much faster)."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])[: VGG_LAYERS["relu4_3"] + 1]
    for m in features.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def load_vgg_features(weights: str = "imagenet") -> nn.Sequential:
    """The first 23 layers of VGG16 (up to relu4_3), frozen, in eval mode.

    `weights`: "imagenet" (torchvision's weights API: cached file or download), "random"
    (smoke tests only), or a path to a vgg16 (or vgg16.features) state dict.
    """
    with torch.random.fork_rng(devices=[]):  # "random" is deterministic and leaves the caller's RNG alone
        torch.manual_seed(0)
        features = _vgg16_features()
    if weights == "imagenet":
        from torchvision.models import VGG16_Weights

        if _IMAGENET_FAILURE:
            raise VGGUnavailable(_IMAGENET_FAILURE[0])
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # no network, proxy refusal, truncated file...
            _IMAGENET_FAILURE.append(f"{type(exc).__name__}: {exc}")
            raise VGGUnavailable(_IMAGENET_FAILURE[0]) from None
        _load_features(features, state, VGG16_Weights.IMAGENET1K_V1.url)
    elif weights != "random":
        path = Path(weights)
        if not path.is_file():
            raise VGGUnavailable(f"--vgg-weights {weights}: " + ("is a folder, not a file; pass the vgg16 state dict "
                                                                 "file inside it" if path.is_dir() else "no such file"))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"Could not read VGG weights from {path}: {exc}. "
                            "Pass a file saved with torch.save(vgg16().state_dict(), PATH).") from None
        _load_features(features, state, path)
    features.eval()
    features.requires_grad_(False)
    return features


def _load_features(features: nn.Sequential, state: dict, origin) -> None:
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"VGG weights in {origin} are not a state dict.")
    # Accept a full vgg16 state dict ("features.0.weight") or a features-only one ("0.weight").
    state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
    wanted = features.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(f"VGG weights in {origin} do not look like vgg16: missing {', '.join(missing[:4])}.")
    try:
        features.load_state_dict({k: state[k] for k in wanted})
    except RuntimeError as exc:
        raise UserError(f"VGG weights in {origin} do not match vgg16's shapes: {exc}") from None


class VGGPerceptualLoss(nn.Module):
    """Sum over relu1_2, relu2_2, relu3_3, relu4_3 of the mean L1 distance between VGG16 features.

    Inputs in [0, 1] are normalised with the ImageNet mean and std; grayscale is repeated to 3 channels.
    """

    def __init__(self, weights: str = "imagenet"):
        super().__init__()
        self.features = load_vgg_features(weights)
        self.perceptual = weights != "random"
        self.description = "VGG16 perceptual (L1 on relu1_2, relu2_2, relu3_3, relu4_3)"
        if not self.perceptual:
            self.description += " with RANDOM VGG weights: not a perceptual loss, smoke tests only"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.taps = set(VGG_LAYERS.values())

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # VGG stays in eval mode whatever the caller does
        return self

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self._feats(target)
        recon_feats = self._feats(recon)
        return sum(F.l1_loss(r.float(), t.float()) for r, t in zip(recon_feats, target_feats))

    @torch.no_grad()
    def per_image(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each image's loss (for evaluation): their mean is forward's value, every feature map having the same
        size for every image."""
        pairs = zip(self._feats(recon), self._feats(target))
        return sum((r.float() - t.float()).abs().flatten(1).mean(1) for r, t in pairs)


def make_loss(name: str, vgg_weights: str = "imagenet", kl_weight: float = 1.0) -> "Objective":
    """The objective of a network trained with reconstruction loss `name` and KL weight `kl_weight` (VAEs)."""
    return Objective(distortion_loss(name, vgg_weights), kl_weight)


def distortion_loss(name: str, vgg_weights: str = "imagenet") -> nn.Module:
    """The reconstruction loss `name` on its own: (reconstruction, images) -> a scalar."""
    name = name.lower()
    if name == "mse":
        return MSELoss()
    if name == "vgg":
        loss = VGGPerceptualLoss(vgg_weights)
        if not loss.perceptual:
            print("warning: --vgg-weights random: the 'vgg' loss uses untrained features and is NOT perceptual; "
                  "use it for smoke tests only.", file=sys.stderr)
        return loss
    raise UserError(f"Unknown loss {name!r}; choose one of: {', '.join(LOSSES)}.")


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reconstruction, each image's KL or None) of a network's output: an autoencoder's reconstruction, or a VAE's
    pair (reconstruction, kl) (a tuple or list of two)."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def reconstruction(out) -> torch.Tensor:
    """The reconstruction in a network's output, whether an autoencoder's or a VAE's."""
    return split_output(out)[0]


def pixels_per_image(recon: torch.Tensor) -> int:
    """D, the values of one image: the KL is divided by it, so the objective is per value as the distortion is."""
    return recon[0].numel()


class Objective(nn.Module):
    """What a network is trained and measured with: its reconstruction loss (`distortion`) and, for a VAE, the KL
    weighted by `kl_weight` per image value (the module docstring). Takes the network's output as it is: a
    reconstruction, or a VAE's (reconstruction, kl)."""

    def __init__(self, distortion: nn.Module, kl_weight: float = 1.0):
        super().__init__()
        self.distortion = distortion
        self.kl_weight = float(kl_weight)
        self.perceptual = getattr(distortion, "perceptual", False)
        self.description = distortion.description

    def forward(self, out, target: torch.Tensor) -> torch.Tensor:
        recon, kl = split_output(out)
        return self.add_kl(self.distortion(recon, target), None if kl is None else kl.float().mean(), recon)

    def per_image(self, out, target: torch.Tensor) -> torch.Tensor:
        """Each image's objective: their mean is forward's value."""
        recon, kl = split_output(out)
        return self.add_kl(self.distortion.per_image(recon, target), None if kl is None else kl.float(), recon)

    def add_kl(self, distortion: torch.Tensor, kl: torch.Tensor | None, recon: torch.Tensor) -> torch.Tensor:
        """The objective from its parts, the one place its arithmetic is written: `distortion` + β·`kl`/D, the two
        alike (means, per-image values or sums over the same images); `distortion` itself for an autoencoder
        (kl None). Callers that also report the terms compute the reconstruction loss once and add the KL here."""
        if kl is None:
            return distortion
        return distortion + self.kl_weight * kl / pixels_per_image(recon)

    def terms(self, out, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each image's distortion and rate (its KL in nats), [batch] each: a VAE's two terms; {} for an
        autoencoder."""
        recon, kl = split_output(out)
        if kl is None:
            return {}
        with torch.no_grad():
            return {"distortion": self.distortion.per_image(recon, target), "rate": kl.detach().float()}
