"""`glint-report`: a Hydra app over conf/report.yaml, one table for a sweep or for every trial of an Optuna study."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import optuna
import pytest
import yaml

from glint_lightning.report import write_report
from glint_lightning.runs.optuna_sweep import FIXED_ATTR, JOB_NUM_ATTR, SWEEP_DIR_ATTR
from glint_lightning.utils.optuna_storage import STUDY_POINTER, open_storage
from tests.helpers import run_cli


def _job(sweep: Path, name: str, overrides: list[str], best: float | None = None) -> Path:
    """A job folder as train leaves it: its overrides, and metrics.json when it finished."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if best is not None:
        summary = {
            "optimized_metric": "val/iou",
            "best_score": best,
            "final": {"val/iou": best - 0.01, "val/f1": 0.6},
            "epochs": 1,
            "duration_s": 3.0,
            "best_checkpoint": str(job / "checkpoints" / "best.ckpt"),
        }
        (job / "metrics.json").write_text(json.dumps(summary))
    return job


def _sweep(root: Path) -> Path:
    sweep = root / "outputs" / "multirun" / "2026-11-24" / "10-00-00-000000"
    _job(sweep, "0", ["loss=bce", "seed=1"], best=0.4)
    _job(sweep, "1", ["loss=dice", "seed=1"], best=0.5)
    _job(sweep, "2", ["loss=focal", "seed=1"])
    return sweep


def _leftovers(cwd: Path, *expected: str) -> list[str]:
    return sorted(p.name for p in cwd.iterdir() if p.name not in expected)


@pytest.mark.slow
def test_report_writes_the_table_into_the_sweep_folder_and_nothing_else(tmp_path):
    sweep = _sweep(tmp_path)
    res = run_cli("glint_lightning.report", "dir=outputs/multirun/2026-11-24/10-00-00-000000", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| job | overrides | status | val/iou |" in res.stdout
    assert "Overrides common to all 3 jobs: `seed=1`" in res.stdout
    with open(sweep / "report.csv") as f:
        rows = [(r["job"], r["status"], r["val/iou"]) for r in csv.DictReader(f)]
    assert rows == [("1", "done", "0.5"), ("0", "done", "0.4"), ("2", "failed or unfinished", "")]
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert _leftovers(tmp_path, "outputs") == [], "no run folder, .hydra or log file in the working directory"

    other = tmp_path / "outputs" / "multirun" / "2026-11-25" / "09-00-00-000000"
    _job(other, "0", ["loss=hybrid"], best=0.3)
    res = run_cli("glint_lightning.report", "-m", f"dir={sweep},{other}", "metric=val/f1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (other / "report.md").is_file() and "Sorted by val/f1" in (sweep / "report.md").read_text()
    assert _leftovers(tmp_path, "outputs") == [], "a multirun keeps Hydra's bookkeeping out of the cwd"


BAD_OPTIONS = {  # arguments: what the one line says
    ("dri=x",): "error: Could not override 'dri'",
    (): "error: report: pass the sweep folder, e.g. dir=",
    ("dir=nowhere",): "error: dir=nowhere: no such folder",
    ("dir=.", "metric=val/iuo"): "error: dir=.: no job folders",
}
CFG_JOB = ("--cfg", "job", "dir=some/sweep")


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], tuple[CompletedProcess, Path]]:
    """glint-report's answer to each of BAD_OPTIONS and to CFG_JOB, each run from an empty folder of its own, a few
    processes at a time (each is mostly its imports); with that folder."""

    def answer(args: tuple[str, ...]) -> tuple[CompletedProcess, Path]:
        cwd = tmp_path_factory.mktemp("report")
        return run_cli("glint_lightning.report", *args, cwd=cwd), cwd

    cases = [*BAD_OPTIONS, CFG_JOB]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(cases, pool.map(answer, cases)))


