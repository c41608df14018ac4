"""Optuna sweeps (studies that survive a crash), launchers and experiment configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.trial import TrialState

from glint_lightning.report import STUDY_POINTER, write_report
from glint_lightning.runs.optuna_sweep import ResumableSweep, StudyFile, check_database_url
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import TINY, run_cli

FAST = [*TINY, "trainer.max_epochs=1", "test=false"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.slow
def test_optuna_records_a_diverging_trial_as_failed_and_goes_on(tmp_path, cache_dir):
    # Seed 0's TPE start-up draws lr=1e30 (NaN loss) for trials 0 and 1 and lr=1e-3 for trial 2.
    params = 'hydra.sweeper.params={optimizer.lr: "choice(1e-3, 1e30)", optimizer.weight_decay: "interval(0, 0.01)"}'
    res = run_cli(
        "glint_lightning.train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        params,
        *FAST,
        cwd=tmp_path,
        env={"GLINT_CACHE_DIR": str(cache_dir)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "outputs/multirun").glob("*/*"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    done = [p.name for p in jobs if (p / "metrics.json").is_file()]
    failed = [line for line in res.stderr.splitlines() if line.startswith("error: train/loss is nan")]
    assert done == ["2"] and len(failed) == 2, res.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.001
    assert results["best_value"] == pytest.approx(json.loads((jobs[2] / "metrics.json").read_text())["best_score"])

    study = _study(tmp_path / "outputs/optuna/glint.json")
    assert [t["state"] for t in study["trials"]] == ["FAIL", "FAIL", "COMPLETE"]

    out = write_report(sweep)
    table = out["md"].read_text()
    assert table.index("| 2 |") < table.index("| 0 |"), "the finished trial first, failed ones after"
    assert table.count("| failed |") == 2


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, cache_dir):
    res = run_cli(
        "glint_lightning.train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "loss=bce,dice",
        *FAST,
        cwd=tmp_path,
        env={"GLINT_CACHE_DIR": str(cache_dir)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs/multirun").glob("*/*/[0-9]"))
    assert [json.loads((j / "metrics.json").read_text())["best_score"] is not None for j in jobs] == [True, True]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (
            ["hparams_search=optuna"],
            "hydra.sweeper._target_",
            "hydra_plugins.glint_optuna_sweeper.GlintOptunaSweeper",
        ),
        (["hparams_search=optuna"], "hydra.sweeper.storage", "outputs/optuna/glint.json"),
        (["hparams_search=optuna", "hydra.sweeper.study_name=lr"], "hydra.sweeper.storage", "outputs/optuna/lr.json"),
        (["hparams_search=optuna"], "hydra.sweeper.params.optimizer.lr", "tag(log, interval(1e-4, 1e-2))"),
        (["hparams_search=optuna"], "hydra.sweeper.direction", "maximize"),
        (
            ["hydra/launcher=joblib"],
            "hydra.launcher._target_",
            "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        ),
        (
            ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1"],
            "hydra.launcher.partition",
            "gpu",
        ),
        (["experiment=loss_comparison"], "hydra.sweeper.params.loss", "focal,bce,dice,tversky,hybrid"),
        (["experiment=model_comparison"], "hydra.sweeper.params.model", "unet,deeplabv3plus,fcn"),
    ],
)
def test_sweep_and_launcher_configs_compose(overrides, key, expected):
    cfg = _compose(*overrides)
    path, _, leaf = key.rpartition(".")
    if ".params." in key:  # sweep params are a flat dict with dotted keys
        path, leaf = key.split(".params.")[0] + ".params", key.split(".params.")[1]
    node = cfg
    for part in path.split("."):
        node = node[part]
    assert node[leaf] == expected


def _study(path: Path, name: str = "glint") -> dict:
    """A study as its file stores it (JSON: what glint-report reads)."""
    return next(s for s in json.loads(path.read_text())["studies"] if s["name"] == name)


def _trial(study: optuna.Study, value: float | None) -> None:
    """Ask for a trial and tell its value; None leaves it running (as a killed launch does)."""
    trial = study.ask()
    trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("model.base_channels", [16, 32])
    if value is not None:
        study.tell(trial, value)


def test_study_file_keeps_trials_and_is_used_by_one_launch_at_a_time(tmp_path):
    path = tmp_path / "optuna" / "s.json"  # the folder is made
    storage = StudyFile(path)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.5, None):  # one complete trial, one left running
        _trial(study, value)
    with pytest.raises(GlintError, match="another launch is running this study"):
        StudyFile(path)
    storage.close()

    again = optuna.load_study(study_name="s", storage=StudyFile(path))
    assert [t.state for t in again.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert again.best_value == 0.5 and again.best_params == study.trials[0].params
    assert again.trials[0].distributions == study.trials[0].distributions
    assert again.trials[0].datetime_complete == study.trials[0].datetime_complete
    assert again.direction == optuna.study.StudyDirection.MAXIMIZE


def test_a_file_that_is_not_a_study_is_refused_in_one_line(tmp_path):
    (tmp_path / "s.json").write_text('{"trials": []}')
    with pytest.raises(GlintError, match=r"s.json: not a study file of this framework"):
        StudyFile(tmp_path / "s.json")


def _sweep(tmp_path: Path, n_trials: int, direction: str = "maximize") -> ResumableSweep:
    sweep = ResumableSweep(
        sampler=optuna.samplers.TPESampler(seed=0),
        direction=direction,
        storage=str(tmp_path / "s.json"),
        study_name="s",
        n_trials=n_trials,
        n_jobs=1,
        max_failure_rate=1.0,
        search_space=None,
        custom_search_space=None,
        params=None,
    )
    sweep.config, sweep.sweep_dir = OmegaConf.create({"optimized_metric": "val/iou"}), str(tmp_path / "sweep2")
    return sweep


def test_a_relaunch_fails_the_trials_left_running_and_runs_only_the_missing_ones(tmp_path):
    storage = StudyFile(tmp_path / "s.json")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.5, None):  # launch 1: trial 0 done, trial 1 running when the launch was killed
        _trial(study, value)
    storage.close()

    sweep = _sweep(tmp_path, n_trials=5)
    resumed = sweep._resume(StudyFile(tmp_path / "s.json"))
    trials = optuna.load_study(study_name="s", storage=resumed).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert (sweep.n_trials, sweep.job_idx) == (3, 2), "5 in total, 2 finished; job folders numbered by trial"
    pointer = yaml.safe_load((tmp_path / "sweep2" / STUDY_POINTER).read_text())
    assert pointer == {"storage": str(tmp_path / "s.json"), "study_name": "s", "optimized_metric": "val/iou"}
    resumed.close()

    full = _sweep(tmp_path, n_trials=2)
    full._resume(StudyFile(tmp_path / "s.json")).close()
    assert full.n_trials == 0, "n_trials already reached: nothing to run"
    with pytest.raises(GlintError, match=r"study s was started with direction \['maximize'\], not \['minimize'\]"):
        _sweep(tmp_path, n_trials=5, direction="minimize")._resume(StudyFile(tmp_path / "s.json"))


def test_a_database_this_optuna_cannot_use_is_refused_in_one_line():
    import sqlalchemy

    if int(optuna.__version__.split(".")[0]) >= 3 or int(sqlalchemy.__version__.split(".")[0]) < 2:
        pytest.skip("this Optuna can use this SQLAlchemy")
    with pytest.raises(GlintError, match=r"storage=sqlite:///o.db: optuna .* cannot use SQLAlchemy .*\.json"):
        check_database_url("sqlite:///o.db")


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"the sweep ended or stalled before the kill: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_sweep_killed_mid_way_continues_where_it_was_on_relaunch(tmp_path, cache_dir):
    params = 'hydra.sweeper.params={optimizer.lr: "interval(1e-3, 1e-2)"}'
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", params, *FAST]
    env = {**os.environ, "GLINT_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    study_file = tmp_path / "outputs/optuna/glint.json"

    def second_trial_running() -> bool:
        states = [t["state"] for t in _study(study_file)["trials"]] if study_file.is_file() else []
        return states == ["COMPLETE", "RUNNING"]

    proc = subprocess.Popen(
        [sys.executable, "-m", "glint_lightning.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(second_trial_running, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweeper and its trial, as a crash or an OOM kill would
    proc.communicate()
    first = _study(study_file)["trials"][0]

    res = run_cli("glint_lightning.train", *args, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Trial 1 was left running by a launch that stopped: marked failed" in res.stdout + res.stderr
    trials = _study(study_file)["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"], "n_trials=3 in total: one more ran"
    assert trials[0] == first, "the first trial is kept as it was"
    assert trials[2]["params"] != first["params"], "the relaunch's sampler does not repeat the first draws"
    sweeps = sorted((tmp_path / "outputs/multirun").glob("*/*"))
    assert len(sweeps) == 2 and [p.name for p in sweeps[1].iterdir() if p.is_dir()] == ["2"]
    assert trials[2]["system_attrs"] == {"hydra_sweep_dir": str(sweeps[1]), "hydra_job_num": 2}

    with open(write_report(sweeps[1])["csv"]) as f:  # from either sweep folder: every trial of the study
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert {job: r["status"] for job, r in rows.items()} == {"0": "done", "2": "done", "1": "failed"}
    assert float(rows["0"]["val/iou"]) == pytest.approx(first["values"][0])
    assert rows["0"]["best_checkpoint"].startswith(str(sweeps[0] / "0")), "trial 0's run data, from launch 1"
