"""Every setting of every command, written once: one dataclass per command, each default beside its help text.

The CLI builds its flags from these classes (cli.py), the study builds its stages' configs from them (its
sections, below), and checkpoints store them as plain dicts (`as_record`). The data and runtime settings that many
commands share are written once, in DataConfig and RuntimeConfig, and taken from there (a base class, or
`same_as`). A field's metadata holds what the flag needs: help, `shown` (the default as --help words, when the value
alone would not say it), choices, aliases, bounds; and what the field is to a run's result (`role`, `carried`,
`legacy`: see ROLES), which --resume and the study's check of finished stages both read. `given` records which
fields were set explicitly (on the command line, or by the study): on --resume the others come from the checkpoint.
No torch import here, so `aecurves --help` starts fast.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from aecurves.errors import UserError

# The evaluation protocol: BatchNorm statistics and training-set metrics at a point of a path come from fixed
# subsets of the training images, drawn once with a generator seeded SUBSET_SEED. The sizes were chosen with
# benchmarks/eval_protocol.py: 8192 is the smallest power of 2 whose projected deviation from --full at
# CelebA scale stays under 1% at three standard deviations on every measured point (docs/performance.md gives the
# table). BN statistics are averaged per batch, so the batch size is part of the protocol.
SUBSET_SEED = 0
BN_IMAGES = 8192
TRAIN_IMAGES = 8192
EVAL_BATCH_SIZE = 256

DATASETS = ("celeba", "folder", "lfw", "synthetic")
VAL_FRACTION = 0.1  # held-out share of a dataset without an official partition (load_data's default too)
DEFAULT_SEGMENT_OUT = "runs/segment"
DEFAULT_IMAGE_SIZE = {"celeba": 64, "folder": 64, "synthetic": 64, "lfw": 32}
LOSSES = ("mse", "vgg")
LR_SCHEDULES = ("paper", "cosine", "constant")
T_SAMPLING = ("uniform", "stratified")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
BUILTIN_MODEL = "aecurves.models:ConvAutoencoder"
CONV_VAE = "aecurves.models:ConvVAE"
KL_AUTOENCODER = "aecurves.models:KLAutoencoder"
BUILTIN_MODELS = (BUILTIN_MODEL, CONV_VAE, KL_AUTOENCODER)  # models.BUILTIN_FACTORIES' names
WIDTH_MODELS = (BUILTIN_MODEL, CONV_VAE)  # the built-in models that take --width
MAX_KL_WEIGHT = 1e6
EXPORT_FORMATS = ("checkpoint", "safetensors", "state_dict")
ALIGN_METHODS = ("activations", "weights", "weights-raw", "both", "mixed", "learned")
ACTIVATION_METHODS = ("activations", "both", "mixed", "learned")  # the methods that start from activation matching
LATENT_MAPS = ("none", "permutation", "orthogonal", "linear")
ALIGN_TOLERANCE = 1e-5  # an aligned network's outputs may differ from the original's by at most this (fp32)
# A unit of a Linear layer has one activation per image, and a correlation needs two samples at least (one has no
# spread); the learned method's training-mode BatchNorm needs two values per channel too.
MIN_ALIGN_IMAGES = 2
MAX_LR = 100.0  # far above any useful Adam lr; larger values overflow float32 arithmetic in the optimizer
# Every count and size has a range, checked before any work. The upper bounds lie far above any useful value; they
# keep a typo (--num-bends 1000000, --width 100000) from hanging a run or exhausting memory after minutes of setup.
MAX_SEED = 2**32 - 1          # numpy's seed range
MAX_IMAGE_SIZE = 1024
MAX_WIDTH = 1024
MAX_LATENT_DIM = 65536
MAX_IMAGES = 10**9            # --limit and the protocol's subset sizes (CelebA has 202,599 images)
MAX_BATCH_SIZE = 65536
MAX_EPOCHS = 100_000
MAX_WD = 100.0
MAX_PICTURE_IMAGES = 64       # images in a reconstruction picture
MAX_BENDS = 64                # a curve holds this many copies of the network
MAX_POINTS = 10_001           # points t along a path
MAX_POINTS_PER_CALL = 1024
MAX_ENSEMBLE = 101
MAX_GRID = 201                # plane points per side: 40,401 networks
MAX_MARGIN = 10.0             # plane margins, in units of the points' own distances
MAX_SEEDS = 64                # study seeds per loss: one curve per pair, 2,016 pairs
MAX_SYNTHETIC = 65536         # synthetic images are generated in memory
MAX_JOBS = 256                # stages at once on one machine, GPUs per stage
EXECUTORS = ("serial", "local", "slurm")
SLURM = "slurm (--executor slurm)"  # the --help group of the Slurm settings
WANDB = "Weights & Biases (--wandb)"  # the --help group of the W&B settings
WANDB_SECTIONS = ("endpoints", "extras", "fges", "curves", "evals")  # the study's stages that log to W&B
MODEL_SIGNATURE = "FACTORY(channels=C, image_size=S, latent_dim=D, **MODEL_KWARGS)"


# What a field is to a run's result (its `role`), read by --resume (settle_with_checkpoint) and by the study's check
# of finished stages (result_settings):
#   input   a file the run is made from (on --resume compared as a path; the study checks the file's SHA-256)
#   data    which images it reads (DataConfig's fields but the cache folder)
#   model   the network and the loss it is trained with (what `train --init` keeps from its endpoint)
#   result  every other setting that changes what the run computes
# A field without a role (the device, precision, progress bars, output folder ...) says how a run runs, not what it
# computes: it may differ on --resume and never makes a finished stage stale. `carried`: on --resume the field takes
# the checkpoint's value unless given, and may change (the run then follows the new value). `legacy`: the value a
# record written before the setting existed was made with (none: such a record holds None).
ROLES = ("input", "data", "model", "result")


def option(default=None, help: str = "", *, shown: str | None = None, group: str | None = None,
           choices=None, aliases: tuple = (), minimum=None, maximum=None, positive: bool = False,
           required: bool = False, metavar=None, nargs=None, negative_flag: str | None = None, repeat: bool = False,
           positional: bool = False, cli: bool = True, factory=None, role: str | None = None, carried: bool = False,
           legacy=None, sets: tuple = (), recorded: bool = True, needs: tuple = ()):
    """A config field with its help text, everything its command-line flag needs, and what it is to the result
    (ROLES). Two entries are the study's own: `sets`, the section fields a study setting is copied into
    ("section.field", or "section" for a field of the same name; section_settings), and `recorded=False`: a setting
    left out of study.json's record of the study. `needs`: ((field, its values that use this setting), ...), any one
    of which must hold for a value other than the default to be used at all (check_needs)."""
    assert role in (None, *ROLES), role
    meta = {"help": help, "shown": shown, "group": group, "choices": choices, "aliases": aliases,
            "minimum": minimum, "maximum": maximum, "positive": positive, "required": required, "metavar": metavar,
            "nargs": nargs, "negative_flag": negative_flag, "repeat": repeat, "positional": positional, "cli": cli,
            "role": role, "carried": carried, "legacy": legacy, "sets": sets, "recorded": recorded,
            "needs": needs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def same_as(cls, name: str, help: str | None = None, default=dataclasses.MISSING, **changes):
    """The field `name` of another config: its default, help and role, not written a second time. `default` replaces
    the default (None: taken from the checkpoints the command reads). A study setting (one with `sets`) has no role
    of its own: its sections' fields have theirs."""
    f = cls.__dataclass_fields__[name]
    meta = {**f.metadata, **changes, **({"help": help} if help is not None else {})}
    if meta["sets"]:
        meta.update(role=None, carried=False, legacy=None)
    if default is not dataclasses.MISSING:
        return field(default=default, metadata=meta)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default, metadata=meta)


def _given():
    return option(factory=tuple, cli=False, help="names of the fields set explicitly")


# ----------------------------------------------------------------------------------------------------------
# what the commands share: the data and the runtime


@dataclass
class DataConfig:
    """The images a run reads, as load_data takes them. `train` and `train-curve` have all of these (train-curve:
    each the endpoints' unless given); the other commands take the ones they have with same_as. All but the cache
    folder say which images (role "data"): two networks of one curve must agree on them."""

    dataset: str = option("lfw", "celeba (official layout), folder (any images), lfw (embedded, no download), "
                                 "synthetic", choices=DATASETS, group="data", role="data")
    data_dir: str | None = option(None, "dataset folder: for celeba the folder holding img_align_celeba/ (or "
                                        "img_align_celeba.zip)", aliases=("--data_path", "--data-path"), group="data",
                                  role="data")
    image_size: int | None = option(None, "side of the square images", shown="64; 32 for lfw", minimum=1,
                                    group="data", maximum=MAX_IMAGE_SIZE, role="data")
    limit: int | None = option(None, "use only the first N images", shown="all", minimum=1, group="data",
                               maximum=MAX_IMAGES, role="data")
    val_fraction: float = option(VAL_FRACTION, "held-out fraction when the dataset has no official partition",
                                 group="data", role="data")
    use_test: bool = option(False, "hold out the official test partition instead of valid (celeba with "
                                   "list_eval_partition.txt)", group="data", role="data")
    cache_dir: str | None = option(None, "where decoded images are cached", shown="$AECURVES_CACHE or "
                                   "~/.cache/aecurves", group="data")


