"""Command line: argument parsing and dispatch only. Every flag also accepts its underscore spelling."""

import argparse
import sys

from aecurves.config import BN_IMAGES, EVAL_BATCH_SIZE, LR_SCHEDULES as SCHEDULES, T_SAMPLING, TRAIN_IMAGES
from aecurves.errors import UserError


def _flag(group, name: str, *aliases: str, **kwargs):
    """Adds --name with its underscore (or dash) twin and any aliases, e.g. --batch-size / --batch_size."""
    names = [name]
    stem = name[2:]
    twin = "--" + (stem.replace("-", "_") if "-" in stem else stem.replace("_", "-"))
    if twin != name:
        names.append(twin)
    names.extend(aliases)
    group.add_argument(*names, **kwargs)


def _add_data_flags(p, dataset_default_note="lfw"):
    g = p.add_argument_group("data")
    _flag(g, "--dataset", choices=["celeba", "folder", "lfw", "synthetic"], default=None,
          help=f"celeba (official layout), folder (any images), lfw (embedded, no download), synthetic "
               f"(default: {dataset_default_note})")
    _flag(g, "--data-dir", "--data_path", "--data-path", default=None,
          help="dataset folder: for celeba the folder holding img_align_celeba/ (or img_align_celeba.zip)")
    _flag(g, "--image-size", type=int, default=None, help="side of the square images (default: 64; 32 for lfw)")
    _flag(g, "--limit", type=int, default=None, help="use only the first N images (default: all)")
    _flag(g, "--val-fraction", type=float, default=None,
          help="held-out fraction when the dataset has no official partition (default: 0.1)")
    _flag(g, "--use-test", action="store_true",
          help="hold out the official test partition instead of valid (celeba with list_eval_partition.txt)")
    _flag(g, "--cache-dir", default=None,
          help="where decoded images are cached (default: $AECURVES_CACHE or ~/.cache/aecurves)")


def _add_runtime_flags(p):
    g = p.add_argument_group("runtime")
    _flag(g, "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    _flag(g, "--precision", choices=["auto", "fp32", "bf16"], default="auto",
          help="bf16 autocast for training steps where the hardware runs it fast (auto), or force one; "
               "evaluation is always fp32 (default: auto)")
    _flag(g, "--vgg-weights", default="imagenet",
          help="VGG16 weights for the perceptual loss: imagenet (torchvision, cached or downloaded), a PATH "
               "to a vgg16 state dict, or random (smoke tests only; the loss is then not perceptual) "
               "(default: imagenet)")
    _flag(g, "--no-progress", action="store_true", help="no progress bars")


