"""Optuna sweeps (our sweeper on Optuna's own storage: resume, shared studies, pruning), launchers and experiment
configs. Sweeper behaviour is tested on a tiny task app (tests/optuna_task.py); real trainings end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from glint_lightning.report import write_report
from glint_lightning.runs.optuna_sweep import CUT_SHORT_ATTR, LAUNCH_ATTR, StudySweep, distribution, search_space
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.optuna_storage import STUDY_POINTER, make_pruner, open_storage, storage_url
from tests.helpers import TINY, run_cli
from tests.optuna_task import TaskSweep

FAST = [*TINY, "trainer.max_epochs=1", "test=false"]
ALWAYS_PRUNE = ["hydra.sweeper.pruner=threshold", "hydra.sweeper.pruner_args={lower: 2.0}"]  # IoU is never >= 2


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_hydra_sweep_expressions_become_optuna_distributions():
    space, fixed = search_space(
        [
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "loss.weights.dice=interval(0.25, 2.0)",
            "model.depth=tag(int, interval(2, 5))",
            "model.base_channels=choice(16, 32, 64)",
            "loss=bce,dice",
            "seed=range(0, 10, 3)",
            "trainer.max_epochs=3",
            "model.depth=range(2, 4)",  # a later override of the same key wins
        ]
    )
    assert space == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "loss.weights.dice": FloatDistribution(0.25, 2.0),
        "model.depth": IntDistribution(2, 3),
        "model.base_channels": CategoricalDistribution([16, 32, 64]),
        "loss": CategoricalDistribution(["bce", "dice"]),
        "seed": IntDistribution(0, 9, step=3),
    }
    assert fixed == ["trainer.max_epochs=3"]
    (glob,) = OverridesParser.create().parse_overrides(["loss=glob(*)"])
    with pytest.raises(GlintError, match=r"loss=glob\(\*\): Optuna cannot sample it"):
        distribution("loss", glob)


def test_storage_specs_name_optuna_storages_and_pruners_by_name(tmp_path):
    assert storage_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path}/a.db"
    assert storage_url(str(tmp_path / "a.log")) == str(tmp_path / "a.log")
    assert storage_url("postgresql://host/db") == "postgresql://host/db"
    assert isinstance(open_storage(str(tmp_path / "sub" / "a.log")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "sub" / "a.db")), optuna.storages.RDBStorage)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    median = make_pruner("median", {"n_startup_trials": 2})
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("successive_halving"), optuna.pruners.SuccessiveHalvingPruner)
    with pytest.raises(GlintError, match="hydra.sweeper.pruner=medain: no such Optuna pruner"):
        make_pruner("medain")


def test_a_study_started_with_another_direction_or_a_pruner_without_storage_is_refused_in_one_line(tmp_path):
    db = str(tmp_path / "s.db")
    optuna.create_study(study_name="s", storage=open_storage(db), direction="minimize")
    with pytest.raises(GlintError, match=r"study s was started with direction \['minimize'\], not \['maximize'\]"):
        StudySweep(study_name="s", storage=db, direction="maximize").open_study()
    assert StudySweep(study_name="s", storage=db, direction="minimize").open_study().directions == [
        optuna.study.StudyDirection.MINIMIZE
    ]
    with pytest.raises(GlintError, match="hydra.sweeper.pruner=median needs a study the trials can reach"):
        StudySweep(study_name="s", storage=None, pruner="median").open_study()


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (
            ["hparams_search=optuna"],
            "hydra.sweeper._target_",
            "hydra_plugins.glint_optuna_sweeper.GlintOptunaSweeper",
        ),
        (["hparams_search=optuna"], "hydra.sweeper.storage", "outputs/optuna/glint.db"),
        (["hparams_search=optuna", "hydra.sweeper.study_name=lr"], "hydra.sweeper.storage", "outputs/optuna/lr.db"),
        (["hparams_search=optuna"], "hydra.sweeper.params.optimizer.lr", "tag(log, interval(1e-4, 1e-2))"),
        (["hparams_search=optuna"], "hydra.sweeper.direction", "maximize"),
        (["hparams_search=optuna"], "hydra.sweeper.pruner", "none"),
        (["hparams_search=optuna", "seed=7"], "hydra.sweeper.sampler.seed", 7),
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


# --- the sweeper on a tiny task app --------------------------------------------------------------------------------


def _wait_for(condition, *procs: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs) or time.monotonic() > end:
            for p in procs:
                p.kill()
            pytest.fail("a launch ended or stalled: " + " / ".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.05)


def test_a_sweep_killed_in_its_second_trial_ends_with_all_its_trials_complete_on_relaunch(tmp_path):
    sweep = TaskSweep(tmp_path, n_trials=3)
    (sweep.out / "hold_1").touch()  # trial 1 waits: the launch is killed in it
    proc = sweep.popen()
    _wait_for(lambda: sweep.started(1), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweeper and its trial, as a crash or an OOM kill would
    proc.communicate()
    (sweep.out / "hold_1").unlink()
    assert [t.state for t in sweep.trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    first = sweep.trials()[0]

    log = sweep.run()
    assert "Trial 1 was left running by a launch that stopped: marked failed, its parameters run again" in log
    trials = sweep.trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], log[-3000:]
    assert trials[1].user_attrs[CUT_SHORT_ATTR] and CUT_SHORT_ATTR not in trials[2].user_attrs
    assert trials[2].params == trials[1].params, "the cut-short trial's parameters ran again"
    assert trials[3].params != first.params, "the relaunch's sampler does not repeat the first draws"
    assert (trials[0].params, trials[0].value) == (first.params, first.value), "the first trial is kept as it was"
    assert len({t.user_attrs[LAUNCH_ATTR] for t in trials}) == 2

    sweeps = sorted((tmp_path / "multirun").iterdir())
    assert [sorted(p.name for p in s.iterdir() if p.is_dir()) for s in sweeps] == [["0", "1"], ["2", "3"]]
    rows = _report_rows(sweeps[0])
    assert {job: status for job, status, _ in rows} == {
        "0": "done",
        "1": "failed (cut short, ran again)",
        "2": "done",
        "3": "done",
    }
    values = {str(t.number): pytest.approx(t.value, abs=1e-4) for t in trials if t.value is not None}
    assert {job: float(v) for job, _, v in rows if v} == values, "the value each trial told the study"
    assert sweep.run().count("0 to run") == 1, "n_trials reached: a third launch runs nothing"
    assert len(sweep.trials()) == 4


def _report_rows(sweep_dir: Path) -> list[tuple[str, str, str]]:
    """(job, status, value) of each row of glint-report's table for the task app's study (metric: val/iou)."""
    pointer = yaml.safe_load((sweep_dir / STUDY_POINTER).read_text())
    pointer["optimized_metric"] = "val/iou"
    (sweep_dir / STUDY_POINTER).write_text(yaml.safe_dump(pointer))
    lines = write_report(sweep_dir)["md"].read_text().splitlines()
    cells = [
        [c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ") and "job" not in line
    ]
    return [(c[0], c[2], c[3]) for c in cells]


def test_a_trial_that_fails_by_itself_counts_and_is_not_run_again(tmp_path):
    sweep = TaskSweep(tmp_path, n_trials=3, fail_above=0.6)
    log = sweep.run()
    trials = sweep.trials()
    assert len(trials) == 3, "failed trials count toward n_trials"
    assert [t.state for t in trials] == [
        TrialState.FAIL if t.params["x"] > 0.6 else TrialState.COMPLETE for t in trials
    ]
    assert TrialState.FAIL in {t.state for t in trials} and "ValueError: x=" in log
    assert not any(t.user_attrs.get(CUT_SHORT_ATTR) for t in trials)


def test_a_batch_of_trials_runs_in_parallel_through_the_configured_launcher(tmp_path):
    sweep = TaskSweep(tmp_path, n_trials=4)
    log = sweep.run("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")
    assert "Joblib.Parallel(n_jobs=2" in log
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs["hydra_job_num"] for t in trials] == [0, 1, 2, 3], "job folders numbered by trial"
    pids = {path.name.split("_")[2] for path in sweep.out.glob("started_*")}
    assert len(pids) == 2, "two worker processes ran the 4 trials, in batches of 2"


def test_two_launches_at_once_share_one_study_and_stop_together_at_n_trials(tmp_path):
    sweep = TaskSweep(tmp_path, n_trials=4)
    for job in (0, 1):
        (sweep.out / f"hold_{job}").touch()
    first = sweep.popen()
    _wait_for(lambda: sweep.started(0), first)
    second = sweep.popen()  # opens the study while the first launch's trial 0 runs
    _wait_for(lambda: sweep.started(1), first, second)
    running = sweep.trials()
    assert [t.state for t in running] == [TrialState.RUNNING, TrialState.RUNNING], "the second does not fail trial 0"
    assert running[0].user_attrs[LAUNCH_ATTR] != running[1].user_attrs[LAUNCH_ATTR]
    for job in (0, 1):
        (sweep.out / f"hold_{job}").unlink()
    logs = [p.communicate(timeout=240)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], logs

    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, "together: n_trials=4, none failed"
    assert [len(sweep.started(t.number)) for t in trials] == [1, 1, 1, 1], "each trial ran once"
    assert len({t.user_attrs[LAUNCH_ATTR] for t in trials}) == 2
    assert len({t.params["x"] for t in trials}) == 4, "the two seeded samplers do not draw the same values"


# --- real trainings ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_optuna_sweep_trains_prunes_and_reports_every_trial(tmp_path, cache_dir):
    params = 'hydra.sweeper.params={optimizer.lr: "tag(log, interval(1e-3, 1e-2))"}'
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", params, *ALWAYS_PRUNE, *TINY, "test=false"]
    res = run_cli("glint_lightning.train", *args, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="glint", storage=f"sqlite:///{tmp_path}/outputs/optuna/glint.db")
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    sweep = next((tmp_path / "outputs/multirun").glob("*/*"))
    for trial in study.trials:
        summary = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert summary["pruned_at_epoch"] == 0 and summary["epochs"] == 1, "stopped after its first epoch of 2"
        assert trial.intermediate_values == {0: pytest.approx(summary["final"]["val/iou"], abs=1e-6)}
        assert trial.value == trial.intermediate_values[0], "recorded PRUNED with its last value"
    table = write_report(sweep)["md"].read_text()
    assert table.count("| pruned |") == 2 and "callbacks.optuna_pruning" not in table
    assert "optimizer.lr=" in table


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


@pytest.mark.slow
def test_an_optuna_trial_trains_with_ddp_and_both_ranks_stop_when_pruned(tmp_path, cache_dir):
    ddp = [a for a in TINY if not a.startswith(("trainer.devices", "trainer.accelerator"))]
    ddp += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "test=false"]
    params = 'hydra.sweeper.params={optimizer.lr: "interval(1e-3, 1e-2)"}'
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=1", params, *ALWAYS_PRUNE, *ddp]
    res = run_cli("glint_lightning.train", *args, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)}, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]  # a rank that did not stop would hang the other one
    study = optuna.load_study(study_name="glint", storage=f"sqlite:///{tmp_path}/outputs/optuna/glint.db")
    assert [t.state for t in study.trials] == [TrialState.PRUNED], "rank 1 ran the trial, not the sweep again"
    (job,) = (tmp_path / "outputs/multirun").glob("*/*/0")
    summary = json.loads((job / "metrics.json").read_text())
    assert (summary["pruned_at_epoch"], summary["epochs"]) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["multirun", "optuna"], "no stray run dir"
