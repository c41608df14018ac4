"""Whether checkpoints carry optimizer state (the old `--no_save_optimizer`), and resuming from ones that don't.

Adam's state is twice the size of the weights, so dropping it cuts a checkpoint to about a third. Lightning
refuses to resume from such a file ("checkpoint contains only the model"); this callback fills in the state of
the freshly configured optimizer and schedulers instead, so the run continues with the stored weights, epoch,
global step and best-score tracking, at the configured learning rate, with one warning.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

OPTIMIZER_KEYS = ("optimizer_states", "lr_schedulers")


class OptimizerStateCallback(L.Callback):
    """`save=False` drops optimizer and LR-scheduler state from every checkpoint this run writes."""

    def __init__(self, save: bool = True) -> None:
        self.save = save
        self._partial_checkpoint: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.save:
            for key in OPTIMIZER_KEYS:
                checkpoint.pop(key, None)
        checkpoint["has_optimizer_state"] = self.save

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit" or "optimizer_states" in checkpoint:
            return
        rank_zero_warn(
            "The checkpoint has no optimizer state (saved with callbacks.optimizer_state.save=false): restoring "
            "weights, epoch, global step and best scores; the optimizer starts fresh (no moments) and the LR "
            "schedule continues at the resumed epoch."
        )
        self._partial_checkpoint = checkpoint
        if trainer.optimizers:  # strategies that restore after setup already have their optimizers
            self._fill_fresh_state(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the optimizers exist and before Lightning restores their state from the checkpoint.
        if self._partial_checkpoint is not None:
            self._fill_fresh_state(trainer)

    def _fill_fresh_state(self, trainer: L.Trainer) -> None:
        checkpoint, self._partial_checkpoint = self._partial_checkpoint, None
        checkpoint["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
        checkpoint["lr_schedulers"] = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
