"""last.ckpt: the newest state, written at every epoch's end and optionally every N optimizer steps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def at_last_batch(trainer: L.Trainer) -> bool:
    """Whether the epoch's last training batch has just run (its validation and epoch-end save come next)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (configured with `filename: last`, no monitor), minus a step save at an epoch's
    last batch.

    The epoch-end save follows that batch at once, and Lightning (2.6) miscounts epochs when it resumes from a
    checkpoint taken between an epoch's last batch and its end (that epoch's validation is skipped, and after a
    second such resume one epoch too many is trained). Its own class also keeps its checkpointed state apart from
    the other ModelCheckpoints'.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if not at_last_batch(trainer):
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
