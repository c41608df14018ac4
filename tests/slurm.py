"""A real one-node SLURM cluster for the tests: munge, slurmctld and slurmd started from Debian's packages with a
generated slurm.conf whose state, spool, logs and ports are the session's own (`slurm_cluster` fixture).

Needs root (the daemons run as root, munged as the munge user) and `apt-get install slurmctld slurmd slurm-client
munge`; without them the fixture skips with one line saying so. The fixture stops what it started, by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
from hydra.core.hydra_config import HydraConfig

from tests.helpers import RankReport

PACKAGES = "slurmctld slurmd slurm-client munge"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "squeue", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (the daemons run as root)"
    absent = [name for name in BINARIES if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return f"{', '.join(absent)} not installed"
    if not MUNGE_KEY.is_file():
        return f"no {MUNGE_KEY}"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return kb // 1024 * 9 // 10  # below the node's real memory, or slurmd drains the node


class LocalSlurm:
    """One node (this host, all its CPUs) in one partition `debug`; `env` points SLURM's commands at it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="glint-slurm-"))  # not under pytest's 0700 dirs: munge reads it
        self.root.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir()
        self.conf.write_text(
            f"""ClusterName=glinttest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmUser=root
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={self.host} {self._hardware()} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _hardware(self) -> str:
        """The node's CPU layout as slurmd detects it (a different one drains the node); sets `cpus`."""
        res = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True)
        found = dict(re.findall(r"(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=(\d+)", res.stdout))
        if "CPUs" not in found:
            return f"CPUs={self.cpus}"
        self.cpus = int(found["CPUs"])
        return " ".join(f"{k}={v}" for k, v in found.items())

    def _start(self, args: list[str], **kwargs) -> None:
        log = open(self.root / f"{Path(args[0]).name}.out", "w")  # noqa: SIM115 (open while the daemon runs)
        self._logs.append(log)
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kwargs))

    def start(self, timeout_s: float = 90) -> None:
        self._write_conf()
        munge_dir = self.socket.parent
        munge_dir.mkdir(mode=0o755)
        shutil.chown(munge_dir, "munge", "munge")
        self._start(
            [
                _sbin("munged"),
                "--foreground",
                f"--socket={self.socket}",
                f"--pid-file={munge_dir}/munged.pid",
                f"--log-file={munge_dir}/munged.log",
                f"--seed-file={munge_dir}/munged.seed",
            ],
            user="munge",
            group="munge",
        )
        self._wait(lambda: self.socket.exists(), timeout_s, "munged")
        self._start([_sbin("slurmctld"), "-D", "-f", str(self.conf)])
        self._start([_sbin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", timeout_s, "node")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))
        raise RuntimeError(f"local SLURM: {what} not ready within {timeout_s} s (exited: {dead})\n{logs}")

    def run(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, cwd=cwd, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot the job."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = re.findall(r"(\w+)=(\S*)", res.stdout.splitlines()[0]) if res.returncode == 0 else []
        return dict(fields)

    def wait_for_job(self, job_id: str, timeout_s: float = 180) -> dict[str, str]:
        """Wait until the job (every task of an array) has ended; its last `scontrol show job`."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            info = self.job(job_id)
            if info and info.get("JobState") not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
                return info
            time.sleep(0.5)
        raise AssertionError(f"SLURM job {job_id} still {self.job(job_id).get('JobState')} after {timeout_s} s")

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons this object started (slurmd, slurmctld, munged)."""
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--user", "root", check=False)
            end = time.monotonic() + 15
            while time.monotonic() < end and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """A running local SLURM for the session (skips, saying why, where one cannot start)."""
    why = missing()
    if why:
        pytest.skip(f"local SLURM cluster unavailable: {why}; run as root after apt-get install {PACKAGES}")
    cluster = LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class HoldAtStep(L.Callback):
    """Holds training after optimizer step `step` until SIGTERM reaches Lightning (what a pre-emption sends), having
    written this SLURM job's id to `ready`; once per `ready` file, so the requeued run goes straight on. Only global
    rank `rank` holds (under DDP the others wait for it in their next collective), and with `only_loss` only runs
    whose loss class has that name (one job of a sweep); with `only_job` only the sweep job of that Hydra job number
    (an Optuna trial's number)."""

    def __init__(
        self,
        step: int,
        ready: str,
        only_loss: str = "",
        rank: int = 0,
        timeout_s: float = 120,
        only_job: int | None = None,
    ) -> None:
        self.step, self.ready, self.only_loss, self.rank = step, Path(ready), only_loss, rank
        self.timeout_s, self.only_job = timeout_s, only_job

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank or self.ready.exists():
            return
        if self.only_loss and not pl_module.hparams["loss"]["_target_"].endswith(f".{self.only_loss}"):
            return
        if self.only_job is not None and HydraConfig.get().job.num != self.only_job:
            return
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        self.ready.write_text(f"{array}_{task}" if array else os.environ.get("SLURM_JOB_ID", ""))
        end = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm and time.monotonic() < end:
            time.sleep(0.05)


class SlurmRankReport(RankReport):
    """RankReport plus where each rank's rank came from: Lightning's cluster environment and SLURM's variables."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        path = self.out / f"rank{trainer.global_rank}.json"
        report = json.loads(path.read_text())
        report["environment"] = type(trainer.strategy.cluster_environment).__name__
        report["slurm_procid"] = os.environ.get("SLURM_PROCID")
        path.write_text(json.dumps(report))
