"""What a training run prints: one line per epoch off a terminal, a Rich bar on one, no Lightning noise, a model
summary without a FLOPs column of zeros, and the run's log lines in <run dir>/train.log."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from glint_lightning.callbacks import progress
from glint_lightning.callbacks.progress import EpochLines, RichProgress, console_progress
from glint_lightning.callbacks.summary import format_summary
from glint_lightning.train import train
from tests.helpers import TINY, run_cli

# TINY without what this file checks: the default progress setting and Lightning's own model summary switch.
PLAIN = [a for a in TINY if not a.startswith(("callbacks.progress.", "+trainer.enable_model_summary"))]


class Terminal(io.StringIO):
    """stdout as a terminal (isatty)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Two epochs with stdout and stderr piped (not a terminal), as under SLURM or CI."""
    cwd = tmp_path_factory.mktemp("piped")
    res = run_cli("glint_lightning.train", *PLAIN, "test=false", cwd=cwd, env={"GLINT_CACHE_DIR": str(cache_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (p.parent for p in (cwd / "outputs").glob("*/*/metrics.json"))
    return res, run


@pytest.mark.slow
def test_piped_output_has_one_line_per_epoch_and_no_carriage_returns(piped_run):
    res, _ = piped_run
    assert "\r" not in res.stdout and "\r" not in res.stderr
    epochs = [line for line in res.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], res.stdout
    for line in epochs:
        fields = line.split("  ")
        assert [f.split("=")[0] for f in fields[1:-1]] == ["train/loss", "val/loss", "val/iou"], line
        assert all(0 <= float(f.split("=")[1]) < 10 for f in fields[1:-1]) and fields[-1].endswith(" s"), line


@pytest.mark.slow
def test_no_lightning_tips_or_deprecation_noise(piped_run):
    res, _ = piped_run
    for noise in ("litlogger", "LeafSpec", "Skipping setting a default", "INFO:"):
        assert noise not in res.stderr and noise not in res.stdout, noise
    assert "GPU available:" in res.stderr, "Lightning's real log lines stay"
    assert res.stderr.count("Seed set to 0") == 1, "each line once"


@pytest.mark.slow
def test_model_summary_has_parameters_and_no_flops(piped_run):
    res, _ = piped_run
    header = next(line for line in res.stderr.splitlines() if "| Name" in line)
    assert "Params" in header and "FLOPs" not in header
    assert "Total params" in res.stderr and "flop" not in res.stderr.lower()


@pytest.mark.slow
def test_train_log_holds_the_runs_log_lines(piped_run):
    _, run = piped_run
    log = (run / "train.log").read_text()
    for text in ("[INFO] - Seed set to 0", "GPU available:", "Total params", "epoch 1/2  train/loss=", "epoch 2/2"):
        assert text in log, text
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in log
    assert not (run / "cli.log").exists()


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a pipe or a file: isatty() is False
    assert isinstance(console_progress(refresh_rate=10), EpochLines)
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(console_progress(refresh_rate=10), RichProgress)
    assert isinstance(console_progress(refresh_rate=0), EpochLines), "refresh_rate=0: no per-step output"
    monkeypatch.setattr(progress, "RICH", False)  # `rich` not installed: tqdm's bar
    assert type(console_progress(refresh_rate=10)) is TQDMProgressBar


def test_rich_bar_shows_the_chosen_metrics_and_logs_each_epoch(make_cfg, monkeypatch, caplog):
    """On a terminal: the live bar (only the configured metrics next to it), and each epoch's line for train.log."""
    shown = []
    real_get_metrics = RichProgress.get_metrics

    def spy(self, trainer, pl_module):
        metrics = real_get_metrics(self, trainer, pl_module)
        shown.append(set(metrics))
        return metrics

    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(RichProgress, "get_metrics", spy)
    caplog.set_level(logging.INFO, logger="glint_lightning.progress")
    train(
        make_cfg("trainer.max_epochs=1", "test=false", "calibrate_threshold=false", "callbacks.progress.refresh_rate=1")
    )
    assert shown and set().union(*shown) <= {"train/loss", "train/loss_step", "val/loss", "val/iou"}
    assert "train/loss_step" in set().union(*shown)
    lines = [r.getMessage() for r in caplog.records if r.name == "glint_lightning.progress"]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1  train/loss="), lines


def test_summary_table_leaves_flops_out():
    columns = [
        (" ", ["0", "1"]),
        ("Name", ["model", "loss_fn"]),
        ("Type", ["UNet", "HybridLoss"]),
        ("Params", ["7.5 K", "0"]),
        ("Mode", ["train", "train"]),
        ("FLOPs", ["0", "0"]),
    ]
    table = format_summary(columns, total_parameters=7500, trainable_parameters=7000, model_size=0.03)
    lines = table.splitlines()
    assert lines[0].split("|")[1:] == [" Name    ", " Type       ", " Params ", " Mode"]
    assert lines[2] == "0 | model   | UNet       | 7.5 K  | train"
    assert "FLOP" not in table
    assert "7.0 K     Trainable params" in lines and "500       Non-trainable params" in lines
