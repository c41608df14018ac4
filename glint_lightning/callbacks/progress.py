"""What training shows on the console: a live progress bar on a terminal, one line per epoch anywhere else.

Carriage-return progress bars turn log files (SLURM, CI, `nohup`, `| tee`) into megabytes of repeated lines, so
when stdout is not a terminal each epoch ends with one compact line instead:

    epoch 3/6  train/loss=0.2744  val/loss=0.3120  val/iou=0.7059  12.3 s

Either way the same line goes to the logger `glint_lightning.progress`, which the run's Hydra logging writes to
`<run dir>/train.log` only, so the log file has the run's history also when a bar was shown.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger("glint_lightning.progress")
RICH = importlib.util.find_spec("rich") is not None  # Lightning's optional bar


class _EpochRecord:
    """Times each training epoch and writes its one-line summary of the chosen metrics."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self.metrics = list(dict.fromkeys(metrics))  # in order, without repeats (optimized_metric may be listed)
        self._started = time.monotonic()
        self._validated = False

    def started(self) -> None:
        self._started, self._validated = time.monotonic(), False

    def validated(self, trainer: L.Trainer) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def line(self, trainer: L.Trainer) -> str:
        """`epoch N/M  name=value ...  S s`; validation metrics only in epochs that ran validation."""
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        parts = [f"epoch {epoch}/{total}" if total is not None and total > 0 else f"epoch {epoch}"]
        found = trainer.callback_metrics
        for name in self.metrics:
            if name.startswith("val/") and not self._validated:
                continue
            value = found.get(name, found.get(f"{name}_epoch"))  # logged on_step and on_epoch: the epoch mean
            if value is not None:
                value = float(value)
                parts.append(f"{name}={value:.4f}" if math.isfinite(value) else f"{name}={value}")
        parts.append(f"{time.monotonic() - self._started:.1f} s")
        return "  ".join(parts)


class EpochLines(ProgressBar):
    """One line per training epoch on stdout (and in train.log), nothing per step."""

    def __init__(self, metrics: Sequence[str] = ("train/loss", "val/loss", "val/iou")) -> None:
        super().__init__()
        self._record = _EpochRecord(metrics)
        self._enabled = True

    def disable(self) -> None:  # Lightning disables the bar on ranks other than 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record.started()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record.validated(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            line = self._record.line(trainer)
            print(line, flush=True)
            log.info(line)


class RichProgress(RichProgressBar):
    """Lightning's Rich progress bar, also writing each epoch's line to train.log."""

    def __init__(self, metrics: Sequence[str] = ("train/loss", "val/loss", "val/iou"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._record = _EpochRecord(metrics)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Only the chosen metrics next to the bar (the step's value of those logged per step), not all of them."""
        shown = {key for name in self._record.metrics for key in (name, f"{name}_step")}
        return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k in shown}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._record.started()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._record.validated(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.is_global_zero:
            log.info(self._record.line(trainer))


def console_progress(
    refresh_rate: int = 10,
    metrics: Sequence[str] = ("train/loss", "val/loss", "val/iou"),
    leave: bool = False,
) -> ProgressBar:
    """The progress callback for this console, chosen when the run starts.

    On a terminal (stdout is a TTY) and refresh_rate > 0: a live bar redrawn every `refresh_rate` batches (Rich's,
    or tqdm's where `rich` is missing). Otherwise, or with refresh_rate=0: one line per epoch with `metrics`.
    """
    if refresh_rate <= 0 or not sys.stdout.isatty():
        return EpochLines(metrics)
    if RICH:
        return RichProgress(metrics, refresh_rate=refresh_rate, leave=leave)
    return TQDMProgressBar(refresh_rate=refresh_rate, leave=leave)
