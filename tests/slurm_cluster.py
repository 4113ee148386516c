"""A throwaway single-node Slurm cluster for tests and benchmarks: Debian's munge and slurm-wlm, started as root on
free ports under a temporary folder, stopped afterwards. No accounting database: `sacct` fails there, as on many
small clusters, so whatever drives jobs must work without it.

    with slurm_cluster(tmp_path) as cluster:   # sets SLURM_CONF for this process and its children
        subprocess.run(["sbatch", ...])

`skip_reason()` says why no cluster can be started here (not root, or the packages are not installed).
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (slurmd runs jobs as their user)"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing or shutil.which("sbatch") is None:
        return (f"Slurm is not installed ({', '.join(missing) or 'sbatch'} missing): apt-get install slurm-wlm munge "
                "(.ci/run does)")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    root: Path
    conf: Path
    partition: str = PARTITION
    processes: tuple = ()

    def squeue(self) -> str:
        return subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout


CONF = """ClusterName=aecurvestest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextlib.contextmanager
def slurm_cluster(root: Path, cpus: int | None = None):
    """Starts munged, slurmctld and slurmd under `root`; yields a Cluster once the node is idle; stops them."""
    root = Path(root)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split(".")[0]
    ctld_port, d_port = _free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(host=host, ctld_port=ctld_port, d_port=d_port, root=root,
                                cpus=cpus or os.cpu_count() or 1, memory=1024, partition=PARTITION))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    old_conf = os.environ.get("SLURM_CONF")
    processes = []
    try:
        processes.append(subprocess.Popen(
            [_daemon("munged"), "-F", "--force", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
             f"--seed-file={root}/munge/munged.seed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), "munged", root)
        processes.append(subprocess.Popen([_daemon("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        processes.append(subprocess.Popen([_daemon("slurmd"), "-D", "-f", str(conf), "-N", host], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        os.environ["SLURM_CONF"] = str(conf)

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            return out.strip() in ("idle", "mixed")

        _wait_for(idle, "the Slurm node", root, timeout=60)
        yield Cluster(root, conf, PARTITION, tuple(processes))
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for p in reversed(processes):
            p.send_signal(signal.SIGTERM)
        for p in reversed(processes):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def _wait_for(ready, what: str, root: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.rglob("*.log")))
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s; logs:\n{logs}")
