"""`aecurves study`: the whole experiment in one command, resumable, ending in a report.

For every loss in `losses` (default mse, vgg) and every seed in `seeds` (default 1, 2, 3) an endpoint is
trained; within each loss group every pair of endpoints (A, B) is connected by a curve (Bezier, 3 bends, both ends
fixed), and every curve is evaluated at `num_points` values of t together with the straight segment between its
ends. With --align (the default) B is also aligned to A (`aecurves align`: its hidden units permuted, its latent
code mapped, the same function), and a curve to the aligned B is trained and evaluated with its segment, the
aligned segment. With --extra-training (the default) every endpoint is also trained on for as long as a curve
(`aecurves train --init`), and those endpoints are measured like the paths' points: the fair comparison for a
path's best point. With --fge (the default) every endpoint is also the start of fast geometric ensembling for as
long as a curve (`aecurves fge`), and every pair's ensembles at that equal budget are measured on the held-out
images (ensembles.run: the FGE snapshots of both endpoints' runs pooled, and the two extra-trained endpoints
averaged), for the report's table beside the curve ensemble. Finally report.html / report.md are written.

The package, along its seams:
- settings.py: the resolved, frozen `Settings`, and the config each kind's section gives its stages;
- kinds.py:    one `Kind` declaration per stage kind (KINDS): command, section, folder, inputs, cost, study.json's
               lines, how its outputs are read back and judged. Adding a kind is one declaration and its command;
- planning.py: `Stage`, `plan` (made from KINDS), dependencies, --force's selection;
- state.py:    `Study`: what each stage should be made with, whether it is finished, study.json;
- driver.py:   `Driver`, `StageJob` (a picklable call of COMMAND.run(config)), torchrun, the executors;
- here:        resolve, run, and --plan.

Each stage calls the same function as its own subcommand, with that command's config: its section of the study's
settings (config.STUDY_SECTIONS), made as each setting's `sets` metadata says, with the stage's own files, seed and
folder. So defaults cannot drift and each stage folder holds exactly that command's files. Every stage folder also
holds study_stage.json (the stage's status and a SHA-256 of each input file).

Resuming. A stage is finished when its outputs are complete (an endpoint's checkpoint.pt at the requested
epoch, a curve's checkpoint at the requested curve epoch, an evaluation's eval.json and every file it lists),
they were made with the requested settings (read back from the checkpoint's / eval.json's own record), and
the input files they were made from are unchanged (SHA-256 in study_stage.json). Finished stages are skipped;
an interrupted training stage resumes from its last checkpoint; a stage whose inputs changed (e.g. its
endpoint was redone) is redone. When the requested settings differ from those of existing outputs (say
--epochs changed), the study refuses before doing anything and names the stages and settings: pass
`--force STAGE` to redo them (what is built on them is then redone too) or choose another --out.
Runtime settings (device, precision, progress bars, cache folder) never invalidate anything.
Outputs from the same commands run by hand (e.g. endpoints trained under torchrun into
endpoints/mse_seed1) are adopted when they match.

"""

import os
import time

from aecurves import runtime
from aecurves.config import StudyConfig
from aecurves.errors import UserError
from aecurves.files import folder_lock, read_json, refuse_study_links
from aecurves.records import NewerFormat, RecordError, StudyRecord

from .driver import Driver, StageJob, check_executor_machine, make_executor, torchrun_file
from .kinds import KINDS, Kind, describe, ensemble_members
from .planning import Stage, plan, select_forced, stage_named, with_dependencies
from .planning import loss_group as group_folders
from .settings import (
    Settings,
    fge_snapshots,
    resolve,
    resolved_config,
    section,
    section_record,
    study_record,
)
from .state import Study, check_stages, fmt_seconds, refuse_stale_outputs, refuse_untrusted_files

__doc__ += describe()
__all__ = ["KINDS", "Driver", "Kind", "Settings", "Stage", "StageJob", "Study", "ensemble_members", "fge_snapshots",
           "loss_group", "make_executor", "plan", "resolve", "resolved_config", "run", "run_study", "section",
           "section_record", "select_forced", "stage_named", "study_record", "torchrun_file"]

FORMAT_VERSION = StudyRecord.FORMAT  # of study.json (CHANGELOG.md; records.StudyRecord)
INTERRUPTED = ("\ninterrupted; every finished stage is kept in {out}. Re-run the same command to continue: finished "
               "stages are skipped and an interrupted training stage resumes from its last checkpoint.")