@dataclass
class RuntimeConfig:
    """How a run runs, not what it computes: each command takes the ones it has with same_as (memory_format and
    compile only where a command has them; the executor settings are the study's). None has a role: none is
    compared on --resume or makes a finished study stage stale (the VGG weights of a vgg-loss stage excepted: its
    loss is made of them, so the study compares them there)."""

    device: str = option("auto", "", choices=DEVICES, group="runtime")
    precision: str = option("auto", "bf16 autocast for training steps where the hardware runs it fast (auto), or "
                                    "force one; evaluation is always fp32", choices=PRECISIONS, group="runtime")
    memory_format: str = option("channels_last", "of the image batches and the model's weights: channels_last "
                                "measured faster on a CPU, with the same numbers to float rounding; a model whose "
                                "forward cannot take it falls back to contiguous, with a note",
                                choices=("channels_last", "contiguous"), group="runtime")
    compile: bool = option(False, "run the model through torch.compile: a one-off compile when the run starts, then "
                                  "possibly faster steps; where it cannot compile, the run goes on uncompiled with a "
                                  "note (the numbers are the same to float rounding either way)", group="runtime")
    vgg_weights: str = option("imagenet", "VGG16 weights for the perceptual loss: imagenet (torchvision, cached or "
                                          "downloaded), a PATH to a vgg16 state dict, or random (smoke tests only; "
                                          "the loss is then not perceptual)", group="runtime")
    no_progress: bool = option(False, "no progress bars", group="runtime", recorded=False)
    # Weights & Biases (wandb_log.py): how a run is watched, not what it computes, so no role (nothing compares them)
    wandb: str | None = option(None, "also log the run to Weights & Biases, in this project (needs the optional "
                                     "wandb package: pip install 'aecurves[wandb]'; WANDB_MODE=offline logs without "
                                     "an account or network). A missing package or a failure to log is a one-line "
                                     "note, and the run goes on", metavar="PROJECT", group=WANDB, recorded=False)
    wandb_entity: str | None = option(None, "the W&B user or team that owns --wandb's project",
                                      shown="your default entity", metavar="ENTITY", group=WANDB, recorded=False)
    wandb_group: str | None = option(None, "the W&B group of the run", shown="none; the study: its folder's name",
                                     metavar="GROUP", group=WANDB, recorded=False)
    wandb_name: str | None = option(None, "the W&B run's name", shown="the run folder's last two parts; in a study, "
                                    "the stage's name (endpoint:mse:1)", metavar="NAME", group=WANDB,
                                    recorded=False)
    # the study's executor: how its stages are spread over processes, devices and Slurm jobs; a study folder reads
    # the same whoever ran it where, so study.json leaves these out (where it ran is in its provenance)
    executor: str = option("serial", "serial: one stage after another in this process; local: up to --jobs stages "
                                     "at once in worker processes on this machine; slurm: each stage a Slurm job "
                                     "(submitit)", choices=EXECUTORS, group="executor", recorded=False)
    jobs: int | None = option(None, "local: stages at once", shown="the number of --devices", minimum=1,
                              maximum=MAX_JOBS, group="executor", recorded=False)
    devices: str | None = option(None, "local: comma-separated devices handed out to the running stages, one "
                                       "each (cuda:0,cuda:1 or cpu)", shown="every visible GPU, else cpu",
                                 group="executor", recorded=False)
    gpus_per_train: int = option(1, "local: GPUs (DistributedDataParallel processes) per endpoint and extra "
                                    "training stage, as torchrun --nproc_per_node", minimum=1, maximum=MAX_JOBS,
                                 group="executor", recorded=False)
    slurm_partition: str | None = option(None, "partition of every stage job", shown="the cluster's default",
                                         group=SLURM, recorded=False)
    slurm_time: int = option(240, "time limit per stage job, in minutes (a job that reaches it is requeued and "
                                  "resumes from its last checkpoint)", minimum=1, maximum=60 * 24 * 30,
                             group=SLURM, recorded=False)
    slurm_gpus: int = option(0, "GPUs per stage job; above 1, endpoint and extra training run as that many "
                                "DistributedDataParallel tasks", minimum=0, maximum=MAX_JOBS, group=SLURM,
                             recorded=False)
    slurm_train_tasks: int | None = option(None, "DistributedDataParallel tasks per endpoint and extra training "
                                                 "job, one per GPU (on CPUs, gloo)", shown="--slurm-gpus, at least 1",
                                           minimum=1, maximum=MAX_JOBS, group=SLURM, recorded=False)
    slurm_cpus: int | None = option(None, "CPUs per task", shown="Slurm's default", minimum=1, maximum=1024,
                                    group=SLURM, recorded=False)
    slurm_mem: str | None = option(None, "memory per job, as sbatch --mem takes it (e.g. 32G)", shown="none asked",
                                   group=SLURM, recorded=False)
    slurm_account: str | None = option(None, "sbatch --account", group=SLURM, recorded=False)
    slurm_qos: str | None = option(None, "sbatch --qos", group=SLURM, recorded=False)
    slurm_setup: list = option(factory=list, help="a shell line run in the job before aecurves (repeatable), e.g. "
                               "'module load cuda' or 'source .venv/bin/activate'", shown="none", repeat=True,
                               metavar="LINE", group=SLURM, recorded=False)
    slurm_extra: list = option(factory=list, help="KEY=VALUE passed to sbatch as --KEY=VALUE (repeatable), e.g. "
                               "constraint=a100", shown="none", repeat=True, metavar="KEY=VALUE", group=SLURM,
                               recorded=False)
    slurm_max_jobs: int = option(64, "stage jobs queued or running at once", minimum=1, maximum=10_000,
                                 group=SLURM, recorded=False)


# ----------------------------------------------------------------------------------------------------------
# the commands


@dataclass
class TrainConfig(DataConfig):
    """`aecurves train`: one autoencoder (an endpoint). Its data settings are DataConfig's (first in --help)."""

    model: str = option(BUILTIN_MODEL, f"the autoencoder: MODULE:FACTORY or FILE.py:FACTORY, called as "
                                       f"{MODEL_SIGNATURE}; it must map images to images of the same shape",
                        group="model", role="model")
    model_kwargs: dict = option(factory=dict, help="JSON object of extra keyword arguments for the factory",
                                shown="{}", metavar="JSON", group="model", role="model")
    latent_dim: int = option(128, "bottleneck size", minimum=1, group="model", maximum=MAX_LATENT_DIM, role="model")
    width: int = option(32, "channels of the first conv stage (the built-in model only)", minimum=1,
                        group="model", maximum=MAX_WIDTH, role="model")
    loss: str = option("mse", "reconstruction loss", choices=LOSSES, group="training", role="model")
    # a checkpoint from before VAEs existed was trained with the reconstruction loss alone; its networks had no KL
    kl_weight: float = option(1.0, "β: a VAE's objective is the reconstruction loss + β·KL/D, D the values per "
                                   "image (docs/models.md); 1 with the MSE loss is the ELBO of a Gaussian decoder "
                                   "with σ² = 1/2. No effect on an autoencoder", minimum=0, maximum=MAX_KL_WEIGHT,
                              group="training", role="model", legacy=1.0)
    batch_size: int = option(64, "batch size per process", minimum=1, group="training", maximum=MAX_BATCH_SIZE,
                             role="result")
    # epochs and lr may change on --resume, so `--resume` alone finishes the run as planned
    epochs: int = option(30, "", minimum=1, group="training", maximum=MAX_EPOCHS, role="result", carried=True)
    lr: float = option(1e-4, "Adam learning rate", positive=True, maximum=MAX_LR, group="training", role="result",
                       carried=True)
    lr_schedule: str = option("constant", "constant; paper: constant for the first half, then linearly down to 1% "
                                          "of --lr at 90% of training, 1% after (Garipov et al.); cosine: down to "
                                          "0. Set before every step", choices=LR_SCHEDULES, group="training",
                              role="result")
    wd: float = option(0.0, "Adam weight decay", minimum=0, group="training", maximum=MAX_WD, role="result")
    seed: int = option(42, "random seed", group="training", minimum=0, maximum=MAX_SEED, role="result")
    out: str = option("runs/train", "run folder", aliases=("--dir",), group="outputs")
    save_every_epoch: int = option(5, "write a checkpoint and a reconstruction grid every N epochs, and at the end",
                                   minimum=1, group="outputs", maximum=MAX_EPOCHS, carried=True)
    checkpoint: str | None = option(None, "resume from this checkpoint", shown="OUT/checkpoint.pt with --resume",
                                    group="outputs")
    resume: bool = option(False, "continue the run in --out from its last checkpoint (settings not given "
                                 "explicitly come from it)", group="outputs")
    init: str | None = option(None, "start from this endpoint's weights with a fresh Adam optimizer and this run's "
                                    "--epochs, --lr and --lr-schedule (e.g. an endpoint given as much extra training "
                                    "as a curve); its data and model settings are kept", metavar="CKPT",
                              group="outputs", role="input")
    num_images: int = option(8, "test images in the reconstruction grid", minimum=0, group="outputs",
                             maximum=MAX_PICTURE_IMAGES)
    tensorboard: bool = option(False, "also write the epoch figures and reconstruction grids for TensorBoard to "
                                      "OUT/tensorboard (needs the optional tensorboard package)", group="outputs")
    device: str = same_as(RuntimeConfig, "device")
    precision: str = same_as(RuntimeConfig, "precision")
    memory_format: str = same_as(RuntimeConfig, "memory_format")
    compile: bool = same_as(RuntimeConfig, "compile")
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    wandb: str | None = same_as(RuntimeConfig, "wandb")
    wandb_entity: str | None = same_as(RuntimeConfig, "wandb_entity")
    wandb_group: str | None = same_as(RuntimeConfig, "wandb_group")
    wandb_name: str | None = same_as(RuntimeConfig, "wandb_name")
    given: tuple = _given()


