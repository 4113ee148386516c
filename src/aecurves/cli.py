"""Command line: flags built from the config dataclasses, and dispatch. Nothing imports this module.

Every flag also accepts its underscore spelling (--batch-size / --batch_size). Flags not given are left out of
the parsed result, so each config knows which fields were set explicitly (`given`).
"""

import argparse
import dataclasses
import errno
import importlib
import os
import sys

from aecurves import __version__, config
from aecurves.errors import UserError, call_guarded

DESCRIPTIONS = {
    "train": ("train one autoencoder (an endpoint)",
              "Train an autoencoder (an endpoint of the curves): the built-in convolutional one, or any "
              f"--model factory, called as {config.MODEL_SIGNATURE}."),
    "train-curve": ("train a low-loss curve between two endpoints",
                    "Train a Bezier or PolyChain curve θ(t) between two trained autoencoders; each batch takes a t in "
                    "[0, 1] and minimises the reconstruction loss at θ(t) + wd/2·‖θ(t)‖²."),
    "eval-curve": ("metrics and reconstructions along a curve or a segment",
                   "Evaluate losses, MSE, PSNR and the weight-space step along a curve (--ckpt) or the straight "
                   "segment between two endpoints (--segment); BatchNorm statistics are recomputed at every t. "
                   "Writes curve.npz, eval.json, loss_along_path.png and reconstructions.png."),
    "export-point": ("write θ(t) of a curve as an ordinary checkpoint",
                     "Write the network at position t of a curve (BatchNorm statistics recomputed at t) as an "
                     "ordinary autoencoder checkpoint that every command accepts as an endpoint."),
    "align": ("reorder endpoint B's hidden units (and map its latent code) to match endpoint A",
              "Write endpoint B with its hidden units permuted, and its linear bottleneck mapped, to match endpoint A: "
              "the same function as B, ready for eval-curve --segment A B_ALIGNED or train-curve. Asks whether the "
              "straight line's barrier is only a matter of unit order (Entezari et al. 2022, Ainsworth et al. "
              "2023)."),
    "plane": ("losses on a grid over the plane through a curve's bends (or three networks)",
              "Evaluate the train and test loss and MSE on a G x G grid over the plane through a curve's first, "
              "middle and last bend (--ckpt), or through three networks (--points A B C), with BatchNorm "
              "statistics recomputed at every grid point as eval-curve does. Writes plane.npz, plane.png (filled "
              "contours on a log scale, with the curve and the segment) and plane.json."),
    "fge": ("fast geometric ensembling: cyclical-lr snapshots of one endpoint, and their output average",
            "Fast geometric ensembling (Garipov et al. 2018, their fge.py): train an endpoint on with a cyclical lr "
            "(from --lr-1 down to --lr-2 and back every --cycle epochs, set before every step), take a snapshot at "
            "each cycle's lowest lr with BatchNorm statistics recomputed, and measure the snapshots' output average "
            "(MSE, PSNR, SSIM) on the held-out images beside every snapshot and the endpoint. Writes snapshot_K.pt "
            "(ordinary endpoint checkpoints), fge.json, metrics.jsonl and reconstructions.png; resumable."),
    "study": ("the whole experiment: endpoints, curves, evaluations and a report (resumable)",
              "Train endpoints for every loss and seed, connect every pair within a loss group by a curve, evaluate "
              "every curve and its segment, and write report.html / report.md. Re-running the same command skips "
              "finished stages and resumes an interrupted one."),
    "report": ("(re)write a study's report from its files",
               "Write report.html, report.md and report.json of a study folder from the files its stages wrote."),
}


# The module whose run(cfg) carries out each command: a table in code, so nothing read from a file or the command
# line names a module to import.
MODULES = {"train": "aecurves.commands.train", "train-curve": "aecurves.commands.train_curve",
           "eval-curve": "aecurves.commands.eval_curve", "export-point": "aecurves.commands.export_point",
           "align": "aecurves.commands.align", "plane": "aecurves.commands.plane", "fge": "aecurves.commands.fge",
           "study": "aecurves.commands.study", "report": "aecurves.report"}


