"""Optuna sweeps, launchers and experiment configs."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from glint_lightning.config_dir import CONFIG_DIR
from glint_lightning.report import write_report
from tests.conftest import TINY, run_cli

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

    out = write_report(sweep)
    table = out["md"].read_text()
    assert table.index("| 2 |") < table.index("| 0 |"), "the finished trial first, failed ones after"
    assert table.count("failed or unfinished") == 2


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
            "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        ),
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
        (["+experiment=loss_comparison"], "hydra.sweeper.params.loss", "focal,bce,dice,tversky,hybrid"),
        (["+experiment=model_comparison"], "hydra.sweeper.params.model", "unet,deeplabv3plus,fcn"),
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