ENDPOINTS = "the endpoints'"


@dataclass
class TrainCurveConfig(DataConfig):
    """`aecurves train-curve`: a low-loss curve between two endpoints. Its data settings are DataConfig's, each
    taken from the endpoints unless given."""

    dataset: str | None = same_as(DataConfig, "dataset", "celeba, folder, lfw or synthetic", default=None,
                                  shown=ENDPOINTS)
    data_dir: str | None = same_as(DataConfig, "data_dir", "dataset folder", default=None, shown=ENDPOINTS)
    image_size: int | None = same_as(DataConfig, "image_size", shown=ENDPOINTS)
    limit: int | None = same_as(DataConfig, "limit", shown=ENDPOINTS)
    val_fraction: float | None = same_as(DataConfig, "val_fraction", default=None, shown=ENDPOINTS)
    use_test: bool | None = same_as(DataConfig, "use_test", default=None, help="hold out the official test partition "
                                    "instead of valid (celeba with list_eval_partition.txt); without it, as the "
                                    "endpoints were trained")
    init_start: str | None = option(None, "checkpoint of the start endpoint θ(0)", shown="required", group="curve",
                                    role="input")
    init_end: str | None = option(None, "checkpoint of the end endpoint θ(1)", shown="required", group="curve",
                                  role="input")
    curve: str = option("Bezier", "Bezier or PolyChain, any case", group="curve", role="result")
    num_bends: int = option(3, "control points including both ends", minimum=2, group="curve", maximum=MAX_BENDS,
                            role="result")
    fix_start: bool = option(False, "keep θ(0) at the start endpoint", group="curve", role="result")
    fix_end: bool = option(False, "keep θ(1) at the end endpoint", group="curve", role="result")
    init_linear_off: bool = option(False, "leave inner bends at a fresh initialisation instead of on the segment",
                                   group="curve", role="result")
    model: str | None = option(None, "the endpoints' model factory; needed (the same value) when the endpoints were "
                                     "made with a factory outside aecurves, whose code is never imported unasked",
                               shown="the endpoints', if built into aecurves", group="curve")
    loss: str | None = option(None, "", shown=ENDPOINTS, choices=LOSSES, group="training", role="model")
    kl_weight: float | None = same_as(TrainConfig, "kl_weight", default=None, shown=ENDPOINTS)
    batch_size: int = same_as(TrainConfig, "batch_size", group="training")
    epochs: int = option(10, "", minimum=1, group="training", maximum=MAX_EPOCHS, role="result", carried=True)
    lr: float = option(1e-3, "Adam base learning rate for the bends", positive=True, maximum=MAX_LR, group="training",
                       role="result", carried=True)
    # a checkpoint from before the lr schedules and t sampling existed was trained with a constant lr and uniform t
    lr_schedule: str = option("paper", "paper: the base lr for the first half of training, then linearly down to 1% "
                                       "of it at 90%, 1% after (Garipov et al.'s train.py, set before every step); "
                                       "cosine: down to 0; constant", choices=LR_SCHEDULES, group="training",
                              role="result", legacy="constant")
    t_sampling: str = option("stratified", "how each batch's t is drawn: stratified (each epoch takes one t from "
                                           "each of its N equal slices of [0, 1], in random order, so every epoch "
                                           "covers the whole curve) or uniform (i.i.d. U(0, 1), as the paper)",
                             choices=T_SAMPLING, group="training", role="result", legacy="uniform")
    bn_images: int = option(BN_IMAGES, "training images for the BatchNorm statistics of the per-epoch midpoint "
                                       "monitor: the same fixed subset as eval-curve --bn-images, so the last "
                                       "figure equals eval-curve's at t = 0.5", minimum=1, group="training",
                                       maximum=MAX_IMAGES, role="result")
    wd: float = option(0.0, "weight of the regulariser wd/2·‖θ(t)‖² added to the loss", minimum=0,
                       group="training", maximum=MAX_WD, role="result")
    seed: int = option(1, "seed for t sampling and shuffling", group="training", minimum=0, maximum=MAX_SEED,
                       role="result")
    out: str = option("runs/curve", "run folder", aliases=("--dir",), group="outputs")
    save_every_epoch: int = option(1, "checkpoint every N epochs and at the end", minimum=1, group="outputs",
                                   maximum=MAX_EPOCHS, carried=True)
    resume: bool = option(False, "continue the curve run in --out from its checkpoint (settings not given "
                                 "explicitly come from it)", group="outputs")
    device: str = same_as(RuntimeConfig, "device")
    precision: str = same_as(RuntimeConfig, "precision")
    memory_format: str = same_as(RuntimeConfig, "memory_format")
    compile: bool = same_as(RuntimeConfig, "compile", help="run the base network's forward and backward at θ(t) "
                            "through torch.compile (θ(t) itself is computed uncompiled); where it cannot compile, "
                            "the run goes on uncompiled with a note")
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    wandb: str | None = same_as(RuntimeConfig, "wandb")
    wandb_entity: str | None = same_as(RuntimeConfig, "wandb_entity")
    wandb_group: str | None = same_as(RuntimeConfig, "wandb_group")
    wandb_name: str | None = same_as(RuntimeConfig, "wandb_name")
    given: tuple = _given()


