"""The report's data, typed: what collect() reads from a study's files and what the summaries over pairs compute.

Every field is checked when its file is read (specs, inputs), so what follows uses attributes, not probes into
dicts. Field names are report.json's keys: to_json() writes a record as its fields, nested, except the `local`
ones (what the figures draw: arrays and pixels), which stay out of the JSON.
"""

from dataclasses import dataclass, field, fields, is_dataclass

from aecurves.stats import mean_interval


def local(default=None):
    """A field the report uses but report.json leaves out (arrays, pixels: the figures' inputs)."""
    return field(default=default, metadata={"json": False}, repr=False, compare=False)


def vae_only():
    """A field only a VAE group has: report.json leaves it out while it is None, so that an autoencoder's record is
    the one it was before the report knew VAEs."""
    return field(default=None, metadata={"omit_none": True})


def to_json(value):
    """A record as JSON values: a dataclass as an object of its fields (local ones left out, vae_only ones while
    None), nested; a record that passes a file's object on whole (Ensemble) as that object."""
    if hasattr(value, "__json__"):
        return value.__json__()
    if is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value) if f.metadata.get("json", True)
                and not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


@dataclass
class Interval:
    """A mean over pairs with its 95% t-interval (stats.mean_interval); lo and hi are None for one pair."""
    n: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    lo: float | None
    hi: float | None
    level: float

    @classmethod
    def of(cls, values) -> "Interval":
        return cls(**mean_interval(list(values)))


@dataclass
class Metrics:
    """Held-out reconstruction metrics of one network or average."""
    mse: float | None
    psnr: float | None
    ssim: float | None = None


# ----------------------------------------------------------------------------------------------------------
# a pair: its paths as eval-curve measured them

PATH_KEYS = ("te_loss_max", "te_barrier", "tr_barrier", "length", "te_psnr_min", "te_mse_max", "te_ssim_min",
             "te_barrier_lo", "te_barrier_hi")
# a VAE's path: the barriers of the objective's two terms, the distortion (the reconstruction loss) and the rate (the
# mean KL in nats per image), as eval-curve writes them beside the objective's (te_barrier, tr_barrier)
TERM_KEYS = ("te_distortion_barrier", "tr_distortion_barrier", "te_rate_barrier", "tr_rate_barrier")
TERMS = ("distortion", "rate")


@dataclass
class PathStats:
    """A path's summary numbers from eval.json (records.EvalRecord's paths.curve or paths.segment)."""
    te_loss_max: float | None
    te_barrier: float | None
    tr_barrier: float | None
    length: float | None
    te_psnr_min: float | None
    te_mse_max: float | None
    te_ssim_min: float | None
    te_barrier_lo: float | None
    te_barrier_hi: float | None
    te_distortion_barrier: float | None = vae_only()
    tr_distortion_barrier: float | None = vae_only()
    te_rate_barrier: float | None = vae_only()
    tr_rate_barrier: float | None = vae_only()

    @classmethod
    def of(cls, summary: dict, prefix: str = "") -> "PathStats":
        return cls(*(summary.get(prefix + k) for k in PATH_KEYS + TERM_KEYS))


@dataclass
class PathRow:
    """One of a pair's four paths beside the others: its test barrier, the share of the straight segment's barrier it
    removes, its best point's test loss against the better endpoint and against the better extra-trained one."""
    barrier: float | None
    best: float | None
    removed: float | None = None
    best_vs_endpoint: float | None = None
    best_vs_extra: float | None = None
    distortion_barrier: float | None = vae_only()  # a VAE's: the test barrier of each term of its objective
    rate_barrier: float | None = vae_only()


@dataclass
class Protocol:
    """What eval-curve really used (the request is in study.json's config)."""
    bn_images: int | None
    bn_recomputed: bool | None
    train_images: int | None
    n_train: int | None
    test_images: int | None
    n_test: int | None
    device: str | None


