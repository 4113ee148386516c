"""The study's executors measured: the wall time of the same study serially and with `--executor local --jobs N`,
the number of stages on its longest chain against the total, and the driver's overhead per Slurm stage on a
throwaway single-node cluster (tests/slurm_cluster.py; needs root and Debian's slurm-wlm and munge).

    python benchmarks/study_executors.py                      # the demo study, serial vs local --jobs 2, and Slurm
    python benchmarks/study_executors.py --jobs 2 --no-slurm  # without the cluster
    python benchmarks/study_executors.py --study-args "--losses mse --epochs 10"

Each study runs in a fresh folder (the image cache is shared: its first build is not timed twice). Run it on an idle
machine: two heavy jobs at once on 2 cores ruin both figures.
"""

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def study_seconds(args: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aecurves", "study", *args, "--no-progress", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def chain(args: list[str], out: Path) -> str:
    plan = subprocess.run([sys.executable, "-m", "aecurves", "study", *args, "--out", str(out), "--plan"],
                          check=True, capture_output=True, text=True).stdout
    return next(line for line in plan.splitlines() if "longest chain" in line)


class Noop:
    """A stage job that does nothing: what is left of its wall time is the executor's own."""

    processes = 1

    def __call__(self):
        return {"ran": {"started": time.time()}}


def slurm_overhead(jobs: int, root: Path) -> dict:
    from aecurves.executors import SlurmExecutor, SlurmSettings

    from slurm_cluster import skip_reason, slurm_cluster

    reason = skip_reason()
    if reason:
        return {"skipped": reason}
    with slurm_cluster(root / "cluster"):
        settings = SlurmSettings(partition="debug", time=10, gpus=0, train_tasks=None, cpus=1, mem=None,
                                 account=None, qos=None, setup=(), extra=(), max_jobs=jobs)
        executor = SlurmExecutor(root / "slurm", settings)
        starts, seen = [], []
        for i in range(jobs):  # one at a time: the latency of a stage, not the cluster's throughput
            t0 = time.time()
            executor.submit(f"noop:{i}", Noop())
            outcome = []
            while not outcome:
                outcome = executor.wait(timeout=60)
            assert outcome[0].error is None, outcome[0].error
            starts.append(outcome[0].result["ran"]["started"] - t0)
            seen.append(time.time() - t0)
    return {"submission to start, median s": statistics.median(starts), "min": min(starts), "max": max(starts),
            "submission to result seen by the driver, median s": statistics.median(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-args", default="", help="flags for `aecurves study` (default: the demo preset)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--slurm-jobs", type=int, default=8, help="no-op stage jobs timed on the test cluster")
    parser.add_argument("--no-slurm", action="store_true")
    opts = parser.parse_args()
    args = shlex.split(opts.study_args)
    with tempfile.TemporaryDirectory(prefix="aecurves-bench-") as tmp:
        root = Path(tmp)
        print(chain(args, root / "plan"))
        serial = study_seconds(args, root / "serial")
        local = study_seconds([*args, "--executor", "local", "--jobs", str(opts.jobs)], root / "local")
        print(f"serial: {serial:.1f} s; --executor local --jobs {opts.jobs}: {local:.1f} s; "
              f"ratio serial/local {serial / local:.2f}")
        if not opts.no_slurm:
            for k, v in slurm_overhead(opts.slurm_jobs, root).items():
                print(f"slurm, {k}: {v if isinstance(v, str) else f'{v:.2f}'}")


if __name__ == "__main__":
    main()
