"""The commands: one module per `aecurves` subcommand (and per study stage), each with `run(cfg)` taking its
config dataclass from aecurves.config. They import the library (aecurves/*.py), which never imports them; the
study also runs the commands it is made of. cli.py dispatches to them from its table."""
