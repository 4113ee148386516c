"""aecurves: low-loss curves between trained autoencoders in weight space."""

__version__ = "0.1.0"