@dataclass
class EvalCurveConfig:
    """`aecurves eval-curve`: metrics and reconstructions along a curve or a segment."""

    ckpt: str | None = option(None, "curve checkpoint from train-curve", group="what to evaluate (one of)",
                              role="input")
    segment: list | None = option(None, "two endpoint checkpoints: evaluate the straight segment between them "
                                        "(nothing to train)", nargs=2, metavar=("START", "END"),
                                  group="what to evaluate (one of)", role="input")
    num_points: int = option(61, "points t evenly spaced in [0, 1]", minimum=2, group="evaluation", maximum=MAX_POINTS,
                             role="result")
    bn_images: int = option(BN_IMAGES, "training images (a fixed subset drawn once) for the BatchNorm statistics "
                                       "at each t", minimum=1, group="evaluation", maximum=MAX_IMAGES,
                            role="result")
    train_images: int = option(TRAIN_IMAGES, "training images for the train metrics: a fixed subset stratified by "
                                             "the start endpoint's per-image MSE", minimum=1, group="evaluation",
                                             maximum=MAX_IMAGES, role="result")
    full: bool = option(False, "use all training images for both, as the paper does", group="evaluation",
                        role="result")
    num_images: int = option(4, "held-out images in the reconstruction pictures", minimum=0, group="evaluation",
                             maximum=MAX_PICTURE_IMAGES, role="result")
    segment_too: bool = option(True, "for a curve, also evaluate the segment between its endpoints",
                               negative_flag="--no-segment-too", group="evaluation", role="result")
    renormalize: bool = option(False, "REPAIR's correction (Jordan et al. 2023) at every t: each Conv/Linear layer "
                                      "not read by a BatchNorm, but the output layer (built-in model: the two "
                                      "latent Linears), gets each output channel's mean and std on the BN images "
                                      "interpolated between the endpoints', folded into its weight and bias; the "
                                      "paths are then labelled 'renormalised'. Not with --ensemble",
                               group="evaluation", role="result", legacy=False)
    precision: str = option("fp32", "fp32; or bf16: the forward passes under bf16 autocast (BatchNorm, the losses, "
                                    "SSIM and every sum stay fp32), faster where the hardware runs bf16 fast",
                            choices=("fp32", "bf16"), group="evaluation")
    points_per_call: int = option(0, "networks evaluated together, their weights stacked (torch.func.vmap): the "
                                     "same numbers to float rounding, faster where one network leaves the device "
                                     "idle (a GPU); 0: chosen from the free GPU memory, 1 on a CPU (where it "
                                     "measured slower)", minimum=0, metavar="N", group="evaluation",
                                     maximum=MAX_POINTS_PER_CALL)
    memory_format: str = same_as(RuntimeConfig, "memory_format", help="of the image batches: channels_last measured "
                                 "faster on a CPU at the same numbers to float rounding; a model whose forward "
                                 "cannot take it falls back to contiguous, with a note", group="evaluation")
    compile: bool = same_as(RuntimeConfig, "compile", help="run each point's network through torch.compile (one "
                            "compile serves every point: the weights are its inputs); where it cannot compile, the "
                            "evaluation goes on uncompiled with a note", group="evaluation")
    ensemble: int = option(0, "K >= 2: also measure on the held-out images (a) the output average of the path's "
                              "networks at K evenly spaced t in [0, 1], (b) that of its two endpoints and (c) the "
                              "network at the mean of the K points' weights, each with BN statistics recomputed "
                              "like every point's (and ensemble.png); 0: off", minimum=0, metavar="K",
                           group="evaluation", maximum=MAX_ENSEMBLE, role="result", legacy=0)
    batch_size: int = option(EVAL_BATCH_SIZE, "BN statistics are averaged per batch, so it is part of the "
                                              "protocol", minimum=1, group="evaluation", maximum=MAX_BATCH_SIZE,
                            role="result")
    use_test: bool = same_as(DataConfig, "use_test", "hold out the official test partition (celeba)",
                             group="evaluation")
    loss: str | None = option(None, "the reconstruction loss to evaluate; needed for a segment between endpoints "
                                    "trained with different losses", shown="the checkpoint's", choices=LOSSES,
                              group="evaluation", role="model")
    dataset: str | None = same_as(DataConfig, "dataset", "", default=None, shown="the checkpoint's",
                                  group="evaluation")
    data_dir: str | None = same_as(DataConfig, "data_dir", "", shown="the checkpoint's", group="evaluation")
    cache_dir: str | None = same_as(DataConfig, "cache_dir", group="evaluation")
    model: str | None = same_as(TrainCurveConfig, "model", help="the checkpoint's model factory; needed (the same "
                                "value) when it is outside aecurves", shown="the checkpoint's, if built into "
                                "aecurves", group="evaluation")
    out: str | None = option(None, "output folder",
                             shown=f"CKPT_FOLDER/eval for a curve, {DEFAULT_SEGMENT_OUT} for a segment",
                             aliases=("--dir",), group="evaluation")
    overwrite: bool = option(False, "replace the evaluation already in --out (without it, a folder holding an "
                                    "eval.json is refused)", group="evaluation")
    device: str = same_as(RuntimeConfig, "device")
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights", help="VGG16 weights for the perceptual metric and "
                               "vgg-loss checkpoints: imagenet, PATH or random (when unavailable the perceptual "
                               "metric is left out)")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    wandb: str | None = same_as(RuntimeConfig, "wandb")
    wandb_entity: str | None = same_as(RuntimeConfig, "wandb_entity")
    wandb_group: str | None = same_as(RuntimeConfig, "wandb_group")
    wandb_name: str | None = same_as(RuntimeConfig, "wandb_name")
    given: tuple = _given()


@dataclass
class ExportPointConfig:
    """`aecurves export-point`: θ(t) of a curve as an ordinary checkpoint."""

    ckpt: str | None = option(None, "curve checkpoint (from train-curve)", required=True, role="input")
    t: float | None = option(None, "position on the curve, in [0, 1]", required=True, role="result")
    out: str | None = option(None, "file to write (an ordinary autoencoder checkpoint)", required=True)
    bn_images: int = option(BN_IMAGES, "training images used to recompute BatchNorm statistics at t; 0 keeps the "
                                       "curve's", minimum=0, maximum=MAX_IMAGES, role="result")
    format: str = option("checkpoint", "checkpoint: an aecurves endpoint checkpoint, which every command accepts; "
                                       "safetensors or state_dict: the plain weights, which load into a bare model "
                                       "with load_state_dict (its architecture is written beside them, in OUT.json)",
                         choices=EXPORT_FORMATS)
    batch_size: int = same_as(EvalCurveConfig, "batch_size", help="", group=None)
    cache_dir: str | None = same_as(DataConfig, "cache_dir", group=None)
    model: str | None = same_as(EvalCurveConfig, "model", group=None)
    device: str = same_as(RuntimeConfig, "device", group=None)
    no_progress: bool = same_as(RuntimeConfig, "no_progress", group=None)
    given: tuple = _given()


@dataclass
class AlignConfig:
    """`aecurves align`: end endpoint B reordered (and its latent code mapped) to match start endpoint A."""

    init_start: str | None = option(None, "endpoint A, the one aligned to", required=True, role="input")
    init_end: str | None = option(None, "endpoint B, the one reordered", required=True, role="input")
    out: str | None = option(None, "file to write: B aligned to A, an ordinary endpoint checkpoint", required=True)
    method: str = option("activations", "activations: match hidden units by the correlation of their activations "
                                        "on --images training images; weights: weight matching (data-free, "
                                        "Ainsworth et al.) on the weights with BatchNorm folded in (W·γ/σ and the "
                                        "effective bias), each unit's row normalised; weights-raw: weight matching "
                                        "on the raw weights and BatchNorm tensors, as Git Re-Basin; both: "
                                        "activation matching, then weight matching starting from it; mixed: "
                                        "coordinate descent on --alpha · correlation + (1 − alpha) · weight cosine, "
                                        "started from activation matching; learned: the permutation learned with a "
                                        "straight-through estimator (Git Re-Basin's Algorithm 3) for --steps "
                                        "steps, started from activation matching", choices=ALIGN_METHODS,
                         role="result")
    alpha: float = option(0.5, "mixed: the weight of the activations' correlation against the weights' cosine",
                          minimum=0, maximum=1, role="result", needs=(("method", ("mixed",)),))
    steps: int = option(200, "learned: straight-through steps (each one a batch of --images training images and a "
                             "weight matching)", minimum=1, maximum=MAX_EPOCHS,
                        role="result", needs=(("method", ("learned",)),))
    ste_lr: float = option(1e-3, "learned: Adam learning rate of the continuous weights", positive=True,
                           maximum=MAX_LR, role="result", needs=(("method", ("learned",)),))
    match_at: str = option("pre", "where activation matching reads a unit: pre (the output of the layer that "
                                   "writes it) or post (as the next layer reads it, after BatchNorm and the "
                                   "activation)", choices=("pre", "post"), role="result",
                           needs=(("method", ACTIVATION_METHODS),))
    latent: str = option("permutation", "the bottleneck: none (left as it is), permutation (matched like the "
                                       "hidden units), orthogonal (Procrustes on the two networks' codes of the "
                                       "same images) or linear (least squares on them)", choices=LATENT_MAPS,
                         role="result")
    images: int = option(1024, "training images for activation matching and the latent map (--latent linear: at "
                               "least the latent size)", minimum=MIN_ALIGN_IMAGES, maximum=MAX_IMAGES,
                         role="result", needs=(("method", ACTIVATION_METHODS), ("latent", ("orthogonal", "linear"))))
    batch_size: int = same_as(EvalCurveConfig, "batch_size", help="", group=None)
    seed: int = option(0, "seed of weight matching's visiting order and of the learned method's batches and λ",
                       minimum=0, maximum=MAX_SEED, role="result",
                       needs=(("method", tuple(m for m in ALIGN_METHODS if m != "activations")),))
    cache_dir: str | None = same_as(DataConfig, "cache_dir", group=None)
    model: str | None = same_as(EvalCurveConfig, "model", group=None)
    device: str = same_as(RuntimeConfig, "device", group=None)
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights", help="learned, for vgg-loss endpoints: VGG16 weights "
                               "of the loss (imagenet, PATH or random)", group=None, needs=(("method", ("learned",)),))
    no_progress: bool = same_as(RuntimeConfig, "no_progress", group=None)
    given: tuple = _given()


