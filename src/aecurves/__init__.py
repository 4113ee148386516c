"""aecurves: low-loss curves between trained autoencoders in weight space.

The public Python API (imported on first use, so the command line starts without loading torch):

    Curve, CurvePoint, Bezier, PolyChain   a curve through the weights of any nn.Module (curves.py)
    make_segment                           the straight segment between two state dicts, as a Curve
    ConvAutoencoder, build_model           the built-in autoencoder; any model from an architecture record
    evaluate, evaluate_path, summarize     metrics of a network, along a path, and a path's statistics
    loss_barrier, dl_weighted_mean         path statistics (stats.py)
    make_loss                              mse, or the VGG perceptual loss
    load_checkpoint, load_curve            read checkpoints written by the commands (weights_only)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aecurves")  # pyproject.toml holds the one copy
except PackageNotFoundError:  # run from src/ without installing (benchmarks/gpu_check.sh on a lent GPU)
    __version__ = "0+unknown"

_API = {
    "Curve": "curves", "CurvePoint": "curves", "Bezier": "curves", "PolyChain": "curves", "make_segment": "curves",
    "ConvAutoencoder": "models", "build_model": "models",
    "evaluate": "metrics", "evaluate_path": "metrics", "summarize": "stats", "loss_barrier": "stats",
    "dl_weighted_mean": "stats",
    "make_loss": "losses",
    "load_checkpoint": "checkpoint", "load_curve": "checkpoint",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"aecurves.{_API[name]}"), name)
    raise AttributeError(f"module 'aecurves' has no attribute {name!r}")