@pytest.mark.slow
@pytest.mark.parametrize("args", BAD_OPTIONS)
def test_bad_options_get_one_line_and_exit_2(args, answers):
    res, cwd = answers[args]
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr[-3000:]
    assert res.stderr.startswith(BAD_OPTIONS[args])
    assert _leftovers(cwd) == []


@pytest.mark.slow
def test_cfg_job_prints_the_options(answers):
    res, _ = answers[CFG_JOB]
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load(res.stdout) == {"dir": "some/sweep", "metric": None}


@pytest.mark.parametrize("storage", ["s.db", "s.log"])  # SQLite, journal file: read with optuna.load_study
def test_a_sweep_folder_of_a_study_reports_every_trial_of_every_launch(tmp_path, storage):
    """Launch 1 ran trial 0 (done) and was killed in trial 1; launch 2 ran trial 2, whose job folder is gone since,
    and trial 3, pruned; trial 4 is still running. Any sweep folder of the study gives the same table."""
    first, second = tmp_path / "multirun" / "a", tmp_path / "multirun" / "b"
    _job(first, "0", ["optimizer.lr=0.001", "seed=1"], best=0.4)
    _job(first, "1", ["optimizer.lr=0.002", "seed=1"])
    _job(second, "3", ["optimizer.lr=0.005", "seed=1", "+callbacks.optuna_pruning.trial=3"], best=0.2)
    url = str(tmp_path / "optuna" / storage)
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    launches = [(first, 0.001, "COMPLETE", 0.4), (first, 0.002, "FAIL", None), (second, 0.003, "COMPLETE", 0.45)]
    launches += [(second, 0.005, "PRUNED", 0.2), (second, 0.004, "RUNNING", None)]
    for number, (sweep, lr, state, value) in enumerate(launches):
        study.enqueue_trial({"optimizer.lr": lr})
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
        trial.set_user_attr(FIXED_ATTR, ["seed=1"])  # as the sweeper records a trial
        trial.set_user_attr(SWEEP_DIR_ATTR, str(sweep))
        trial.set_user_attr(JOB_NUM_ATTR, number)
        if state == "PRUNED":
            trial.report(value, step=0)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif state != "RUNNING":
            study.tell(trial, value, state=optuna.trial.TrialState[state])
    for sweep in (first, second):
        sweep.mkdir(parents=True, exist_ok=True)
        pointer = {"storage": url, "study_name": "s", "optimized_metric": "val/iou"}
        (sweep / STUDY_POINTER).write_text(yaml.safe_dump(pointer))

    tables = [write_report(sweep)["md"].read_text() for sweep in (first, second)]
    assert tables[0] == tables[1] and tables[1].startswith(f"# Optuna study s ({url})")
    with open(second / "report.csv") as f:
        rows = [(r["job"], r["overrides"], r["status"], r["val/iou"]) for r in csv.DictReader(f)]
    assert rows == [
        ("2", "optimizer.lr=0.003", "done", "0.45"),  # the value the study recorded (no run data left)
        ("0", "optimizer.lr=0.001", "done", "0.4"),  # best_score from its metrics.json
        ("3", "optimizer.lr=0.005", "pruned", "0.2"),  # the pruning callback's wiring is no parameter
        ("1", "optimizer.lr=0.002", "failed", ""),
        ("4", "optimizer.lr=0.004", "running", ""),
    ]
    assert f"5 trials, launched in 2 sweep folder(s): {first}, {second}" in tables[1]
    assert "Overrides common to all 5 jobs: `seed=1`" in tables[1]


def test_a_study_whose_storage_file_is_gone_is_reported_as_its_jobs(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    pointer = {"storage": str(tmp_path / "gone.db"), "study_name": "s", "optimized_metric": "val/iou"}
    (sweep / STUDY_POINTER).write_text(yaml.safe_dump(pointer))
    table = write_report(sweep)["md"].read_text()
    assert table.startswith(f"# Sweep {sweep}") and table.count("| done |") == 2
    assert f"{tmp_path / 'gone.db'}: no such study file" in capsys.readouterr().err
    assert not (tmp_path / "gone.db").exists(), "reporting creates no database"