@dataclass
class PlaneConfig:
    """`aecurves plane`: losses on a grid over the plane through a curve's first, middle and last bend (or
    through three networks)."""

    ckpt: str | None = option(None, "curve checkpoint from train-curve: the plane through its first, middle and "
                                    "last bend", group="the plane (one of)", role="input")
    points: list | None = option(None, "three endpoint checkpoints: the plane through them (A at the origin, C on "
                                       "the first axis, B above it)", nargs=3, metavar=("A", "B", "C"),
                                 group="the plane (one of)", role="input")
    grid: int = option(21, "grid points per side (G x G networks are evaluated)", minimum=2,
                       aliases=("--grid-points", "--grid_points"), group="grid", maximum=MAX_GRID,
                       role="result")
    margin: float = option(0.2, "margin on every side of the three points, as a fraction of the distance between "
                                "the first and last (along x) and of the middle one's distance from the line "
                                "through them (along y)", minimum=0, group="grid", maximum=MAX_MARGIN,
                           role="result")
    margin_left: float | None = option(None, "margin left of the first point", shown="--margin", minimum=0,
                                       group="grid", maximum=MAX_MARGIN, role="result")
    margin_right: float | None = option(None, "margin right of the last point", shown="--margin", minimum=0,
                                        group="grid", maximum=MAX_MARGIN, role="result")
    margin_bottom: float | None = option(None, "margin below the line through the first and last point",
                                         shown="--margin", minimum=0, group="grid", maximum=MAX_MARGIN,
                                         role="result")
    margin_top: float | None = option(None, "margin above the middle point", shown="--margin", minimum=0,
                                      group="grid", maximum=MAX_MARGIN, role="result")
    curve_points: int = option(61, "points t along the curve (and the segment) for their projection on the "
                                   "plane", minimum=2, group="grid", maximum=MAX_POINTS,
                               role="result")
    bn_images: int = same_as(EvalCurveConfig, "bn_images", help="training images (a fixed subset drawn once: "
                             "eval-curve's) for the BatchNorm statistics at each grid point")
    train_images: int = same_as(EvalCurveConfig, "train_images")
    full: bool = same_as(EvalCurveConfig, "full")
    batch_size: int = same_as(EvalCurveConfig, "batch_size")
    precision: str = same_as(EvalCurveConfig, "precision")
    points_per_call: int = same_as(EvalCurveConfig, "points_per_call")
    memory_format: str = same_as(EvalCurveConfig, "memory_format")
    use_test: bool = same_as(EvalCurveConfig, "use_test")
    loss: str | None = same_as(EvalCurveConfig, "loss", help="the reconstruction loss to evaluate; needed for "
                               "--points whose networks were trained with different losses")
    cache_dir: str | None = same_as(EvalCurveConfig, "cache_dir")
    model: str | None = same_as(EvalCurveConfig, "model")
    out: str | None = option(None, "output folder", shown="CKPT_FOLDER/plane for a curve, runs/plane for --points",
                             aliases=("--dir",), group="evaluation")
    overwrite: bool = same_as(EvalCurveConfig, "overwrite", help="replace the plane already in --out (without it, a "
                              "folder holding a plane.json is refused)")
    device: str = same_as(RuntimeConfig, "device")
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights", help="VGG16 weights for vgg-loss checkpoints: imagenet, "
                               "PATH or random")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    given: tuple = _given()


# fge.py's defaults are lr_1 0.05 and lr_2 1e-4 for SGD; the endpoints here are trained with Adam at their own
# --lr, so FGE's lr_1 is the endpoint's lr and lr_2 keeps fge.py's ratio of the two.
FGE_LR_2_RATIO = 0.002  # 1e-4 / 0.05


@dataclass
class FgeConfig:
    """`aecurves fge`: fast geometric ensembling (Garipov et al. 2018, fge.py): cyclical-lr snapshots of one
    endpoint, and their output average. On --resume, --epochs may grow (the schedule does not depend on it); --model
    is a permission, not a setting: it is checked against the checkpoint's factory."""

    ckpt: str | None = option(None, "the endpoint to start from (a checkpoint from train or export-point)",
                              shown="required; with --resume, the run's", metavar="ENDPOINT", role="input")
    epochs: int = option(20, "epochs of FGE training, its budget (20 as in fge.py)", minimum=1, maximum=MAX_EPOCHS,
                         group="ensembling", role="result", carried=True)
    cycle: int = option(4, "cycle length in epochs, even (4 as in fge.py); a snapshot is taken at the end of "
                           "each cycle's first half, where the lr is lowest", minimum=2, maximum=MAX_EPOCHS,
                        group="ensembling", role="result")
    lr_1: float | None = option(None, "the highest lr of each cycle (Adam)", shown="the endpoint's --lr",
                                positive=True, maximum=MAX_LR, group="ensembling", role="result")
    lr_2: float | None = option(None, "the lowest lr of each cycle", shown=f"--lr-1 x {FGE_LR_2_RATIO:g}, "
                                "fge.py's ratio 1e-4/0.05", positive=True, maximum=MAX_LR, group="ensembling",
                                role="result")
    wd: float | None = option(None, "Adam weight decay", shown="the endpoint's", minimum=0, maximum=MAX_WD,
                              group="ensembling", role="result")
    batch_size: int | None = option(None, "training batch size", shown="the endpoint's", minimum=1,
                                    maximum=MAX_BATCH_SIZE, group="ensembling", role="result")
    seed: int = option(1, "seed of the shuffling (1 as in fge.py)", minimum=0, maximum=MAX_SEED,
                       group="ensembling", role="result")
    kl_weight: float | None = same_as(TrainConfig, "kl_weight", default=None, shown="the endpoint's",
                                      group="ensembling", role="result")
    bn_images: int = same_as(EvalCurveConfig, "bn_images", help="training images (a fixed subset drawn once: "
                             "eval-curve's) for the BatchNorm statistics of every snapshot and of the starting "
                             "endpoint", group="ensembling")
    out: str = option("runs/fge", "run folder: snapshot_K.pt, fge.json, metrics.jsonl, checkpoint.pt",
                      aliases=("--dir",), group="outputs")
    resume: bool = option(False, "continue the FGE run in --out from its checkpoint.pt (settings not given "
                                 "explicitly come from it; --epochs may grow)", group="outputs")
    num_images: int = option(8, "held-out images in reconstructions.png (the endpoint, every snapshot and their "
                                "average); 0: no picture", minimum=0, maximum=MAX_PICTURE_IMAGES, group="outputs")
    cache_dir: str | None = same_as(DataConfig, "cache_dir", group="runtime")
    model: str | None = same_as(EvalCurveConfig, "model", help="the endpoint's model factory; needed (the same "
                                "value) when it is outside aecurves", shown="the endpoint's, if built into "
                                "aecurves", group="runtime")
    device: str = same_as(RuntimeConfig, "device")
    precision: str = same_as(RuntimeConfig, "precision")
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights", help="VGG16 weights for the training loss of a vgg-loss "
                               "endpoint: imagenet, PATH or random")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    wandb: str | None = same_as(RuntimeConfig, "wandb")
    wandb_entity: str | None = same_as(RuntimeConfig, "wandb_entity")
    wandb_group: str | None = same_as(RuntimeConfig, "wandb_group")
    wandb_name: str | None = same_as(RuntimeConfig, "wandb_name")
    given: tuple = _given()


@dataclass
class EnsemblesConfig:
    """A study stage (no command of its own): the output averages of saved networks on their held-out images
    (ensembles.py), e.g. a pair's FGE snapshots pooled from both endpoints' runs."""

    networks: list = option(factory=list, help="checkpoint files (endpoints, FGE snapshots), one network each",
                            role="input")
    # which of the networks are averaged: part of the input (the study redoes a stage that measured others)
    averages: dict = option(factory=dict, help="name -> indices into --networks: the networks averaged",
                            role="input")
    bn_images: int = same_as(EvalCurveConfig, "bn_images", help="training images (eval-curve's fixed subset) for "
                             "every network's BatchNorm statistics")
    out: str = option("runs/ensembles", "folder: ensembles.json")
    cache_dir: str | None = same_as(DataConfig, "cache_dir")
    model: str | None = same_as(EvalCurveConfig, "model")
    device: str = same_as(RuntimeConfig, "device")
    no_progress: bool = same_as(RuntimeConfig, "no_progress")
    given: tuple = _given()


@dataclass
class ReportConfig:
    """`aecurves report`: (re)writes a study's report from its files."""

    study_dir: str = option("runs/study", "the study folder (holding study.json)", positional=True, nargs="?")
    given: tuple = _given()


# ----------------------------------------------------------------------------------------------------------
# the study: its own defaults, its presets, and the stage settings it shares with the commands

PRESETS = {
    # The embedded LFW faces (100 grayscale 32x32 images, 86 train / 14 held out) and a narrower network: the
    # whole study takes minutes on a 2-core CPU (docs/performance.md gives the measured time) and shows a clear barrier
    # on every segment that the curves remove almost entirely.
    "demo": {"dataset": "lfw", "image_size": 32, "epochs": 60, "lr": 3e-3, "batch_size": 32, "width": 16,
             "save_every_epoch": 20, "curve_epochs": 60, "curve_lr": 3e-3, "plane_grid": 21},
    # The founding document's setting: CelebA 64x64, bottleneck 128, batch 64, 30 epochs at Adam lr 1e-4.
    # Curves: 10 epochs (~25,000 Adam steps on CelebA's 162,770 training images) at the endpoints' lr 1e-4.
    # No plane by default: 441 networks evaluated on CelebA take long on anything but a GPU (see docs/performance.md).
    "celeba": {"dataset": "celeba", "image_size": 64, "epochs": 30, "lr": 1e-4, "batch_size": 64, "width": 32,
               "save_every_epoch": 5, "curve_epochs": 10, "curve_lr": 1e-4, "plane_grid": 0},
}


def _preset(name: str, help: str, **kw):
    shown = ", ".join(f"{p}: {v[name]}" for p, v in PRESETS.items())
    return option(None, help, shown=shown, **kw)


