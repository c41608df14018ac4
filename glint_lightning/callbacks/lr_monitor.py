"""Lightning's LearningRateMonitor, logging each epoch's learning rates after every `on_train_epoch_start` hook.

Lightning's monitor reads the optimizer in its own `on_train_epoch_start`, which runs before those of callbacks
listed after it, such as FreezeParts (a LightningModule's callbacks come last): the param groups a fine-tuning
callback adds when it unfreezes a part would show up only an epoch later, or never when that is the last epoch. This
one reads them at the epoch's first training batch instead, at the same step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningMonitor


class LearningRateMonitor(_LightningMonitor):
    """LearningRateMonitor whose per-epoch values include the param groups added at that epoch's start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_pending = False

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._epoch_pending = True  # every callback's epoch-start hook runs before the first batch

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._epoch_pending:
            self._epoch_pending = False
            super().on_train_epoch_start(trainer, *args, **kwargs)  # step: still the epoch's first one
        super().on_train_batch_start(trainer, *args, **kwargs)
