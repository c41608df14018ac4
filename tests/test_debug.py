"""`debug=<option>`: short runs that check the pipeline, each a real (tiny) training end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glint_lightning.train import main as train_main
from glint_lightning.train import train
from tests.helpers import TINY

# TINY minus its epoch count: each debug option sets its own.
SMALL = [a for a in TINY if not a.startswith("trainer.max_epochs")]


def _run(run_main, debug: str, tmp_path: Path, cache_dir: Path, *extra: str) -> tuple[Path, dict]:
    """The command line through the console script's main() (test_cli runs it in a subprocess)."""
    code, stdout, stderr = run_main(
        train_main, f"debug={debug}", *SMALL, *extra, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)}
    )
    assert code == 0, stderr[-3000:]
    (run,) = (p.parent for p in tmp_path.glob("outputs/debug/*/*/metrics.json"))  # apart from real runs
    return run, {"stdout": stdout, "stderr": stderr, **json.loads((run / "metrics.json").read_text())}


def test_debug_options_compose_deterministic_cpu_runs(make_cfg):
    for option in ("default", "fdr", "overfit", "profiler"):
        cfg = make_cfg(f"debug={option}", "trainer=gpu")
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.deterministic and cfg.trainer.devices == 1
        assert cfg.trainer.precision == "32-true" and cfg.data.num_workers == 0
    assert make_cfg("debug=fdr").trainer.fast_dev_run is True
    assert make_cfg("debug=overfit").trainer.overfit_batches > 0
    assert make_cfg("debug=profiler").trainer.profiler.dirpath.endswith("/run")


def test_unknown_debug_option_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """The console script's own main() in this process (test_cli runs the command line in a subprocess)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["glint-train", "debug=fast_dev_run"])
    with pytest.raises(SystemExit) as exit_:
        train_main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "debug/fast_dev_run" in err and "fdr" in err, err
    assert list(tmp_path.iterdir()) == [], "a refused command line leaves nothing behind"


@pytest.mark.slow
def test_debug_default_is_one_short_epoch_with_checkpoints_apart_from_real_runs(tmp_path, cache_dir, run_main):
    """The command line: the run lands under outputs/debug/, where ckpt_path=last of real runs does not look; the
    other options are checked through train() below."""
    run, out = _run(run_main, "default", tmp_path, cache_dir)
    assert run.parent.parent == tmp_path / "outputs" / "debug"
    assert out["epochs"] == 1 and out["global_step"] == 4, "limit_train_batches=4 of the 6 batches"
    assert (run / "checkpoints" / "last.ckpt").is_file() and out["best_checkpoint"]
    scores = {k: v for k, v in out["test"].items() if k != "test/loss"}
    assert {"test/iou", "test/ap"} <= set(scores) and all(0 <= v <= 1 for v in scores.values()), out["test"]
    assert [line for line in out["stdout"].splitlines() if line.startswith("epoch ")][0].startswith("epoch 1/1  ")


def _train(make_cfg, capsys, option: str, *extra: str) -> tuple[Path, dict]:
    """train(debug=<option>) in this process (TINY's 2 epochs back to the option's 1 unless `extra` says)."""
    cfg = make_cfg(f"debug={option}", "trainer.max_epochs=1", *extra)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    return run, {"stdout": capsys.readouterr().out, **json.loads((run / "metrics.json").read_text())}


def test_debug_fdr_runs_one_batch_and_saves_no_checkpoints(make_cfg, capsys):
    run, out = _train(make_cfg, capsys, "fdr")
    assert out["global_step"] == 1
    assert not list(run.glob("checkpoints/*.ckpt")) and not out["best_checkpoint"] and not out["last_checkpoint"]
    assert "test/iou" in out["test"]
    assert "best checkpoint:  (" not in out["stdout"]


@pytest.mark.slow
def test_debug_overfit_trains_on_the_same_few_batches(make_cfg, capsys):
    run, out = _train(make_cfg, capsys, "overfit", "trainer.max_epochs=2", "test=false")
    assert out["epochs"] == 2 and out["global_step"] == 4, "2 batches an epoch"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    losses = [
        float(line.split("train/loss=")[1].split()[0]) for line in out["stdout"].splitlines() if "train/loss=" in line
    ]
    assert len(losses) == 2 and losses[1] < losses[0], out["stdout"]


@pytest.mark.slow
def test_debug_profiler_writes_its_report_into_the_run_dir(make_cfg, capsys):
    run, _ = _train(make_cfg, capsys, "profiler", "test=false")
    report = (run / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Mean duration" in report
