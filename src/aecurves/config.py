"""Defaults shared by several commands, written once (no torch import, so the CLI stays fast to start)."""

# The evaluation protocol: BatchNorm statistics and training-set metrics at a point of a path come from fixed
# subsets of the training images, drawn once with a generator seeded SUBSET_SEED. The sizes were chosen with
# benchmarks/eval_protocol.py: 8192 is the smallest power of 2 whose projected deviation from --full at
# CelebA scale stays under 1% at three standard deviations on every measured point (the README gives the
# table). BN statistics are averaged per batch, so the batch size is part of the protocol.
SUBSET_SEED = 0
BN_IMAGES = 8192
TRAIN_IMAGES = 8192
EVAL_BATCH_SIZE = 256

LR_SCHEDULES = ("paper", "cosine", "constant")
T_SAMPLING = ("uniform", "stratified")