@dataclass
class CurveKind:
    curve: str | None = None
    num_bends: int | None = None


@dataclass
class Ensemble:
    """eval-curve --ensemble's record: report.json passes it on whole, the report reads k and the entries."""
    k: int | None
    entries: dict[str, Metrics]
    record: dict = local()

    def __json__(self):
        return self.record


@dataclass
class BudgetRow:
    """One ensemble of a pair at equal training budget: held-out metrics, its networks, where the numbers come
    from, and its training beyond the endpoints in epochs."""
    mse: float
    psnr: float
    ssim: float | None
    members: int | None
    source: str
    budget_epochs: float | None


@dataclass
class FgeRun:
    budget_epochs: int
    snapshots: int
    cycle: int | None


@dataclass
class PairBudget:
    rows: dict[str, BudgetRow]
    fge: dict[str, FgeRun]


@dataclass
class EndpointEval:
    """An endpoint measured by eval-curve at t = 0 or t = 1 of a path, like every point of it."""
    tr_loss: float | None
    te_loss: float | None
    tr_mse: float | None
    te_mse: float | None
    tr_psnr: float | None
    te_psnr: float | None
    te_distortion: float | None = vae_only()  # a VAE's: its objective's two terms
    te_rate: float | None = vae_only()

    @classmethod
    def of(cls, summary: dict, which: str) -> "EndpointEval":
        return cls(*(summary.get(f"{k}_{which}") for k in ("tr_loss", "te_loss", "tr_mse", "te_mse", "tr_psnr",
                                                            "te_psnr", "te_distortion", "te_rate")))


@dataclass
class Extra:
    """An endpoint trained on as long as a curve, measured like the paths' points (the baseline's eval.json)."""
    te_loss: float
    te_mse: float | None
    source: str
    gain: float | None = None  # (endpoint − extra) / endpoint held-out loss


@dataclass
class Vae:
    """A VAE's objective, as eval-curve measured it: distortion + kl_weight · rate / D (the reconstruction loss, and
    the mean KL in nats per image over D = C·H·W values per image); `distortion`: the reconstruction loss's
    description."""
    kl_weight: float
    distortion: str | None


@dataclass
class Pair:
    seeds: tuple[int, int]
    eval: str
    curve_folder: str
    available: bool
    eval_status: str
    curve_precision: list[str]
    notes: list[str] = field(default_factory=list)
    num_points: int | None = None
    loss_description: str | None = None
    perceptual: bool | None = None
    path: CurveKind = field(default_factory=CurveKind)
    protocol: Protocol | None = None
    curve: PathStats | None = None
    segment: PathStats | None = None
    barrier_removed: float | None = None
    train_barrier_removed: float | None = None
    paths: dict[str, PathRow] = field(default_factory=dict)
    aligned_eval: str | None = None
    aligned_curve: PathStats | None = None
    aligned_segment: PathStats | None = None
    align_seconds: float | None = None
    better_endpoint_te_loss: float | None = None
    extra_endpoint_te_loss: float | None = None
    extra_endpoint: Metrics | None = None
    ensemble: Ensemble | None = None
    equal_budget: PairBudget | None = None
    vae: Vae | None = vae_only()  # eval.json's "vae": the networks are VAEs, the loss their objective
    ends: tuple[EndpointEval, EndpointEval] | None = local()   # the endpoints at t = 0 and t = 1
    extras: tuple[Extra, Extra] | None = local()              # and trained on as long as a curve
    arrays: dict | None = local()                             # curve.npz of the curve and its segment
    aligned_arrays: dict | None = local()                     # and of the aligned ones
    strips: dict[str, str] = local(None)                      # kind: reconstruction strip found (a PNG)
    series: dict | None = local()                             # eval.json's series (the explorer's numbers)
    aligned_series: dict | None = local()
    recons: dict | None = local()                             # reconstructions.npz: the pixels at every t
    aligned_recons: dict | None = local()

    @property
    def label(self) -> str:
        return f"seeds {self.seeds[0]}-{self.seeds[1]}"