# The study's stages, one section per kind (named as --force names the kinds): the config of the command that makes
# them, with what the study fixes for every stage of that kind. Each study setting is copied into the section fields
# its `sets` names (section_settings); each stage then adds its own files, seed and folder (the study's kinds.KINDS).
STUDY_SECTIONS = {
    "endpoints": (TrainConfig, {}),
    "extras": (TrainConfig, {}),  # train --init: the endpoint's data and model, trained on as long as a curve
    "fges": (FgeConfig, {}),
    "aligns": (AlignConfig, {}),
    "curves": (TrainCurveConfig, {"fix_start": True, "fix_end": True}),
    # overwrite: a stage the study finds unfinished is redone in its folder
    "evals": (EvalCurveConfig, {"segment_too": True, "overwrite": True}),
    "ensembles": (EnsemblesConfig, {}),
    "planes": (PlaneConfig, {"overwrite": True}),
}
EVERY_SECTION = tuple(STUDY_SECTIONS)
TRAINING_SECTIONS = ("endpoints", "extras", "fges", "curves")
EVALUATING_SECTIONS = ("evals", "planes")
ENDPOINTS_GROUP = "endpoints (aecurves train)"
CURVES_GROUP = "curves (aecurves train-curve; both ends fixed)"
EVALUATION_GROUP = "evaluation (aecurves eval-curve: every curve and its segment)"


@dataclass
class StudyConfig:
    """`aecurves study`: endpoints, curves, evaluations and a report. None: the preset's value. A setting that a
    stage's command has names in `sets` the section fields it is copied into (STUDY_SECTIONS)."""

    preset: str = option("demo", "demo: embedded LFW faces, a few minutes on a CPU; celeba: the full setting (needs "
                                 "--data-dir)", choices=tuple(PRESETS), group="study")
    out: str = option("runs/study", "study folder", aliases=("--dir",), group="study")
    losses: str = option("mse,vgg", "comma-separated losses, one group each", group="study")
    seeds: str = option("1,2,3", "comma-separated endpoint seeds per loss; one curve per pair", group="study")
    force: list = option(factory=list, help="redo a stage even if finished (repeatable): endpoint:mse:1, "
                         "curve:mse:1-2, eval:mse:1-2, report, or endpoints, curves, evals, a loss (mse, vgg), a "
                         "prefix such as curve:mse, or all", shown="none", repeat=True, metavar="STAGE",
                         group="study", recorded=False)
    dataset: str | None = _preset("dataset", "celeba, folder, lfw or synthetic", choices=DATASETS, group="data",
                                  sets=("endpoints",))
    data_dir: str | None = same_as(DataConfig, "data_dir", sets=("endpoints",))
    image_size: int | None = _preset("image_size", "side of the square images", minimum=1, group="data",
                                     maximum=MAX_IMAGE_SIZE, sets=("endpoints",))
    limit: int | None = same_as(DataConfig, "limit", sets=("endpoints",))
    val_fraction: float = same_as(DataConfig, "val_fraction", sets=("endpoints",))
    use_test: bool = same_as(DataConfig, "use_test", sets=("endpoints", *EVALUATING_SECTIONS))
    cache_dir: str | None = same_as(DataConfig, "cache_dir", sets=EVERY_SECTION)
    # the other sections read checkpoints: the study (settings.section) passes them the model only when it is outside
    # aecurves
    model: str = same_as(TrainConfig, "model", group=ENDPOINTS_GROUP, sets=EVERY_SECTION)
    model_kwargs: dict = same_as(TrainConfig, "model_kwargs", group=ENDPOINTS_GROUP, sets=("endpoints",))
    epochs: int | None = _preset("epochs", "endpoint epochs", minimum=1, group=ENDPOINTS_GROUP, maximum=MAX_EPOCHS,
                                 sets=("endpoints",))
    lr: float | None = _preset("lr", "endpoint Adam learning rate", positive=True, maximum=MAX_LR,
                               group=ENDPOINTS_GROUP, sets=("endpoints",))
    lr_schedule: str = option("paper", "endpoint lr schedule (paper, so the endpoints converge before a barrier is "
                                       "measured)", choices=LR_SCHEDULES, group=ENDPOINTS_GROUP, sets=("endpoints",))
    batch_size: int | None = _preset("batch_size", "batch size for endpoints and curves", minimum=1,
                                     group=ENDPOINTS_GROUP, maximum=MAX_BATCH_SIZE, sets=TRAINING_SECTIONS)
    latent_dim: int = same_as(TrainConfig, "latent_dim", group=ENDPOINTS_GROUP, sets=("endpoints",))
    # curves and FGE take it from their endpoints' checkpoints
    kl_weight: float = same_as(TrainConfig, "kl_weight", group=ENDPOINTS_GROUP, sets=("endpoints",))
    width: int | None = _preset("width", "channels of the first conv stage (the built-in model only)", minimum=1,
                                group=ENDPOINTS_GROUP, maximum=MAX_WIDTH, sets=("endpoints",))
    save_every_epoch: int | None = _preset("save_every_epoch", "endpoint checkpoint copies every N epochs",
                                           minimum=1, group=ENDPOINTS_GROUP, maximum=MAX_EPOCHS, sets=("endpoints",))
    curve: str = same_as(TrainCurveConfig, "curve", group=CURVES_GROUP, sets=("curves",))
    num_bends: int = same_as(TrainCurveConfig, "num_bends", minimum=3, group=CURVES_GROUP, sets=("curves",))
    # the equal budget: the extra training and FGE get as many epochs as a curve, at the curves' lr
    curve_epochs: int | None = _preset("curve_epochs", "curve epochs", minimum=1, group=CURVES_GROUP,
                                       maximum=MAX_EPOCHS, sets=("curves.epochs", "extras.epochs",
                                                                 "extras.save_every_epoch", "fges.epochs"))
    curve_lr: float | None = _preset("curve_lr", "Adam learning rate for the bends", positive=True, maximum=MAX_LR,
                                     group=CURVES_GROUP, sets=("curves.lr", "extras.lr", "fges.lr_1"))
    curve_lr_schedule: str = same_as(TrainCurveConfig, "lr_schedule", help="lr schedule of the curves",
                                     group=CURVES_GROUP, sets=("curves.lr_schedule", "extras.lr_schedule"))
    t_sampling: str = same_as(TrainCurveConfig, "t_sampling", help="how the curves draw t per batch (see "
                              "train-curve --help)", group=CURVES_GROUP, sets=("curves",))
    wd: float = same_as(TrainCurveConfig, "wd", group=CURVES_GROUP, sets=("curves", "extras", "fges"))
    extra_training: bool = option(True, "(on by default) also train every endpoint on for --curve-epochs at the "
                                        "curves' lr and schedule (aecurves train --init): a curve's bend gets that "
                                        "much training, so a path's best point is compared with these too",
                                  negative_flag="--no-extra-training", group=CURVES_GROUP)
    fge: bool = option(True, "(on by default) also run fast geometric ensembling from every endpoint (aecurves fge "
                             "--ckpt ENDPOINT) for --curve-epochs epochs at the curves' lr, and measure every pair's "
                             "ensembles at that equal budget: the curve's, the endpoints', the FGE snapshots' of both "
                             "endpoints, the extra-trained endpoints'", negative_flag="--no-fge",
                       group="fast geometric ensembling (aecurves fge)")
    fge_cycle: int | None = option(None, "FGE cycle length in epochs, even: a snapshot at the end of each cycle's "
                                         "first half, where the lr is lowest",
                                   shown=f"{FgeConfig.__dataclass_fields__['cycle'].default} (fge's) when it takes at "
                                         "least 2 snapshots within --curve-epochs, else 2",
                                   minimum=2, maximum=MAX_EPOCHS, group="fast geometric ensembling (aecurves fge)",
                                   sets=("fges.cycle",), needs=(("fge", (True,)),))
    align: bool = option(True, "(on by default) for every pair also align B to A (aecurves align), evaluate the "
                               "segment to the aligned B and train a curve to it", negative_flag="--no-align",
                         group="alignment (aecurves align)")
    align_method: str = same_as(AlignConfig, "method", group="alignment (aecurves align)", sets=("aligns.method",),
                                needs=(("align", (True,)),))
    align_latent: str = same_as(AlignConfig, "latent", group="alignment (aecurves align)", sets=("aligns.latent",),
                                needs=(("align", (True,)),))
    ensemble: int = option(5, "K: every curve's evaluation also measures the output average of K of its points, "
                              "of its two endpoints, and the network at the mean of the K points' weights "
                              "(eval-curve --ensemble); 0: off", minimum=0, metavar="K", group=EVALUATION_GROUP,
                           maximum=MAX_ENSEMBLE, sets=("evals",))
    plane_grid: int | None = _preset("plane_grid", "grid points per side of one loss plane per group, through the "
                                     "curve of its first pair (aecurves plane); 0: no plane", minimum=0,
                                     group="loss plane (aecurves plane)", maximum=MAX_GRID, sets=("planes.grid",))
    num_points: int = same_as(EvalCurveConfig, "num_points", help="points t per path", group=EVALUATION_GROUP,
                              sets=("evals",))
    bn_images: int = same_as(EvalCurveConfig, "bn_images", help="training images for BN statistics at each t and "
                             "in the curves' midpoint monitor", group=EVALUATION_GROUP,
                             sets=("fges", "curves", "evals", "ensembles", "planes"))
    train_images: int = same_as(EvalCurveConfig, "train_images", help="training images for train metrics",
                                group=EVALUATION_GROUP, sets=EVALUATING_SECTIONS)
    device: str = same_as(RuntimeConfig, "device", sets=EVERY_SECTION)
    # evaluations keep eval-curve's own precision (fp32)
    precision: str = same_as(RuntimeConfig, "precision", sets=TRAINING_SECTIONS)
    # align runs the loss only with its learned method: the study (settings.section) passes it the VGG weights only
    # then
    vgg_weights: str = same_as(RuntimeConfig, "vgg_weights", sets=(*TRAINING_SECTIONS, "aligns",
                                                                   *EVALUATING_SECTIONS))
    no_progress: bool = same_as(RuntimeConfig, "no_progress", sets=EVERY_SECTION)
    wandb: str | None = same_as(RuntimeConfig, "wandb", help="also log every training and evaluation stage to "
                                "Weights & Biases, in this project, each a run named by its stage in one group, and "
                                "the study's summary numbers in a run named study",
                                sets=WANDB_SECTIONS)
    wandb_entity: str | None = same_as(RuntimeConfig, "wandb_entity", sets=WANDB_SECTIONS)
    wandb_group: str | None = same_as(RuntimeConfig, "wandb_group", help="the W&B group of the study's runs",
                                      shown="the study folder's name", sets=WANDB_SECTIONS)
    plan: bool = option(False, "print the stages, what each depends on and its state (done, to run, to redo and "
                               "why), then exit", group="study", recorded=False)
    executor: str = same_as(RuntimeConfig, "executor")
    jobs: int | None = same_as(RuntimeConfig, "jobs")
    devices: str | None = same_as(RuntimeConfig, "devices")
    gpus_per_train: int = same_as(RuntimeConfig, "gpus_per_train")
    slurm_partition: str | None = same_as(RuntimeConfig, "slurm_partition")
    slurm_time: int = same_as(RuntimeConfig, "slurm_time")
    slurm_gpus: int = same_as(RuntimeConfig, "slurm_gpus")
    slurm_train_tasks: int | None = same_as(RuntimeConfig, "slurm_train_tasks")
    slurm_cpus: int | None = same_as(RuntimeConfig, "slurm_cpus")
    slurm_mem: str | None = same_as(RuntimeConfig, "slurm_mem")
    slurm_account: str | None = same_as(RuntimeConfig, "slurm_account")
    slurm_qos: str | None = same_as(RuntimeConfig, "slurm_qos")
    slurm_setup: list = same_as(RuntimeConfig, "slurm_setup")
    slurm_extra: list = same_as(RuntimeConfig, "slurm_extra")
    slurm_max_jobs: int = same_as(RuntimeConfig, "slurm_max_jobs")
    given: tuple = _given()


