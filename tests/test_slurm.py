"""SLURM for real: a local one-node cluster (tests/slurm.py) runs a submitit sweep and an Optuna sweep through it,
jobs that are pre-empted or signalled before their time limit and resume themselves to the uninterrupted weights,
and 2-task DDP under srun.
The pieces (run dir per job, auto-resume, refusal of a finished run) also have unit tests that need no cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pytest
import torch
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf
from optuna.trial import TrialState

from glint_lightning.runs import slurm
from glint_lightning.runs.optuna_sweep import CUT_SHORT_ATTR, JOB_NUM_ATTR, SWEEP_DIR_ATTR
from glint_lightning.runs.resume import resolve_resume
from glint_lightning.utils.errors import EXIT_USER_ERROR
from tests.helpers import REPO, TINY, run_cli

if TYPE_CHECKING:
    from tests.slurm import LocalSlurm

pytest_plugins = ["tests.slurm"]  # the slurm_cluster fixture

# 48 training tiles in batches of 8: 6 steps an epoch, 18 in all. Dropout, augmentation noise and a schedule make
# any replayed or skipped batch, or lost optimizer state, show in the weights (as in test_interrupts).
EXACT = [
    "trainer.deterministic=true",
    "scheduler=exponential",
    "model.dropout=0.2",
    "data.augment.depth_noise=0.01",
    "test=false",
    "trainer.max_epochs=3",
]
RUN = [*TINY, *EXACT]
SCRIPT = REPO / "scripts" / "sbatch_train.sh"


TRUST = "trusted_targets=[tests.]"  # the tests' callbacks, trusted as a user's own code would be


def _hold(ready: Path, step: int = 8, only_loss: str = "", name: str = "hold") -> list[str]:
    """Hold the run after `step` (8: epoch 1, mid-epoch) until it is told to stop, writing its job id to `ready`."""
    hold = [f"+callbacks.{name}._target_=tests.slurm.HoldAtStep", f"+callbacks.{name}.step={step}"]
    hold.append(f"+callbacks.{name}.ready={ready}")
    return hold + ([f"+callbacks.{name}.only_loss={only_loss}"] if only_loss else [])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    weights = _weights(path)
    assert list(weights) == list(expected)
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, f"{path}: weights differ from the uninterrupted run's in {different}"


# --- the pieces, without a cluster -------------------------------------------------------------------------------


@pytest.fixture
def no_slurm(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_run_dir_is_keyed_to_the_slurm_job_and_task(no_slurm):
    assert slurm.run_dir("outputs/slurm", "outputs/2026-11-26/10-00-00") == "outputs/2026-11-26/10-00-00"
    no_slurm.setenv("SLURM_JOB_ID", "41")
    no_slurm.setenv("SLURM_JOB_NAME", "glint-train")
    assert slurm.run_dir("outputs/slurm", "x") == "outputs/slurm/41"
    no_slurm.setenv("SLURM_ARRAY_JOB_ID", "40")
    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert slurm.run_dir("outputs/slurm", "x") == "outputs/slurm/40_1"
    no_slurm.setenv("SLURM_JOB_NAME", "interactive")  # salloc shell: a fresh dir per run, as outside SLURM
    assert slurm.run_dir("outputs/slurm", "x") == "x"
    setup_globals()  # Hydra's ${now:} resolver
    cfg = OmegaConf.load(REPO / "conf/hydra/default.yaml")
    no_slurm.setenv("SLURM_JOB_NAME", "glint-train")
    assert OmegaConf.create({"paths": {"outputs_root": "out"}, "hydra": cfg}).hydra.run.dir == "out/slurm/40_1"
    no_slurm.setenv("SLURM_PROCID", "1")  # the other tasks of an srun share rank 0's run dir, without .hydra/
    assert slurm.rank_zero_value(".hydra") is None and OmegaConf.create(cfg).output_subdir is None


def _ckpt(path: Path, epoch: int, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": epoch, "global_step": step}, path)
    return path


def test_a_requeued_job_resumes_its_own_last_ckpt_without_ckpt_path(no_slurm, tmp_path, glint_log):
    run = tmp_path / "run"
    last = _ckpt(run / "checkpoints" / "last.ckpt", 1, 8)
    no_slurm.setenv("SLURM_JOB_ID", "7")
    assert resolve_resume(None, run, tmp_path) is None, "the job's first run starts afresh"
    no_slurm.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_resume(None, run, tmp_path) == last
    assert f"SLURM job 7 (restart 1): resuming from {last} (epoch 1, step 8)" in glint_log()
    other = _ckpt(tmp_path / "other.ckpt", 0, 6)
    assert resolve_resume(str(other), run, tmp_path) == last, "what the first run started from is in last.ckpt"
    last.unlink()
    assert resolve_resume(str(other), run, tmp_path) == other, "killed before its first save: start as it did"
    assert f"no last.ckpt in {run} yet" in glint_log()


def test_a_fresh_slurm_job_refuses_a_run_dir_that_holds_a_run(no_slurm, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    check = slurm.RequeueOnSignal().on_run_start

    def config(ckpt_path: str | None = None) -> OmegaConf:
        return OmegaConf.create({"hydra": {"run": {"dir": str(run)}}, "ckpt_path": ckpt_path})

    check(config())  # outside SLURM: as before
    no_slurm.setenv("SLURM_JOB_ID", "3")
    with pytest.raises(SystemExit) as exit_:
        check(config())
    assert exit_.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: hydra.run.dir={run}: holds a run already, and SLURM job 3 was not requeued")
    assert err.count("\n") == 1
    check(config("last"))  # continuing it is what the user asked for
    no_slurm.setenv("SLURM_RESTART_COUNT", "1")
    check(config())  # the requeued job continues its own run


# --- on a local SLURM cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_env(slurm_cluster: LocalSlurm, cache_dir: Path) -> dict[str, str]:
    """What the tests' jobs run with: this cluster, this checkout, one thread (CPU results independent of load)."""
    env = {k: v for k, v in slurm_cluster.env.items() if not k.startswith("SLURM_") and k != "HYDRA_FULL_ERROR"}
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {
        **env,
        "SLURM_CONF": slurm_cluster.env["SLURM_CONF"],
        "GLINT_CACHE_DIR": str(cache_dir),
        "GLINT_PYTHON": sys.executable,
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


class Reference:
    """The uninterrupted run (same config, loss=focal, outside SLURM), trained while the cluster works."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.last = root / "outputs/reference/checkpoints/last.ckpt"
        args = [sys.executable, "-m", "glint_lightning.train", *RUN, "loss=focal", "hydra.run.dir=outputs/reference"]
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._weights: dict[str, torch.Tensor] | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            _, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, err.decode()[-3000:]
            self._weights = _weights(self.last)
        return self._weights


@pytest.fixture(scope="module")
def reference(job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference"), job_env)


def _sbatch(cluster: LocalSlurm, cwd: Path, env: dict[str, str], *args: str) -> str:
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def _wait_for(path: Path, cluster: LocalSlurm, job: str, log: Path, timeout_s: float = 180) -> str:
    """Wait until the job has written `path`; fail at once, with its log, if the job ends before."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.is_file() and path.read_text():
            return path.read_text()
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ended before {path.name}: {log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.2)
    pytest.fail(f"job {job}: no {path.name} within {timeout_s} s")


@pytest.mark.slow
def test_sbatch_job_signalled_before_its_time_limit_requeues_itself_and_resumes_exactly(
    slurm_cluster, job_env, reference, tmp_path
):
    ready = tmp_path / "ready"
    job = _sbatch(slurm_cluster, tmp_path, job_env, str(SCRIPT), *RUN, "loss=focal", TRUST, *_hold(ready))
    log = tmp_path / f"slurm-{job}.out"
    _wait_for(ready, slurm_cluster, job, log)
    # What `#SBATCH --signal=USR1@120` sends 120 s before the time limit: USR1 to the job's srun tasks.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info = slurm_cluster.wait_for_job(job)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text[-3000:]

    run = tmp_path / "outputs/slurm" / job
    last = run / "checkpoints/last.ckpt"
    assert f"SIGTERM: saved a resumable checkpoint at epoch 1, step 8: {last}" in text
    assert f"SLURM job {job} requeued; it resumes from last.ckpt in {run}" in text
    assert f"SLURM job {job} (restart 1): resuming from {last} (epoch 1, step 8)" in text
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["epochs"], summary["global_step"]) == (3, 18)
    assert not list(run.glob("hpc_ckpt_*")), "one resume checkpoint: last.ckpt, not Lightning's HPC one"
    _assert_same_weights(last, reference.weights())

    # A job that was not requeued never continues a finished run it finds (as after a job id comes round again).
    again = _sbatch(slurm_cluster, tmp_path, job_env, str(SCRIPT), *RUN, "loss=focal", f"hydra.run.dir={run}")
    info = slurm_cluster.wait_for_job(again)
    text = (tmp_path / f"slurm-{again}.out").read_text()
    assert info["ExitCode"] == f"{EXIT_USER_ERROR}:0", text[-3000:]
    assert f"error: hydra.run.dir={run}: holds a run already, and SLURM job {again} was not requeued" in text
    assert (run / "metrics.json").read_text() == json.dumps(summary, indent=1)


