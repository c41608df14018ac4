"""SIGTERM and Ctrl-C end a run with a resumable `last.ckpt` instead of losing the epoch in progress.

Pre-emption, `kill`, SLURM's time limit and `timeout` send SIGTERM. Lightning already turns it into
`SIGTERMException` at the next batch boundary, where model, optimizer and loop state agree, and calls
`on_exception`; this callback saves the checkpoint there. Ctrl-C is routed the same way (a KeyboardInterrupt
could land in the middle of an optimizer step); a second Ctrl-C aborts at once. SLURM's time-limit
signals (USR1, USR2) come here too, through glint_lightning.runs.slurm, which then requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from glint_lightning.callbacks.last_checkpoint import at_last_batch


class CheckpointOnInterrupt(L.Callback):
    """Save `dirpath/filename` when the run is stopped by SIGTERM or Ctrl-C; `signal_name` tells which.

    Not during an epoch's last batch or its validation: Lightning miscounts epochs when resuming from there, so the
    previous last.ckpt stays (at most one epoch, or N steps with step checkpoints, is redone).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signal_name: str | None = None
        self.saved = False
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: Lightning snapshots and later restores every handler after that hook.
        self.signal_name, self.saved = None, False
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # e.g. under nohup: leave it so
        if threading.current_thread() is threading.main_thread() and not ignored:
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_as_sigterm)

    def _sigint_as_sigterm(self, signum: int, frame: Any) -> None:
        self.signal_name = "Ctrl-C"
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts without saving
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        self.signal_name = self.signal_name or "SIGTERM"
        if at_last_batch(trainer):  # Lightning cannot resume from here; see LastCheckpoint
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = True
        rank_zero_info(
            f"{self.signal_name}: saved a resumable checkpoint at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step}: {self.path}"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()
