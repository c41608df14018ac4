"""`python -m glint_lightning.train ...` as a user runs it: a first run, a sweep and one bad input in a subprocess;
the resume, the sweep's report, the other bad inputs and the --cfg / unknown-option checks through the console
scripts' main() in this process (the same command lines, without a subprocess's imports)."""

import csv
import json

import pytest
import yaml

from glint_lightning.report import main as report_main
from glint_lightning.train import main
from tests.helpers import TINY, run_cli

FAST = [
    *TINY,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "test=false",
    "callbacks.prediction_images.every_n_epochs=1",
]
FAST_H5 = [arg for arg in FAST if not arg.startswith("data.demo.")]  # data=h5 has no demo block


@pytest.fixture
def env(cache_dir):
    return {"GLINT_CACHE_DIR": str(cache_dir)}


def test_multirun_sweep_runs_each_job_in_its_own_dir(tmp_path, env, run_main):
    res = run_cli("glint_lightning.train", "-m", "loss=focal,bce,hybrid", *FAST, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "outputs" / "multirun").glob("*/*/*") if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    losses = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((job / "metrics.json").read_text())["best_score"] is not None
        losses.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["loss"]["_target_"])
    assert losses == [f"glint_lightning.losses.{n}" for n in ("FocalLoss", "BCELoss", "HybridLoss")]

    sweep = jobs[0].parent
    code, stdout, stderr = run_main(report_main, f"dir={sweep}", cwd=tmp_path, env=env)  # test_report: subprocesses
    assert code == 0, stderr[-3000:]
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["overrides"] for r in rows) == ["loss=bce", "loss=focal", "loss=hybrid"]
    scores = [float(r["val/iou"]) for r in rows]
    assert scores == sorted(scores, reverse=True), "best first"
    best = json.loads((sweep / rows[0]["job"] / "metrics.json").read_text())
    assert scores[0] == pytest.approx(best["best_score"]) and rows[0]["best_checkpoint"] == best["best_checkpoint"]
    assert "| job | overrides | status | val/iou |" in stdout
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG" and (sweep / "report.md").is_file()


def test_single_run_prints_where_things_went_and_resumes_in_place(tmp_path, env, run_main):
    res = run_cli("glint_lightning.train", *FAST, "hydra.run.dir=outputs/exp1", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "exp1"
    for line in (
        f"run dir:         {run}",
        f"best checkpoint: {run}/checkpoints/best-epoch000.ckpt",
        f"last checkpoint: {run}/checkpoints/last.ckpt",
        "final val:       val/ap=",
    ):
        assert line in res.stdout
    assert list((run / "tensorboard").glob("events.*"))
    # the resume in this process (the same command line; the subprocess above is the user's first run)
    code, _, stderr = run_main(
        main, *FAST, "trainer.max_epochs=2", "hydra.run.dir=outputs/exp1", "ckpt_path=last", cwd=tmp_path, env=env
    )
    assert code == 0, stderr[-3000:]
    assert f"resuming this run in place from {run}/checkpoints/last.ckpt" in stderr, "logged to the console"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(
    "args, message, in_subprocess",
    [
        (["data=h5", "data.train_path=missing.h5"], "error: missing.h5: no such file", True),
        (["data=h5", "data.train_path=bad.h5"], "error: bad.h5: cannot be read as HDF5", False),
        (["ckpt_path=/nowhere/x.ckpt"], "error: ckpt_path=/nowhere/x.ckpt: no such file", False),
        (["ckpt_path=bad.h5"], "error: bad.h5: not a loadable checkpoint", False),
        (["optimizer.lr=-1"], "error: optimizer.lr=-1", False),
        (["hydra.run.dir=bad.h5/run"], "error: hydra.run.dir=bad.h5/run: ", False),
    ],
)
def test_bad_input_exits_nonzero_with_one_line_and_keeps_earlier_checkpoints(
    tmp_path, env, run_main, args, message, in_subprocess
):
    (tmp_path / "bad.h5").write_text("not a tile file")
    run = tmp_path / "outputs" / "exp1" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"earlier run")
    argv = [*FAST_H5, "hydra.run.dir=outputs/exp1", *args]
    if in_subprocess:
        res = run_cli("glint_lightning.train", *argv, cwd=tmp_path, env=env)
        code, stderr = res.returncode, res.stderr
    else:
        code, _, stderr = run_main(main, *argv, cwd=tmp_path, env=env)
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), stderr[-2000:]
    assert "Traceback" not in stderr
    assert (run / "last.ckpt").read_bytes() == b"earlier run"
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt"]


def test_unknown_config_option_is_refused_by_hydra(tmp_path, env, run_main):
    code, _, stderr = run_main(main, "model=resnet_unet", cwd=tmp_path, env=env)
    assert code != 0
    assert "Could not find 'model/resnet_unet'" in stderr and "unet" in stderr


def test_cfg_job_prints_the_composed_config(tmp_path, env, run_main):
    code, stdout, stderr = run_main(main, "loss=focal", "--cfg", "job", cwd=tmp_path, env=env)
    assert code == 0, stderr
    cfg = yaml.safe_load(stdout)
    assert cfg["loss"]["_target_"] == "glint_lightning.losses.FocalLoss"
    assert {"data", "model", "optimizer", "scheduler", "callbacks", "trainer", "logger"} <= set(cfg)