COMMANDS = {"train": TrainConfig, "train-curve": TrainCurveConfig, "eval-curve": EvalCurveConfig,
            "export-point": ExportPointConfig, "align": AlignConfig, "plane": PlaneConfig, "fge": FgeConfig,
            "study": StudyConfig, "report": ReportConfig}


# ----------------------------------------------------------------------------------------------------------
# helpers


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(f: dataclasses.Field):
    """The type a field's values have, without its `| None`."""
    tp = f.type
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "none" if default is None else str(default)


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--model-kwargs takes a JSON object such as '{{\"hidden\": 512}}'; {text!r} is not JSON "
                        f"({exc}).") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-kwargs takes a JSON object such as '{{\"hidden\": 512}}', got {text!r}.")
    return value


def validate(cfg) -> None:
    """Bounds, choices and types of every field, for configs from the CLI and from Python alike."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or not meta.get("cli", True):
            continue
        name, kind = flag_name(f.name), value_type(f)
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"{name} must be an integer, got {value!r}.")
        if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise UserError(f"{name} must be a number, got {value!r}.")
        for wanted, words in ((str, "a string"), (bool, "true or false"), (dict, "a table (a JSON object)"),
                              (list, "a list")):
            if kind is wanted and not isinstance(value, wanted):
                raise UserError(f"{name} must be {words}, got {value!r}.")
        count = meta.get("nargs") if isinstance(meta.get("nargs"), int) else None
        if kind is list and (not all(isinstance(v, str) for v in value) or count not in (None, len(value))):
            names = f" ({' '.join(meta['metavar'])})" if isinstance(meta.get("metavar"), tuple) else ""
            raise UserError(f"{name} takes {f'exactly {count} values' if count else 'a list of strings'}{names}, got "
                            f"{value!r}.")
        if meta.get("choices") and value not in meta["choices"]:
            raise UserError(f"Unknown {name} {value!r}; choose one of: {', '.join(meta['choices'])}.")
        if kind is float and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}.")
        if kind is str and f.name == "out" and not value.strip():
            raise UserError(f"{name} must name a folder or file; an empty name would write into the current "
                            "folder.")
        if meta.get("minimum") is not None and not value >= meta["minimum"]:
            raise UserError(f"{name} must be at least {_number(meta['minimum'])}, got {value}.")
        if meta.get("maximum") is not None and not value <= meta["maximum"]:
            raise UserError(f"{name} must be at most {_number(meta['maximum'])}, got {value}.")
        if meta.get("positive") and not value > 0:
            raise UserError(f"{name} must be positive, got {value}.")
    check_wandb(cfg)


def check_wandb(cfg) -> None:
    """--wandb names a project; the other W&B settings only say where its runs go, and are refused without it."""
    if not hasattr(cfg, "wandb"):
        return
    if cfg.wandb is not None and not cfg.wandb.strip():
        raise UserError("--wandb takes the name of a W&B project, got an empty one.")
    stray = [flag_name(k) for k in ("wandb_entity", "wandb_group", "wandb_name") if getattr(cfg, k, None) is not None]
    if stray and cfg.wandb is None:
        raise UserError(f"{', '.join(stray)} would be ignored without --wandb PROJECT: W&B settings say where the "
                        "run's W&B run goes. Pass --wandb PROJECT, or leave them out; nothing was run.")


def check_needs(cls, values: dict, defaults: dict | None = None) -> None:
    """Refuses a setting changed from its default (`defaults` replace the fields' own) while the feature it belongs
    to is off: none of its `needs` holds. It would be ignored in silence, as the study refuses the settings of
    another executor (study.check_executor_flags), before any work."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        needs, value = f.metadata.get("needs"), values.get(f.name)
        default = (defaults or {}).get(f.name, f.default)
        if not needs or value is None or value == default or any(values[k] in ok for k, ok in needs):
            continue
        flag, first = flag_name(f.name), fields[needs[0][0]]
        if value_type(first) is bool:  # a feature on by default, switched off by its negative flag
            off = first.metadata["negative_flag"]
            raise UserError(f"{flag} {value} would be ignored with {off}: it is used only without it. Drop {off}, or "
                            f"leave {flag} out; nothing was run.")
        now = " and ".join(f"{flag_name(k)} {values[k]}" for k, _ in needs)
        wanted = ", or ".join(f"{flag_name(k)} {_either(ok)}" for k, ok in needs)
        one = wanted if len(needs) == 1 and len(needs[0][1]) == 1 else "one of these"
        raise UserError(f"{flag} {value} would be ignored with {now}: it is used only with {wanted}. Pass {one}, or "
                        f"leave {flag} out; nothing was run.")


def _either(values: tuple) -> str:
    return " or ".join(filter(None, (", ".join(values[:-1]), values[-1])))


def _number(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def make(cls, given: dict):
    """A config of `cls` from the fields set explicitly (the rest take their defaults), validated."""
    unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    cfg = cls(**given, given=tuple(given))
    validate(cfg)
    return cfg


def check_required(cfg) -> None:
    """Refuses a config without one of its required settings. The CLI checks this after merging the flags with a
    --config file (argparse would demand the flags even when the file holds the values)."""
    missing = [flag_name(f.name) for f in dataclasses.fields(cfg)
               if f.metadata.get("required") and getattr(cfg, f.name) is None]
    if missing:
        names = " and ".join(filter(None, (", ".join(missing[:-1]), missing[-1])))
        raise UserError(f"Missing required setting(s) {names}: give them as flags or as keys of the --config file.")


def as_record(cfg) -> dict:
    """The config as a plain dict for checkpoints and JSON (no `given`)."""
    record = dataclasses.asdict(cfg)
    record.pop("given", None)
    return record


def is_given(cfg, name: str) -> bool:
    return name in cfg.given


def replace_given(cfg, **changes):
    """dataclasses.replace that counts the changed fields as given (as if they were flags), validated: how the study
    makes a stage's config from its section."""
    changed = dataclasses.replace(cfg, **changes, given=tuple(dict.fromkeys((*cfg.given, *changes))))
    validate(changed)
    return changed


# ----------------------------------------------------------------------------------------------------------
# what defines a result (ROLES): --resume and the study's check of finished stages


def role_fields(cls, *roles: str) -> tuple[str, ...]:
    """The fields of `cls` (a config class or one config) whose role is one of `roles`, in their order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)


def recorded_value(cls, name: str, record: dict):
    """The value a run's saved config (`record`) holds for the field `name` of `cls`; one without it: the field's
    legacy value (what records from before the setting existed were made with), else None."""
    return record[name] if name in record else cls.__dataclass_fields__[name].metadata.get("legacy")


def result_settings(cfg, roles=("data", "model", "result")) -> dict:
    """The settings that define the result of the run `cfg` describes, by name: its fields of `roles` (not its input
    files), but those it leaves unset (None), which the run takes from its inputs (as train-curve takes the
    endpoints' data and loss)."""
    return {k: getattr(cfg, k) for k in role_fields(cfg, *roles) if getattr(cfg, k) is not None}


def settle_with_checkpoint(cfg, saved: dict, where, same=None, roles=ROLES, carry: bool = True) -> None:
    """On --resume: each field of `roles` not given explicitly takes the checkpoint's value (`saved`: its recorded
    config; a checkpoint from before the setting existed: the field's legacy value); one given explicitly must agree
    with it (a run would otherwise mix two trainings under one record), as `same(name, saved value, given value)`
    compares them. With `carry`, each `carried` field not given takes the checkpoint's value, and may be changed by
    giving it. (train --init settles its data and model with the endpoint it starts from so: roles data and model,
    nothing carried.)"""
    carried = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("carried")] if carry else []
    for k in carried:
        if not is_given(cfg, k) and k in saved:
            setattr(cfg, k, saved[k])
    same = same or (lambda k, a, b: a == b)
    differ = []
    for k in role_fields(cfg, *roles):
        if k in carried:
            continue
        if k in saved:
            before = saved[k]
        else:  # a checkpoint from before the setting existed: its legacy value, else this run's
            legacy = cfg.__dataclass_fields__[k].metadata.get("legacy")
            before = legacy if legacy is not None else getattr(cfg, k)
        if not is_given(cfg, k):
            setattr(cfg, k, before)
        elif not same(k, before, getattr(cfg, k)):
            differ.append(f"{k}={before!r} vs {k}={getattr(cfg, k)!r}")
    if differ:
        raise UserError(f"The checkpoint {where} does not match this run: " + "; ".join(differ)
                        + " (checkpoint vs requested). Drop those flags to resume with the checkpoint's settings, "
                        "or start a new run in another --out folder.")


# ----------------------------------------------------------------------------------------------------------
# the study's sections


def section_settings(settings: dict, section: str) -> dict:
    """{field of the section's config: value}: each of the study's resolved `settings` (study.json's config) copied
    into the fields of `section` its `sets` names ("section.field", or "section" for a field of the same name)."""
    values = {}
    for f in dataclasses.fields(StudyConfig):
        for target in f.metadata.get("sets", ()):
            name, _, field_name = target.partition(".")
            if name == section:
                values[field_name or f.name] = settings[f.name]
    return values


def study_setting_of() -> dict:
    """{(section, field): the study setting copied into it}: the `sets` metadata read backwards."""
    return {(target.partition(".")[0], target.partition(".")[2] or f.name): f.name
            for f in dataclasses.fields(StudyConfig) for target in f.metadata.get("sets", ())}


def _study_tables(values: dict, path) -> dict:
    """A study config file's tables, one per section ([curves] lr = 1e-3), as the flat settings they stand for
    (curve_lr = 1e-3); flat keys stay as they are (config files of 0.1.0 have only those)."""
    setting_of = study_setting_of()
    flat = {k.replace("-", "_"): v for k, v in values.items() if k not in STUDY_SECTIONS}
    said = {k: k for k in flat}  # setting -> where the file gives it
    for section in [k for k in values if k in STUDY_SECTIONS]:
        table = values[section]
        if not isinstance(table, dict):
            raise UserError(f"--config {path}: {section} must be a table of that section's settings ([{section}]).")
        for key, value in table.items():
            name = setting_of.get((section, key.replace("-", "_")))
            if name is None:
                known = ", ".join(f for s, f in setting_of if s == section)
                raise UserError(f"--config {path}: [{section}] {key} is not a study setting; those of [{section}] are "
                                f"{known} (each stage sets its own files, seed and folder).")
            if name in flat and flat[name] != value:
                raise UserError(f"--config {path}: [{section}] {key} = {value!r} and {said[name]} = {flat[name]!r} "
                                f"are the same study setting ({flag_name(name)}); give it once.")
            flat[name], said[name] = value, f"[{section}] {key}"
    return flat


# ----------------------------------------------------------------------------------------------------------
# config files: TOML with the flags' names as keys (or a study.json), and the resolved config printed as TOML


def config_file_kinds(cls) -> str:
    """What --config reads for the command of `cls`: its help and its errors say the same."""
    kinds = "a TOML file whose keys are the flag names, with - or _ (as --print-config prints them)"
    return kinds + (", or a study's study.json" if cls is StudyConfig else "")


def read_config_file(path: str, cls) -> dict:
    """Field values from a TOML file (keys: the flag names, with - or _) or, for the study, from its study.json
    (the "config" entry), checked against the fields of `cls`. Unset (null) values are left out. A table setting
    (model_kwargs) may also be the text of a JSON object: to_toml writes one that holds a null so."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        hint = ""
        if cls is StudyConfig and (file / "study.json").is_file():
            hint = f" (for the study in it: --config {file / 'study.json'})"
        problem = "is a folder, not a file" if file.is_dir() else "is not there (no such file)"
        raise UserError(f"--config {path} {problem}. Pass {config_file_kinds(cls)}{hint}.")
    if file.suffix == ".json" and cls is not StudyConfig:
        raise UserError(f"--config {path}: only `aecurves study` reads a JSON file (a study's study.json). Pass "
                        f"{config_file_kinds(cls)}.")
    try:
        if file.suffix == ".json":
            values = json.loads(file.read_text(encoding="utf-8"))
            values = values.get("config", values) if isinstance(values, dict) else values
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path} could not be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a table of settings (key = value).")
    if cls is StudyConfig:
        values = _study_tables(values, path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    values = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - set(fields) - set(IGNORED_IN_CONFIG_FILES))
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; the settings of this command "
                        f"are: {', '.join(sorted(fields))}.")
    values = {k: v for k, v in values.items() if k in fields}
    for k in ("losses", "seeds"):  # a study.json holds them as lists
        if isinstance(values.get(k), list):
            values[k] = ",".join(str(v) for v in values[k])
    for k, v in values.items():
        if value_type(fields[k]) is dict and isinstance(v, str):
            try:
                values[k] = parse_json_object(v)
            except UserError as exc:
                raise UserError(f"--config {path}: {exc}") from None
    return values


IGNORED_IN_CONFIG_FILES = ("format_version",)


def _toml_string(text: str) -> str:
    # JSON's escapes are all TOML escapes; TOML also wants DEL escaped, which JSON leaves as it is
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _holds_null(value) -> bool:
    if isinstance(value, dict):
        return any(map(_holds_null, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_holds_null, value))
    return value is None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # exact; TOML spells inf and nan as Python does
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if _holds_null(value):  # TOML has no null
            return _toml_string(json.dumps(value, ensure_ascii=False))
        return "{" + ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return _toml_string(str(value))


def to_toml(record: dict) -> str:
    """A flat config as TOML that --config reads back to the same values. TOML has no null, so an unset value is a
    comment (`# name is not set`: read back, it stays unset), and a table (a dict) that holds a null anywhere is
    written as its JSON text, a string that read_config_file parses back into the table; every other table is a
    TOML inline table. Numbers are written exactly (repr), strings in UTF-8."""
    return "".join(f"{k} = {_toml_value(v)}\n" if v is not None else f"# {k} is not set\n" for k, v in record.items())


# ----------------------------------------------------------------------------------------------------------
# the model factory's arguments

SIGNATURE_KEYS = ("channels", "image_size", "latent_dim")  # what every factory receives (MODEL_SIGNATURE)


def takes_width(model) -> bool:
    """Whether --width is a setting of this model: the built-in convolutional ones (WIDTH_MODELS)."""
    return model in WIDTH_MODELS


def check_model_kwargs(model: str, kwargs: dict, flags: dict) -> None:
    """--model-kwargs may not restate what a flag sets (the factory signature's sizes, and --width of the built-in
    model): its value would silently win over the flag, while every record said the flag's. `flags` holds the
    flags' values by field name."""
    reserved = SIGNATURE_KEYS + (("width",) if takes_width(model) else ())
    clash = [k for k in reserved if k in kwargs]
    if clash:
        said = "; ".join(f"{k}={kwargs[k]!r}, which {'the data sets' if k == 'channels' else flag_name(k) + ' sets'}"
                         + (f" (to {flags[k]!r})" if flags.get(k) is not None else "") for k in clash)
        raise UserError(f"--model-kwargs sets {said}. Give the value with the flag only and leave it out of "
                        "--model-kwargs.")
