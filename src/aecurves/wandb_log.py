"""Weights & Biases logging (--wandb PROJECT): a thin wrapper that the commands call in a line or two.

`Tracker` is a no-op unless started, and `logging_run(cfg, ...)` starts one only when the config has --wandb and
the process is rank 0 of its run, so the commands call it unconditionally. What is logged is what the run writes
anyway (metrics.jsonl's rows, eval.json's series, report.json's summary): W&B is a view of the run, never a
source of its numbers, and no file a command writes depends on it.

wandb is optional (`pip install 'aecurves[wandb]'`) and imported only when a run starts (`aecurves --help` stays
fast). A missing package, or any failure to start, log or finish, never fails a run: it prints one line on stderr
("W&B: ...; the run goes on without it") and the tracker turns itself off. WANDB_MODE=offline logs to WANDB_DIR
without an account or network (`wandb sync` uploads it later).
"""

import contextlib
import sys
from pathlib import Path

OPTIONS = ("wandb", "wandb_entity", "wandb_group", "wandb_name")  # config fields read here (config.RuntimeConfig)
GOES_ON = "the run goes on without it"


def note(what: str) -> None:
    print(f"W&B: {what}; {GOES_ON}", file=sys.stderr, flush=True)


def numbers(values: dict, prefix: str = "") -> dict:
    """The numeric leaves of `values` (nested dicts flattened as "a/b/c"), booleans, strings and None left out."""
    found = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = value
    return found


def run_name(out, name: str | None) -> str:
    """--wandb-name, else the run folder's last two parts (runs/train, mse_seed1-seed2/eval): the folder's own name
    alone is often generic (eval, curve)."""
    return name or "/".join(Path(out).resolve().parts[-2:])


class Tracker:
    """One W&B run, or nothing: every method does nothing until `start` succeeded, and after any failure."""

    def __init__(self):
        self.run = None
        self.wandb = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def start(self, project: str, config: dict, name: str, group: str | None = None, entity: str | None = None,
              job_type: str | None = None) -> "Tracker":
        try:
            import wandb
        except ImportError:
            note("--wandb needs the wandb package (pip install 'aecurves[wandb]'), which is not installed")
            return self
        try:
            # console capture off: the run folder and the study's logs keep the output, and W&B's wrapping of
            # stdout/stderr would fight the study's redirection of a stage's output to its log
            self.run = wandb.init(project=project, entity=entity, group=group, name=name, job_type=job_type,
                                  config=config, settings=wandb.Settings(console="off"))
            self.wandb = wandb
        except Exception as exc:  # noqa: BLE001 - any failure of an optional view of the run
            note(f"could not start a run in project {project!r} ({type(exc).__name__}: {exc})")
            self.run = None
        return self

    def _do(self, what: str, action) -> None:
        if self.run is None:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001
            note(f"{what} failed ({type(exc).__name__}: {exc}); nothing more is logged")
            self._abandon()

    def _abandon(self) -> None:
        run, self.run = self.run, None
        with contextlib.suppress(Exception):
            run.finish(exit_code=1)

    def log(self, row: dict, step: int) -> None:
        """The numbers of a metrics row (an epoch's), at `step`."""
        self._do("logging a row", lambda: self.run.log(numbers(row), step=step))

    def table(self, key: str, columns: list, rows: list) -> None:
        self._do(f"logging the table {key}",
                 lambda: self.run.log({key: self.wandb.Table(columns=columns, data=rows)}))

    def image(self, key: str, path) -> None:
        if path is None or not Path(path).is_file():
            return
        self._do(f"logging the image {key}", lambda: self.run.log({key: self.wandb.Image(str(path))}))

    def summary(self, values: dict) -> None:
        """Numbers of the run's result: its W&B summary (nested dicts as "a/b/c")."""
        self._do("writing the summary", lambda: self.run.summary.update(numbers(values)))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            note(f"finishing the run failed ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def logging_run(cfg, job_type: str, out, is_main: bool = True, config: dict | None = None,
                name: str | None = None):
    """A Tracker for the block: started when `cfg` has --wandb and this is rank 0, finished when the block ends
    (marked failed when it raises). `config` is what W&B records as the run's config (default: cfg's fields);
    `name` the run's name (default: --wandb-name, else from the run folder `out`)."""
    tracker = Tracker()
    if getattr(cfg, "wandb", None) and is_main:
        import dataclasses

        record = config if config is not None else {k: v for k, v in dataclasses.asdict(cfg).items() if k != "given"}
        tracker.start(cfg.wandb, record, name or run_name(out, getattr(cfg, "wandb_name", None)), cfg.wandb_group,
                      cfg.wandb_entity, job_type)
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def series_table(series: dict) -> tuple[list, list]:
    """(columns, rows) of eval.json's series, one row per t: "t", then every series of the same length (both
    paths': the segment's are prefixed segment_); the segment's own ts are the curve's, so left out."""
    ts = series.get("ts") or series.get("segment_ts") or []
    keys = [k for k, v in series.items()
            if k not in ("ts", "segment_ts") and isinstance(v, list) and len(v) == len(ts)]
    rows = [[ts[i], *(series[k][i] for k in keys)] for i in range(len(ts))]
    return ["t", *keys], rows


def log_evaluation(cfg, out) -> None:
    """eval-curve's W&B run, from the eval.json it wrote in `out`: the series as a table (one row per t), the
    loss-along-t figure, and each path's summary numbers (eval.json's "paths") as the run's summary."""
    if not getattr(cfg, "wandb", None):
        return
    import json

    record = json.loads((Path(out) / "eval.json").read_text(encoding="utf-8"))
    with logging_run(cfg, "eval-curve", out) as tracker:
        tracker.table("series", *series_table(record.get("series") or {}))
        tracker.image("loss_along_path", (record.get("files") or {}).get("loss_plot"))
        tracker.summary({"paths": record.get("paths") or {}})


def log_study(settings, config: dict, report: dict) -> None:
    """The study's own W&B run, in its group, named "study": report.json's summary numbers (each group's, as
    LOSS/NAME) as its summary. Nothing without --wandb."""
    if not settings.wandb or not report:
        return
    summaries = {loss: group.get("summary") or {} for loss, group in (report.get("groups") or {}).items()
                 if isinstance(group, dict)}
    with logging_run(settings, "study", settings.out, config=config, name="study") as tracker:
        tracker.summary(summaries)