FILESYSTEM_ERRORS = {
    errno.ENOSPC: "The disk is full: free some space, or choose an --out (or --cache-dir) on another disk.",
    errno.EDQUOT: "The disk quota is exhausted: free some space, or choose an --out (or --cache-dir) elsewhere.",
    errno.EACCES: "Permission denied: choose a folder you can write (--out, --cache-dir).",
    errno.EPERM: "Permission denied: choose a folder you can write (--out, --cache-dir).",
    errno.EROFS: "The file system is read-only: choose a writable --out (or --cache-dir).",
    errno.ENAMETOOLONG: "The name is too long for the file system: choose a shorter --out.",
}


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the config dataclass `cls`, with its help text and its default shown."""
    groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = meta.get("group")
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = groups.get(group, parser)
        help_text = meta["help"]
        if meta.get("required"):  # checked once a --config file is merged (config.check_required), not by argparse
            help_text += " (required)"
        elif config.value_type(f) is not bool:
            help_text += f" (default: {config.shown_default(f)})"
        kwargs = {"help": help_text.replace("%", "%%").strip(), "dest": f.name}
        kind = config.value_type(f)
        if meta.get("positional"):
            target.add_argument(f.name, nargs=meta.get("nargs"), default=argparse.SUPPRESS, help=kwargs["help"])
            continue
        names = [config.flag_name(f.name)]
        if kind is bool:
            if meta.get("negative_flag"):
                names = [meta["negative_flag"], meta["negative_flag"].replace("-", "_").replace("__", "--", 1)]
                kwargs["action"] = "store_false"
            else:
                kwargs["action"] = "store_true"
        else:
            kwargs["type"] = config.parse_json_object if kind is dict else (kind if kind in (int, float) else str)
            for key in ("choices", "metavar", "nargs"):
                if meta.get(key) is not None:
                    kwargs[key] = meta[key]
            if meta.get("repeat"):
                kwargs["action"] = "append"
        twin = "--" + f.name
        if twin not in names and not meta.get("negative_flag"):
            names.append(twin)
        names.extend(meta.get("aliases", ()))
        target.add_argument(*names, default=argparse.SUPPRESS, **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aecurves", allow_abbrev=False,
        description="Mode connectivity of autoencoders: train endpoints, connect them by low-loss curves in weight "
                    "space, evaluate and report.")
    parser.add_argument("--version", action="version", version=f"aecurves {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cls in config.COMMANDS.items():
        short, long = DESCRIPTIONS[name]
        command = sub.add_parser(name, help=short, description=long, allow_abbrev=False)
        add_flags(command, cls)
        files = command.add_argument_group("configuration files")
        files.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                           help=f"read settings from {config.config_file_kinds(cls)}; flags given as well "
                                "override it")
        files.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                           help="print the resolved settings as TOML (which --config reads back) and exit")
    return parser


def parse(argv=None):
    """(command, its config) from the command line: a --config file's settings, overridden by the flags."""
    command, cfg, _ = parse_with_options(argv)
    return command, cfg


def parse_with_options(argv=None):
    """(command, its config, {"print_config": bool})."""
    args = vars(get_args_parser().parse_args(argv))
    command = args.pop("command")
    options = {"print_config": args.pop("print_config", False)}
    cls = config.COMMANDS[command]
    path = args.pop("config", None)
    values = config.read_config_file(path, cls) if path is not None else {}
    if not options["print_config"]:  # printing imports nothing
        refuse_code_named_by_file(values, args, path)
    values.update(args)
    cfg = config.make(cls, values)
    if not options["print_config"]:  # an incomplete config still prints: it is how a config file is begun
        config.check_required(cfg)
    return command, cfg, options


def refuse_code_named_by_file(from_file: dict, from_flags: dict, path) -> None:
    """Code runs only when the command line names it: a config file may name a model factory outside the built-in
    one, but it is imported only when --model gives the same name."""
    model = from_file.get("model")
    if model is not None and model != config.BUILTIN_MODEL and from_flags.get("model") != model:
        raise UserError(f"--config {path} names the model factory {model!r}, code outside aecurves. aecurves imports "
                        f"code only when the command line names it: add --model {model} to allow it.")


def main(argv=None) -> int:
    command, cfg, module = None, None, None
    try:
        command, cfg, options = parse_with_options(argv)
        module = importlib.import_module(MODULES[command])  # on use: `aecurves --help` stays fast
        if options["print_config"]:
            resolved = module.resolved_config(cfg) if hasattr(module, "resolved_config") else config.as_record(cfg)
            print(config.to_toml(resolved), end="")
            return 0
        # A --model's code that calls sys.exit(0) (or raises another BaseException) must not end the command
        # quietly with status 0: it is an error naming it (KeyboardInterrupt keeps its meaning, below).
        model = getattr(cfg, "model", None)
        call_guarded(lambda: module.run(cfg), model if model != config.BUILTIN_MODEL else None, f"aecurves {command}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `aecurves study --plan | head`: the reader has gone, and so may we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine's, not a bug: a full disk, a read-only or forbidden folder
        advice = FILESYSTEM_ERRORS.get(exc.errno)
        if advice is None:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: could not write{where}: {exc.strerror or exc}. {advice} Files are written to a temporary "
              "and renamed only when complete, so finished checkpoints and results are intact.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        message = getattr(module, "INTERRUPTED", "interrupted; finished checkpoints are intact (use --resume to "
                                                 "continue)")
        print(message.format(out=getattr(cfg, "out", "")), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