def add_train_flags(p):
    _add_data_flags(p)
    g = p.add_argument_group("model and training")
    _flag(g, "--loss", choices=["mse", "vgg"], default=None, help="reconstruction loss (default: mse)")
    _flag(g, "--latent-dim", type=int, default=None, help="bottleneck size (default: 128)")
    _flag(g, "--width", type=int, default=None, help="channels of the first conv stage (default: 32)")
    _flag(g, "--batch-size", type=int, default=64, help="batch size per process (default: 64)")
    _flag(g, "--epochs", type=int, default=30, help="(default: 30)")
    _flag(g, "--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    _flag(g, "--lr-schedule", choices=SCHEDULES, default=None,
          help="constant; paper: constant for the first half, then linearly down to 1%% of --lr at 90%% of "
               "training, 1%% after (Garipov et al.); cosine: down to 0. Set before every step "
               "(default: constant, or the checkpoint's with --resume)")
    _flag(g, "--wd", type=float, default=0.0, help="Adam weight decay (default: 0)")
    _flag(g, "--seed", type=int, default=None, help="random seed (default: 42)")
    g = p.add_argument_group("outputs")
    _flag(g, "--out", "--dir", default="runs/train", help="run folder (default: runs/train)")
    _flag(g, "--save-every-epoch", type=int, default=5,
          help="write a checkpoint and a reconstruction grid every N epochs, and at the end (default: 5)")
    _flag(g, "--checkpoint", default=None, help="resume from this checkpoint (default: OUT/checkpoint.pt with --resume)")
    _flag(g, "--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _flag(g, "--num-images", type=int, default=8, help="test images in the reconstruction grid (default: 8)")
    _add_runtime_flags(p)


def add_train_curve_flags(p):
    _add_data_flags(p, "the endpoints' dataset")
    g = p.add_argument_group("curve")
    _flag(g, "--init-start", required=False, help="checkpoint of the start endpoint θ(0) (required)")
    _flag(g, "--init-end", required=False, help="checkpoint of the end endpoint θ(1) (required)")
    _flag(g, "--curve", default="Bezier", type=str, help="Bezier or PolyChain, any case (default: Bezier)")
    _flag(g, "--num-bends", type=int, default=3, help="control points including both ends (default: 3)")
    _flag(g, "--fix-start", action="store_true", help="keep θ(0) at the start endpoint")
    _flag(g, "--fix-end", action="store_true", help="keep θ(1) at the end endpoint")
    _flag(g, "--init-linear-off", action="store_true",
          help="leave inner bends at a fresh initialisation instead of on the segment")
    g = p.add_argument_group("training")
    _flag(g, "--loss", choices=["mse", "vgg"], default=None, help="(default: the endpoints' loss)")
    _flag(g, "--batch-size", type=int, default=64, help="batch size per process (default: 64)")
    _flag(g, "--epochs", type=int, default=10, help="(default: 10)")
    _flag(g, "--lr", type=float, default=1e-3, help="Adam base learning rate for the bends (default: 1e-3)")
    _flag(g, "--lr-schedule", choices=SCHEDULES, default=None,
          help="paper: the base lr for the first half of training, then linearly down to 1%% of it at 90%%, "
               "1%% after (Garipov et al.'s train.py, set before every step); cosine: down to 0; constant "
               "(default: paper, or the checkpoint's with --resume)")
    _flag(g, "--t-sampling", choices=T_SAMPLING, default=None,
          help="how each batch's t is drawn: stratified (each epoch takes one t from each of its N equal slices "
               "of [0, 1], in random order, so every epoch covers the whole curve) or uniform (i.i.d. U(0, 1), as "
               "the paper) (default: stratified, or the checkpoint's with --resume)")
    _flag(g, "--bn-images", type=int, default=None,
          help=f"training images for the BatchNorm statistics of the per-epoch midpoint monitor: the same fixed "
               f"subset as eval-curve --bn-images, so the last figure equals eval-curve's at t = 0.5 "
               f"(default: {BN_IMAGES})")
    _flag(g, "--wd", type=float, default=0.0,
          help="weight of the regulariser wd/2·‖θ(t)‖² added to the loss (default: 0)")
    _flag(g, "--seed", type=int, default=None, help="seed for t sampling and shuffling (default: 1)")
    g = p.add_argument_group("outputs")
    _flag(g, "--out", "--dir", default="runs/curve", help="run folder (default: runs/curve)")
    _flag(g, "--save-every-epoch", type=int, default=1, help="checkpoint every N epochs and at the end (default: 1)")
    _flag(g, "--resume", action="store_true", help="continue the curve run in --out from its checkpoint")
    _add_runtime_flags(p)


def add_export_point_flags(p):
    _flag(p, "--ckpt", required=True, help="curve checkpoint (from train-curve)")
    _flag(p, "--t", type=float, required=True, help="position on the curve, in [0, 1]")
    _flag(p, "--out", required=True, help="file to write (an ordinary autoencoder checkpoint)")
    _flag(p, "--bn-images", type=int, default=BN_IMAGES,
          help=f"training images used to recompute BatchNorm statistics at t; 0 keeps the curve's "
               f"(default: {BN_IMAGES})")
    _flag(p, "--batch-size", type=int, default=EVAL_BATCH_SIZE, help=f"(default: {EVAL_BATCH_SIZE})")
    _flag(p, "--cache-dir", default=None, help="image cache folder (default: $AECURVES_CACHE or ~/.cache/aecurves)")
    _flag(p, "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    _flag(p, "--no-progress", action="store_true", help="no progress bars")


def add_eval_curve_flags(p):
    g = p.add_argument_group("what to evaluate (one of)")
    _flag(g, "--ckpt", default=None, help="curve checkpoint from train-curve")
    _flag(g, "--segment", nargs=2, metavar=("START", "END"), default=None,
          help="two endpoint checkpoints: evaluate the straight segment between them (nothing to train)")
    g = p.add_argument_group("evaluation")
    _flag(g, "--num-points", type=int, default=61, help="points t evenly spaced in [0, 1] (default: 61)")
    _flag(g, "--bn-images", type=int, default=BN_IMAGES,
          help=f"training images (a fixed subset drawn once) for the BatchNorm statistics at each t "
               f"(default: {BN_IMAGES})")
    _flag(g, "--train-images", type=int, default=TRAIN_IMAGES,
          help=f"training images for the train metrics: a fixed subset stratified by the start endpoint's "
               f"per-image MSE (default: {TRAIN_IMAGES})")
    _flag(g, "--full", action="store_true", help="use all training images for both, as the paper does")
    _flag(g, "--num-images", type=int, default=4, help="held-out images in the reconstruction pictures (default: 4)")
    _flag(g, "--no-segment-too", dest="segment_too", action="store_false",
          help="for a curve, skip the comparison with the segment between its endpoints")
    _flag(g, "--batch-size", type=int, default=EVAL_BATCH_SIZE,
          help=f"(default: {EVAL_BATCH_SIZE}; BN statistics are averaged per batch, so it is part of the protocol)")
    _flag(g, "--use-test", action="store_true", help="hold out the official test partition (celeba)")
    _flag(g, "--dataset", choices=["celeba", "folder", "lfw", "synthetic"], default=None,
          help="(default: the checkpoint's)")
    _flag(g, "--data-dir", "--data_path", "--data-path", default=None, help="(default: the checkpoint's)")
    _flag(g, "--cache-dir", default=None, help="image cache folder (default: $AECURVES_CACHE or ~/.cache/aecurves)")
    _flag(g, "--out", "--dir", default=None,
          help="output folder (default: CKPT_FOLDER/eval for a curve, runs/segment for a segment)")
    g = p.add_argument_group("runtime")
    _flag(g, "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    _flag(g, "--precision", choices=["auto", "fp32", "bf16"], default="auto",
          help="accepted for symmetry with train; evaluation always runs in fp32")
    _flag(g, "--vgg-weights", default="imagenet",
          help="VGG16 weights for the perceptual metric and vgg-loss checkpoints: imagenet, PATH or random "
               "(default: imagenet; when unavailable the perceptual metric is left out)")
    _flag(g, "--no-progress", action="store_true", help="no progress bars")


def add_study_flags(p):
    """`aecurves study`: preset values default to None here, so flags given explicitly are detectable."""
    g = p.add_argument_group("study")
    _flag(g, "--preset", choices=["demo", "celeba"], default=None,
          help="demo: embedded LFW faces, a few minutes on a CPU; celeba: the full setting (needs --data-dir) "
               "(default: demo)")
    _flag(g, "--out", "--dir", default=None, help="study folder (default: runs/study)")
    _flag(g, "--losses", default=None, help="comma-separated losses, one group each (default: mse,vgg)")
    _flag(g, "--seeds", default=None, help="comma-separated endpoint seeds per loss; one curve per pair "
                                           "(default: 1,2,3)")
    _flag(g, "--force", action="append", default=None, metavar="STAGE",
          help="redo a stage even if finished (repeatable): endpoint:mse:1, curve:mse:1-2, eval:mse:1-2, report, "
               "or endpoints, curves, evals, a loss (mse, vgg), a prefix such as curve:mse, or all")
    _add_data_flags(p, "the preset's: lfw for demo, celeba for celeba")
    g = p.add_argument_group("endpoints (aecurves train)")
    _flag(g, "--epochs", type=int, default=None, help="endpoint epochs (demo: 60, celeba: 30)")
    _flag(g, "--lr", type=float, default=None, help="endpoint Adam learning rate (demo: 3e-3, celeba: 1e-4)")
    _flag(g, "--lr-schedule", choices=SCHEDULES, default=None,
          help="endpoint lr schedule (default: paper, so the endpoints converge before a barrier is measured)")
    _flag(g, "--batch-size", type=int, default=None, help="batch size for endpoints and curves (demo: 32, celeba: 64)")
    _flag(g, "--latent-dim", type=int, default=None, help="bottleneck size (default: 128)")
    _flag(g, "--width", type=int, default=None, help="channels of the first conv stage (demo: 16, celeba: 32)")
    _flag(g, "--save-every-epoch", type=int, default=None,
          help="endpoint checkpoint copies every N epochs (demo: 20, celeba: 5)")
    g = p.add_argument_group("curves (aecurves train-curve; both ends fixed)")
    _flag(g, "--curve", default=None, help="Bezier or PolyChain (default: Bezier)")
    _flag(g, "--num-bends", type=int, default=None, help="control points including both ends (default: 3)")
    _flag(g, "--curve-epochs", type=int, default=None, help="(demo: 60, celeba: 10)")
    _flag(g, "--curve-lr", type=float, default=None, help="Adam learning rate for the bends (demo: 3e-3, celeba: 1e-4)")
    _flag(g, "--curve-lr-schedule", choices=SCHEDULES, default=None, help="lr schedule of the curves (default: paper)")
    _flag(g, "--t-sampling", choices=T_SAMPLING, default=None,
          help="how the curves draw t per batch (default: stratified; see train-curve --help)")
    _flag(g, "--wd", type=float, default=None, help="curve regulariser weight wd/2·‖θ(t)‖² (default: 0)")
    g = p.add_argument_group("evaluation (aecurves eval-curve: every curve and its segment)")
    _flag(g, "--num-points", type=int, default=None, help="points t per path (default: 61)")
    _flag(g, "--bn-images", type=int, default=None,
          help=f"training images for BN statistics at each t and in the curves' midpoint monitor "
               f"(default: {BN_IMAGES})")
    _flag(g, "--train-images", type=int, default=None,
          help=f"training images for train metrics (default: {TRAIN_IMAGES})")
    _add_runtime_flags(p)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aecurves", description="Mode connectivity of autoencoders: train endpoints, connect them by "
                                     "low-loss curves in weight space, evaluate and report.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_flags(sub.add_parser("train", help="train one autoencoder (an endpoint)",
                                   description="Train a convolutional autoencoder (an endpoint of the curves)."))
    add_train_curve_flags(sub.add_parser(
        "train-curve", help="train a low-loss curve between two endpoints",
        description="Train a Bezier or PolyChain curve θ(t) between two trained autoencoders; each batch draws "
                    "t ~ U(0, 1) and minimises the reconstruction loss at θ(t) + wd/2·‖θ(t)‖²."))
    add_eval_curve_flags(sub.add_parser(
        "eval-curve", help="metrics and reconstructions along a curve or a segment",
        description="Evaluate losses, MSE, PSNR and the weight-space step along a curve (--ckpt) or the straight "
                    "segment between two endpoints (--segment); BatchNorm statistics are recomputed at every t. "
                    "Writes curve.npz, eval.json, loss_along_path.png and reconstructions.png."))
    add_export_point_flags(sub.add_parser(
        "export-point", help="write θ(t) of a curve as an ordinary checkpoint",
        description="Write the network at position t of a curve (BatchNorm statistics recomputed at t) as an "
                    "ordinary autoencoder checkpoint that every command accepts as an endpoint."))
    add_study_flags(sub.add_parser(
        "study", help="the whole experiment: endpoints, curves, evaluations and a report (resumable)",
        description="Train endpoints for every loss and seed, connect every pair within a loss group by a curve, "
                    "evaluate every curve and its segment, and write report.html / report.md. Re-running the same "
                    "command skips finished stages and resumes an interrupted one."))
    return parser


def check_positive(args, *names):
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise UserError(f"--{n.replace('_', '-')} must be at least 1, got {v}.")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "train":
            from aecurves import train

            check_positive(args, "epochs", "batch_size", "save_every_epoch", "limit", "latent_dim", "width")
            train.run(vars(args))
        elif args.command == "train-curve":
            from aecurves import train_curve

            check_positive(args, "epochs", "batch_size", "save_every_epoch", "limit")
            train_curve.run(vars(args))
        elif args.command == "eval-curve":
            from aecurves import evaluate

            check_positive(args, "batch_size")
            evaluate.run(vars(args))
        elif args.command == "export-point":
            from aecurves import train_curve

            check_positive(args, "batch_size")
            train_curve.export_point(vars(args))
        elif args.command == "study":
            from aecurves import study

            return study.main(args)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints are intact (use --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