# ----------------------------------------------------------------------------------------------------------
# an endpoint


@dataclass
class Training:
    """The last epoch of an endpoint's training log (metrics.jsonl)."""
    epoch: int | None
    train_loss: float | None
    test_loss: float | None
    test_mse: float | None
    test_psnr: float | None
    lr: float | None
    last_epoch_gain: float | None
    precision: list[str]


@dataclass
class Picture:
    """An endpoint's held-out images and reconstructions: two rows of pixels [N, C, H, W] (from reconstructions.pt,
    or cut out of reconstructions.png), or none when the PNG has another layout (`width`: its width in pixels)."""
    rows: tuple | None
    width: int | None


@dataclass
class Endpoint:
    seed: int
    folder: str
    training: Training | None = None
    eval: EndpointEval | None = None
    eval_source: str | None = None
    extra: Extra | None = None
    picture: Picture | None = local()
    picture_source: str | None = local()


# ----------------------------------------------------------------------------------------------------------
# over pairs


@dataclass
class Bootstrap:
    pairs: int
    above_zero: int


@dataclass
class GroupSummary:
    """A group's numbers over its pairs; the barrier figures only when a pair was evaluated."""
    pairs: int
    pairs_evaluated: int
    pairs_damaged: int
    train_set_images: int | None = None
    test_set_images: int | None = None
    endpoint_te_psnr_max: float | None = None
    endpoint_mse_test_over_train: float | None = None
    endpoint_te_loss_mean: float | None = None
    segment_te_barrier_mean: float | None = None
    segment_te_barrier_min: float | None = None
    segment_te_barrier_max: float | None = None
    curve_te_barrier_mean: float | None = None
    curve_te_barrier_min: float | None = None
    curve_te_barrier_max: float | None = None
    barrier_removed_mean: float | None = None
    barrier_removed_min: float | None = None
    worst_psnr_curves: float | None = None
    worst_psnr_segments: float | None = None
    worst_psnr_endpoints: float | None = None
    segment_barrier_relative: float | None = None
    paths: dict[str, dict[str, Interval]] = field(default_factory=dict)  # path: {barrier, removed, best_vs_...}
    bootstrap: dict[str, Bootstrap] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        return self.segment_te_barrier_mean is not None


@dataclass
class BudgetOverPairs:
    pairs: int
    budget_epochs: float | None
    mse: Interval
    psnr: Interval
    ssim: Interval


@dataclass
class EqualBudget:
    """The equal-budget ensembles over pairs: each row's means, the winner by held-out MSE against the runner-up,
    and the best at one curve's budget against the curve ensemble (relative MSE per pair, as intervals)."""
    pairs: int
    curve_epochs: float | None
    rows: dict[str, BudgetOverPairs] = field(default_factory=dict)
    ranked: list[str] | None = None
    winner: str | None = None
    runner_up: str | None = None
    winner_vs_runner_up: Interval | None = None
    winner_by_psnr: str | None = None
    best_at_one_curve: str | None = None
    one_curve_other: str | None = None
    one_curve_vs_other: Interval | None = None


@dataclass
class Convergence:
    threshold: float
    extra_epochs: float | None
    endpoints: int
    gains: dict[str, float]
    extra_training: bool
    measured: bool
    metric: str
    min: float | None = None
    max: float | None = None
    above: list[str] = field(default_factory=list)
    converged: bool | None = None


@dataclass
class Plane:
    seeds: tuple[int, int]
    folder: str
    available: bool
    status: str
    summary: dict | None = None   # plane.json's, passed on whole
    grid: dict | None = None
    seconds: float | None = None
    picture: str | None = local()  # plane.png, when found
    arrays: dict | None = local()  # plane.npz's grid, held-out loss and reconstructions (the explorer's)