@pytest.mark.slow
def test_submitit_sweep_runs_each_job_on_slurm_and_requeued_jobs_resume_in_their_folders(
    slurm_cluster, job_env, reference, tmp_path
):
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
    ]
    # dice takes no alpha: that job fails when it builds its loss, on the cluster; focal and tversky train, and
    # each holds at step 8 to be pre-empted (focal) or warned of its time limit (tversky).
    losses = ["loss=focal,dice,tversky", "++loss.alpha=0.25"]
    ready = {"focal": tmp_path / "ready_focal", "tversky": tmp_path / "ready_tversky"}
    holds = [
        *_hold(ready["focal"], only_loss="FocalLoss"),
        *_hold(ready["tversky"], only_loss="TverskyLoss", name="hold2"),
    ]
    args = [sys.executable, "-m", "glint_lightning.train", "-m", *launcher, *losses, *RUN, TRUST, *holds]
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        sweep = subprocess.Popen(args, cwd=tmp_path, env=job_env, stdout=out, stderr=err)
    try:
        end = time.monotonic() + 180
        while not all(p.is_file() and p.read_text() for p in ready.values()) and time.monotonic() < end:
            assert sweep.poll() is None, (tmp_path / "sweep.err").read_text()[-3000:]
            time.sleep(0.2)
        job = {loss: path.read_text() for loss, path in ready.items()}  # <array job>_<task>
        slurm_cluster.run("scontrol", "requeue", job["focal"])  # a pre-emption: SIGTERM now, queued again
        slurm_cluster.run("scancel", "--signal=USR2", job["tversky"])  # submitit's time-limit warning
        sweep.wait(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.send_signal(signal.SIGINT)
            sweep.wait(timeout=30)
    err_text = (tmp_path / "sweep.err").read_text()
    assert sweep.returncode == EXIT_USER_ERROR, err_text[-3000:]
    assert "DiceLoss.__init__() got an unexpected keyword argument 'alpha'" in err_text.splitlines()[-1]

    sweep_dir = next((tmp_path / "outputs/multirun").glob("*/*"))
    jobs = {p.name: p for p in sweep_dir.iterdir() if p.name.isdigit()}
    assert sorted(jobs) == ["0", "1", "2"]
    assert [(jobs[n] / "metrics.json").is_file() for n in "012"] == [True, False, True]
    for loss, folder in (("focal", jobs["0"]), ("tversky", jobs["2"])):
        log = "".join(p.read_text() for p in sorted(sweep_dir.glob(f".submitit/{job[loss]}/*_log.*")))
        last = folder / "checkpoints/last.ckpt"
        assert f"SLURM job {job[loss]} (restart 1): resuming from {last} (epoch 1, step 8)" in log, log[-3000:]
        assert slurm_cluster.job(job[loss])["Restarts"] == "1"
        summary = json.loads((folder / "metrics.json").read_text())
        assert (summary["epochs"], summary["global_step"]) == (3, 18)
    assert f"SLURM job {job['tversky']} requeued (submitit); it resumes from last.ckpt in {jobs['2']}" in log
    _assert_same_weights(jobs["0"] / "checkpoints/last.ckpt", reference.weights())

    res = run_cli("glint_lightning.report", f"dir={sweep_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = [[c.strip() for c in line.split("|")] for line in res.stdout.splitlines() if "| loss=" in line]
    rows = {c[2]: c[3] for c in cells}
    assert rows == {"loss=focal": "done", "loss=dice": "failed or unfinished", "loss=tversky": "done"}, res.stdout


@pytest.mark.slow
def test_optuna_sweep_on_slurm_runs_trials_as_array_tasks_and_a_preempted_trial_resumes_and_counts_once(
    slurm_cluster, job_env, tmp_path
):
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
    ]
    study_args = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",  # batches of 2 trials: trials 0 and 1, then trial 2 (asked once 0 and 1 are told)
        'hydra.sweeper.params={optimizer.lr: "tag(log, interval(1e-3, 1e-2))"}',
    ]
    ready = tmp_path / "ready"
    hold = [*_hold(ready), "+callbacks.hold.only_job=0"]  # trial 0 holds after step 8 (epoch 1 of 2) to be pre-empted
    args = [sys.executable, "-m", "glint_lightning.train", *study_args, *launcher, *TINY, "test=false", TRUST, *hold]
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        sweep = subprocess.Popen(args, cwd=tmp_path, env=job_env, stdout=out, stderr=err)
    try:
        end = time.monotonic() + 180
        while not (ready.is_file() and ready.read_text()) and time.monotonic() < end:
            assert sweep.poll() is None, (tmp_path / "sweep.err").read_text()[-3000:]
            time.sleep(0.2)
        assert ready.is_file(), "trial 0 never reached step 8"
        held = ready.read_text()  # <array job>_0
        slurm_cluster.run("scontrol", "requeue", held)  # a pre-emption: SIGTERM now, queued again
        sweep.wait(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.send_signal(signal.SIGINT)
            sweep.wait(timeout=30)
    sweep_log = (tmp_path / "sweep.out").read_text() + (tmp_path / "sweep.err").read_text()
    assert sweep.returncode == 0, sweep_log[-3000:]
    assert "marked failed" not in sweep_log, "no trial was cut short or failed"

    study = optuna.load_study(study_name="glint", storage=f"sqlite:///{tmp_path}/outputs/optuna/glint.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, "n_trials=3; the pre-empted trial counted once"
    assert not [t.number for t in trials if CUT_SHORT_ATTR in t.user_attrs or "glint_retry_of" in t.user_attrs]
    sweep_dir = next((tmp_path / "outputs/multirun").glob("*/*"))
    jobs = []
    for trial in trials:
        folder = sweep_dir / str(trial.number)
        assert (trial.user_attrs[SWEEP_DIR_ATTR], trial.user_attrs[JOB_NUM_ATTR]) == (str(sweep_dir), trial.number)
        overrides = list(OmegaConf.load(folder / ".hydra/overrides.yaml"))
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in overrides, "the job ran its trial's parameters"
        summary = json.loads((folder / "metrics.json").read_text())
        assert (summary["epochs"], summary["global_step"]) == (2, 12)
        assert trial.value == summary["best_score"], f"trial {trial.number} was told what its job returned"
        job = OmegaConf.load(folder / ".hydra/hydra.yaml").hydra.job.id  # <array job>_<task> in an array
        log = "".join(p.read_text() for p in sorted(sweep_dir.glob(f".submitit/{job}/*_log.*")))
        assert f"run dir:         {folder}" in log, f"trial {trial.number}'s SLURM job {job} trained it"
        jobs.append(job)
    array = held.split("_")[0]  # the first batch: an array job of 2 tasks; the second, of 1 trial, a plain job
    assert jobs[:2] == [held, f"{array}_1"] and jobs[2].isdigit() and int(jobs[2]) > int(array), jobs
    assert trials[2].datetime_start > max(t.datetime_complete for t in trials[:2]), "asked after 0 and 1 were told"
    assert [slurm_cluster.job(job)["Restarts"] for job in jobs] == ["1", "0", "0"]

    log = "".join(p.read_text() for p in sorted(sweep_dir.glob(f".submitit/{held}/*_log.*")))
    last = sweep_dir / "0/checkpoints/last.ckpt"
    assert f"SIGTERM: saved a resumable checkpoint at epoch 1, step 8: {last}" in log, log[-3000:]
    assert f"SLURM job {held} (restart 1): resuming from {last} (epoch 1, step 8)" in log, log[-3000:]
    assert log.count("run dir:") == 1, "the pre-empted run returned nothing; its requeued run finished the trial"


@pytest.mark.slow
def test_srun_ddp_two_tasks_train_one_run_with_slurm_ranks_and_resume_after_a_requeue(slurm_cluster, job_env, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip(f"2-task DDP needs 2 CPUs; the local SLURM node has {slurm_cluster.cpus}")
    ddp = [a for a in RUN if not a.startswith(("trainer.devices", "trainer.accelerator", "trainer.max_epochs"))]
    ddp += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2"]  # 3 steps an epoch

    def report(name: str) -> list[str]:
        return [
            TRUST,
            "+callbacks.report._target_=tests.slurm.SlurmRankReport",
            f"+callbacks.report.out={tmp_path}/{name}",
        ]

    ntasks = ["--ntasks-per-node=2", str(SCRIPT)]
    straight = _sbatch(slurm_cluster, tmp_path, job_env, *ntasks, *ddp, *report("straight"))
    ready = tmp_path / "ready"
    held = _sbatch(slurm_cluster, tmp_path, job_env, *ntasks, *ddp, *report("requeued"), *_hold(ready, step=4))
    info = slurm_cluster.wait_for_job(straight)
    log = (tmp_path / f"slurm-{straight}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]

    ranks = [json.loads((tmp_path / f"straight/rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["environment"], r["slurm_procid"]) for r in ranks] == [
        (2, "SLURMEnvironment", "0"),
        (2, "SLURMEnvironment", "1"),
    ]
    shard0, shard1 = (set(r["tiles"]["0"]) for r in ranks)
    assert len(shard0) == len(shard1) == 24 and not shard0 & shard1 and shard0 | shard1 == set(range(48))
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the ranks' weights identical"
    run = tmp_path / "outputs/slurm" / straight
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("best-epoch") and names[1] == "last.ckpt", names
    assert (run / ".hydra/config.yaml").is_file() and (run / "metrics.json").is_file()
    assert log.count("run dir:") == 1, "one summary, from rank 0"

    # Under DDP the time-limit signal requeues at once (Lightning's DDP stop on SIGTERM can deadlock): SLURM stops
    # both tasks and the job resumes from the last epoch's last.ckpt, to the same weights.
    _wait_for(ready, slurm_cluster, held, tmp_path / f"slurm-{held}.out")  # held after step 4: epoch 1
    slurm_cluster.run("scancel", "--signal=USR1", held)
    info = slurm_cluster.wait_for_job(held)
    log = (tmp_path / f"slurm-{held}.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    last = tmp_path / "outputs/slurm" / held / "checkpoints/last.ckpt"
    assert f"SLURM job {held} (restart 1): resuming from {last} (epoch 1, step 3)" in log
    again = [json.loads((tmp_path / f"requeued/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["weights"] for r in again] == [ranks[0]["weights"]] * 2, "the uninterrupted run's weights"
    assert sorted(p.name for p in (tmp_path / "outputs/slurm").iterdir()) == sorted([straight, held])