VGG_REMEDY = ("Re-run the same command with --vgg-weights PATH (a saved vgg16 state dict), or once torchvision's "
              "VGG16 ImageNet file is in its cache (see the reason); the finished stages are kept and only the vgg "
              "group runs.")


def run(config: StudyConfig) -> dict:
    """Runs (or resumes) the study `config` describes; returns a summary."""
    return run_study(resolve(config))


def run_study(settings: Settings) -> dict:
    """Runs (or resumes) the study of the resolved `settings`: checks everything, plans, then runs the stages."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("`aecurves study` is one driver process, so do not start it with torchrun. On a machine "
                        "with several GPUs use --executor local (one stage per GPU at once; --gpus-per-train N "
                        "trains each endpoint on N GPUs), on a Slurm cluster --executor slurm.")
    study = Study(settings)
    root = study.root
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; pass a folder for the study.")
    if root.is_dir():  # a folder someone sent: no link inside is followed (docs/reliability.md#folders-someone-sent)
        refuse_study_links(root)
    if not settings.epochs or not settings.curve_epochs:
        raise UserError("--epochs and --curve-epochs are needed.")
    check_executor_machine(settings)
    plan_study(study)
    refuse_untrusted_files(study)  # before any stage is judged, --plan included
    check_stages(study)
    if settings.plan:
        print_plan(study)
        return {"out": str(root), "plan": [s.name for s in study.stages]}
    refuse_stale_outputs(study)  # before anything changes
    executor = make_executor(settings, root)
    with folder_lock(root, "study"):  # one study per folder: a second one would redo and interleave every stage
        return run_stages(study, executor)


def plan_study(study: Study) -> None:
    """The study's groups (vgg checked once, up front) and stages, from the data's sizes."""
    from aecurves.data import load_data

    s = study.settings
    print(f"study in {study.root}: preset {s.preset}, losses {','.join(s.losses)}, seeds "
          f"{','.join(map(str, s.seeds))}, {s.curve} curves with {s.num_bends} bends, "
          f"{s.num_points} points per path", flush=True)
    data = load_data(s.dataset, s.data_dir, s.image_size, s.limit, s.val_fraction, s.use_test, s.cache_dir,
                     progress=not s.no_progress)
    n_train, n_test = len(data.train), len(data.test)
    print(f"data: {data.source}", flush=True)
    del data
    study.groups = {loss: loss_group(s, loss) for loss in s.losses}
    # evaluations also measure the perceptual metric when the real VGG weights load (the vgg group checked them)
    vgg = study.groups.get("vgg")
    perceptual = s.vgg_weights != "random" and (vgg["status"] == "run" if vgg else check_vgg(s.vgg_weights) is None)
    all_stages = plan(s, n_train, n_test, perceptual)
    study.forced = select_forced(list(s.force), all_stages)
    study.stages = with_dependencies([st for st in all_stages
                                      if st.loss is None or study.groups[st.loss]["status"] == "run"])


def loss_group(settings: Settings, loss: str) -> dict:
    """One loss group's record for study.json (planning.loss_group): its folders, and whether it runs (vgg needs the
    VGG weights)."""
    group = group_folders(settings, loss)
    if loss != "vgg":
        return group
    problem = check_vgg(settings.vgg_weights)
    if problem:
        group.update(status="skipped", reason=str(problem), remedy=VGG_REMEDY)
        print(f"vgg group skipped: {getattr(problem, 'short', problem)} (the remedy follows at the end)", flush=True)
    elif settings.vgg_weights == "random":
        group["warning"] = ("--vgg-weights random: the vgg group was trained and evaluated with UNTRAINED VGG16 "
                            "features, so its loss is not perceptual; a smoke test only.")
    else:
        group["vgg_weights"] = settings.vgg_weights
    return group


def check_vgg(weights: str) -> UserError | None:
    """None when the VGG16 weights for the perceptual loss can be loaded, else why not (with the remedy)."""
    from aecurves import losses

    try:
        losses.load_vgg_features(weights)
    except UserError as exc:
        return exc
    return None


def print_plan(study: Study) -> None:
    """Every stage with what it depends on and its state; nothing runs. Stages on the longest chain are marked."""
    will = study.will_run()
    chain = {}  # the longest chain of dependencies ending at each stage
    for st in study.stages:
        chain[st.name] = max((chain[d] for d in st.deps), key=len, default=[]) + [st.name]
    longest = max(chain.values(), key=len)
    print(f"\n{len(study.stages)} stages, {len(will)} to run; with enough workers the study takes the time of its "
          f"longest chain, {len(longest)} stages: {' -> '.join(longest)}\n")
    width = max(len(st.name) for st in study.stages)
    for st in study.stages:
        deps = "all other stages" if st.kind == "report" else (", ".join(st.deps) or "-")
        print(f"  {st.name:<{width}}  {planned_state(study, st, will)}\n  {'':<{width}}  after: {deps}")


def planned_state(study: Study, st: Stage, will: set) -> str:
    if st.kind == "report":
        return "to run (last)"
    if st.name in study.forced:
        return "to redo (--force)"
    status, why = study.status(st)
    stale = study.settings_diff(st)
    upstream = [d for d in st.deps if d in will]
    if stale:
        return f"stale: made with other settings ({'; '.join(stale)}); needs --force"
    if status == "done" and upstream:
        return f"to redo after {', '.join(upstream)}"
    return {"done": "done" + (" (adopted)" if why == "adopted" else ""), "new": "to run",
            "resume": f"to resume ({why})", "redo": f"to redo ({why})"}[status]


def run_stages(study: Study, executor=None) -> dict:
    """Every stage once the stages it depends on are finished: finished ones skipped, interrupted ones resumed,
    on `executor` (serial by default); then the report. Returns a summary."""
    from aecurves.executors import SerialExecutor

    executor = executor or SerialExecutor()
    start_provenance(study, executor.name)
    study.write_study_json()
    driver = Driver(study, executor, study.will_run())
    try:
        driver.run()
    except KeyboardInterrupt:
        if executor.name == "slurm" and executor.running():
            print(f"\nthe driver stopped; {len(executor.running())} Slurm job(s) go on. Re-run the same command to "
                  "follow them again: no stage is submitted twice.", flush=True)
        raise
    finally:
        executor.close()

    report_stage = study.stages[-1]
    study.provenance.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            wall_seconds=round(time.perf_counter() - study.t0, 1))
    study.write_study_json()  # the report shows the provenance of the stages it reports on
    study.progress(len(study.stages), report_stage, [])
    run_report_stage(study)
    from aecurves import report, wandb_log

    summary = report.read_report_json(study.root)
    wandb_log.log_study(study.settings, study_record(study.settings), summary)
    return print_summary(study, summary)


def start_provenance(study: Study, executor: str) -> None:
    """Where and when this run goes (the last run's, when this one runs nothing, stays in study.json)."""
    try:
        study.previous_provenance = StudyRecord.from_json(read_json(study.root / "study.json")).provenance
    except NewerFormat:  # refused before anything ran (refuse_untrusted_files): never rewritten as this format
        raise
    except RecordError:  # none yet, or one this release cannot read (run() refuses a study of other settings)
        study.previous_provenance = None
    s = study.settings
    study.provenance = {**runtime.provenance(s.device, s.precision),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "wall_seconds": None,
                        "executor": executor,
                        "stage_seconds": dict((study.previous_provenance or {}).get("stage_seconds") or {})}


def run_report_stage(study: Study) -> None:
    from aecurves import report

    fingerprint = report.inputs_fingerprint(study.root)
    existing = report.read_report_json(study.root)
    complete = all((study.root / n).is_file() for n in ("report.html", "report.md", "report.json"))
    if "report" not in study.forced and complete and existing.get("inputs_fingerprint") == fingerprint:
        print("report: up to date with the study's files, skipped")
        study.skipped.append("report")
        return
    report.write_report(study.root)
    study.ran.append("report")


def print_summary(study: Study, summary: dict) -> dict:
    """The end of the run on the console, and run()'s result; `summary`: report.json."""
    print(f"\nstudy finished in {fmt_seconds(time.perf_counter() - study.t0)}: {len(study.ran)} stages run, "
          f"{len(study.skipped)} already finished")
    for loss, group in study.groups.items():
        if group["status"] == "skipped":
            print(f"\n{loss} group SKIPPED: {group['reason']}\nremedy: {group['remedy']}\n")
    for line in summary.get("summary_lines", []):
        print(f"  {line}")
    print(f"report: {study.root / 'report.html'} (and report.md)")
    return {"out": str(study.root), "ran": study.ran, "skipped": study.skipped, "groups": study.groups,
            "report": summary}