@dataclass
class Group:
    status: str
    loss: str
    reason: str = ""
    remedy: str = ""
    warning: str | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    summary: GroupSummary | None = None
    equal_budget: EqualBudget | None = None
    convergence: Convergence | None = None
    plane: Plane | None = None
    vae: Vae | None = vae_only()  # the group's networks are VAEs: its loss is their objective

    @property
    def evaluated(self) -> list[Pair]:
        return [p for p in self.pairs if p.available]


@dataclass
class Settings:
    """The settings of study.json's config the report's text reads (None: not recorded)."""
    seeds: list | None = None
    curve: str | None = None
    num_bends: int | None = None
    num_points: int | None = None
    dataset: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    curve_epochs: float | None = None
    curve_lr: float | None = None
    curve_lr_schedule: str | None = None
    t_sampling: str | None = None
    align: bool | None = None
    fge: bool | None = None
    model: str | None = None
    model_kwargs: dict | None = None
    bn_images: int | None = None
    train_images: int | None = None
    device: str | None = None
    precision: str | None = None
    kl_weight: float | None = None


@dataclass
class WhatRan:
    """What the stages really used, from their own files: for each setting the distinct values over all stages."""
    device: list
    training_precision: list
    data: list
    bn_images: list
    train_metric_images: list
    test_metric_images: list


@dataclass
class Provenance:
    """study.json's provenance: what ran where and when. report.json passes the record on whole."""
    aecurves: str | None
    git_commit: str | None
    torch: str | None
    python: str | None
    host: str | None
    device: str | None
    started: str | None
    finished: str | None
    wall_seconds: float | None
    stage_seconds: dict | None
    others: dict = field(default_factory=dict)  # whatever a later aecurves adds
    record: dict = local()

    def __json__(self):
        return self.record


@dataclass
class Study:
    config: dict
    provenance: Provenance | None
    groups: dict[str, Group]
    ran: WhatRan
    damaged: dict[str, str]
    settings: Settings = local()


# ----------------------------------------------------------------------------------------------------------
# the vocabulary of the tables

PATHS = (("segment", "straight segment"), ("aligned_segment", "aligned segment"), ("curve", "curve"),
         ("aligned_curve", "aligned curve"))
# The equal-budget ensembles of a pair, in the table's order: (key, label, training beyond the endpoints in units of
# --curve-epochs E). (a) one curve is E epochs of training of its bend; (c) pooled is both endpoints' FGE runs, E
# epochs each; (d) is both extra-trained endpoints; (e) is one of them (the better, chosen after training both).
EQUAL_BUDGET_ROWS = (
    ("curve_ensemble", "(a) curve ensemble: output average of {k} points of the curve", 1),
    ("endpoint_average", "(b) the two endpoints averaged", 0),
    ("fge_pooled", "(c) FGE: {n} from each endpoint's run, pooled", 2),
    ("fge_start", "(c) FGE from seed {a} alone ({n})", 1),
    ("fge_end", "(c) FGE from seed {b} alone ({n})", 1),
    ("extra_average", "(d) the two extra-trained endpoints averaged", 2),
    ("extra_best", "(e) the better extra-trained endpoint (per metric)", 1),
)
BUDGET_FACTOR = {key: factor for key, _, factor in EQUAL_BUDGET_ROWS}
EQUAL_BUDGET_SHORT = {"curve_ensemble": "(a) the curve ensemble", "endpoint_average": "(b) the two endpoints averaged",
                      "fge_pooled": "(c) FGE pooled from both endpoints' runs",
                      "fge_start": "(c) FGE from the pair's first endpoint alone",
                      "fge_end": "(c) FGE from the pair's second endpoint alone",
                      "extra_average": "(d) the two extra-trained endpoints averaged",
                      "extra_best": "(e) the better extra-trained endpoint"}
EQUAL_BUDGET_METRICS = ("mse", "psnr", "ssim")
