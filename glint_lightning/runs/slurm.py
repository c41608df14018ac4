"""Training under SLURM: a run dir per job, and pre-emption or a time limit that saves, requeues and resumes.

One design, built on what a run already does on SIGTERM (CheckpointOnInterrupt saves `last.ckpt` at the next step
boundary, where model, optimizer and loop state agree):

- The run dir is keyed to the job: `outputs/slurm/<job id>` (`<array job>_<task>` for an array task). A requeued
  job keeps its id, so it finds its own run dir; a sweep job keeps its Hydra sweep sub-folder (submitit re-runs the
  same pickled job).
- Pre-emption (`scontrol requeue`, or PreemptMode=REQUEUE) sends SIGTERM: the run saves `last.ckpt` and exits, and
  SLURM starts the job again. A time limit announced by `sbatch --signal=USR1@N` (or submitit's USR2) is turned
  into that same SIGTERM by `RequeueOnSignal`; once the checkpoint is saved and the process ends, the job is
  requeued (`scontrol requeue`, or submitit's own requeue, which honours `max_num_timeout`).
- The requeued job (SLURM_RESTART_COUNT > 0) resumes from its run dir's `last.ckpt` without `ckpt_path`
  (`resume.resolve_resume`), saying so in one line. A job that was not requeued never continues a run it finds.

Lightning's own SLURM auto-requeue (SLURMEnvironment: an `hpc_ckpt_<n>.ckpt` saved inside the signal handler,
wherever the signal lands, e.g. mid optimizer step, and preferred over everything on restart) is not used: our USR1
handler is in place before `fit`, so Lightning leaves USR1 alone. There is one resume checkpoint, `last.ckpt`.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from glint_lightning.utils.errors import EXIT_USER_ERROR

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # sbatch --signal=USR1@N (Lightning's convention); submitit: USR2
INTERACTIVE_NAMES = ("bash", "interactive")  # salloc/srun shells: not a batch job (as Lightning decides)


def job_key(env: Mapping[str, str] = os.environ) -> str | None:
    """This batch job's id as SLURM shows it (`<array job>_<task>` for an array task), or None outside one."""
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in INTERACTIVE_NAMES:
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """How often SLURM has requeued this job (SLURM_RESTART_COUNT; absent on the first run)."""
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def requeued(env: Mapping[str, str] = os.environ) -> str | None:
    """'job <id> (restart <n>)' when this is a requeued SLURM job, else None."""
    key = job_key(env)
    return f"job {key} (restart {restart_count(env)})" if key and restart_count(env) > 0 else None


def global_rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("SLURM_PROCID", "0") or 0)


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """Tasks of this srun (SLURM_NTASKS): more than one is DDP under SLURM."""
    return int(env.get("SLURM_NTASKS", "1") or 1)


def run_dir(slurm_root: str, default: str) -> str:
    """`hydra.run.dir`: `<slurm_root>/<job key>` in a SLURM batch job (the same for every task and every restart),
    else `default`."""
    key = job_key()
    return f"{slurm_root}/{key}" if key else default


def rank_zero_value(value: Any) -> Any:
    """`value` on SLURM task 0, None on the other tasks of an `srun` (e.g. Hydra's .hydra/ written once)."""
    return value if global_rank() == 0 else None


def register_resolvers() -> None:
    """`${glint_slurm_run_dir:<slurm root>,<default>}` and `${glint_slurm_rank_zero:<value>}` for conf/hydra."""
    if not OmegaConf.has_resolver("glint_slurm_run_dir"):
        OmegaConf.register_new_resolver("glint_slurm_run_dir", run_dir)
    if not OmegaConf.has_resolver("glint_slurm_rank_zero"):
        OmegaConf.register_new_resolver("glint_slurm_rank_zero", rank_zero_value)


def holds_run(folder: Path) -> bool:
    """Whether a training run already wrote checkpoints or results there (not just Hydra's files)."""
    return (folder / "metrics.json").is_file() or (folder / "checkpoints" / "last.ckpt").is_file()


def _lightning_fitting() -> bool:
    """Whether Lightning's SIGTERM handler is installed, i.e. `trainer.fit` runs and will stop at the next step."""
    return getattr(type(signal.getsignal(signal.SIGTERM)), "__module__", "").startswith("lightning.")


class RequeueOnSignal(Callback):
    """Hydra callback of `train` (conf/hydra/default.yaml); does nothing outside a SLURM batch job.

    Before the run: a job that was not requeued refuses a run dir that already holds a run (job ids repeat after a
    controller's state is reset; a second `train` in one job) unless `ckpt_path` says to continue it.
    During the run: USR1/USR2 (the time-limit warning) become SIGTERM, so the run saves `last.ckpt` at the next step
    and exits; at exit, task 0 requeues the job unless the run finished.
    """

    def __init__(self) -> None:
        self._requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._run_dir: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        key = job_key()
        folder = Path(str(config.hydra.run.dir))
        if key is None or restart_count() > 0 or config.get("ckpt_path") is not None or not holds_run(folder):
            return
        print(
            f"error: hydra.run.dir={folder}: holds a run already, and SLURM job {key} was not requeued (job ids "
            f"repeat after the controller's state is reset); pass hydra.run.dir=<new folder>, or ckpt_path=last to "
            "continue that run",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_USER_ERROR)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if job_key() is None:
            return
        self._run_dir = Path(str(config.hydra.runtime.output_dir))
        for signum in REQUEUE_SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            if previous != self._on_signal:  # a second job in this process (basic launcher) keeps submitit's
                self._previous[signum] = previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._requested is not None:
            return
        self._requested = signum
        if world_size() > 1:
            # Lightning's DDP stop on SIGTERM can deadlock the ranks (a collective inside its signal handler, each
            # rank stopping at its own step): requeue at once; SLURM stops every task (SIGKILL after KillWait) and
            # the job resumes from the newest last.ckpt (callbacks.step_checkpoint.every_n_train_steps bounds the loss)
            self._requeue()
            return
        atexit.register(self._requeue)
        if _lightning_fitting():  # save last.ckpt at the next step boundary and exit, as on SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)

    def _requeue(self) -> None:
        """After the requeue signal (at exit, or at once under DDP): task 0 requeues the job unless the run finished."""
        if self._requested is None or global_rank() != 0:
            return
        if self._run_dir is not None and (self._run_dir / "metrics.json").is_file():
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue terminates this job's processes: finish first
        previous, key = self._previous.get(self._requested), job_key()
        _say(f"{signal.Signals(self._requested).name}: SLURM job {key} is near its time limit")
        if callable(previous):  # submitit's handler: requeues with its own bookkeeping, then exits
            try:
                previous(self._requested, None)
            except SystemExit:
                pass
            except Exception as err:  # noqa: BLE001 (e.g. submitit's "timed-out too many times")
                _say(f"SLURM job {key} not requeued: {err}")
                return
            _say(f"SLURM job {key} requeued (submitit); it resumes from last.ckpt in {self._run_dir}")
            return
        res = subprocess.run(["scontrol", "requeue", str(key)], capture_output=True, text=True)
        if res.returncode != 0:
            _say(f"SLURM job {key} not requeued: {res.stderr.strip()}")
            return
        _say(f"SLURM job {key} requeued; it resumes from last.ckpt in {self._run_dir}")


def _say(line: str) -> None:
    """One line straight to stdout: also safe inside a signal handler (print there can raise on a stream the main
    thread is writing to)."""
    os.write(1, f"{line}\n".encode())


register_resolvers()
if job_key() is None:  # Lightning's hint to prepend `srun`, on every run where slurm-client is installed: noise here
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
