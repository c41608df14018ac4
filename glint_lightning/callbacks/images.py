"""Log a grid of depth / target / predicted probability for a few validation tiles every N epochs, and at the end.

The end: a run that stops on an epoch that is not a multiple of N (one shorter than N epochs, early stopping,
max_steps) logs the grid of its last validation when training ends, so every run shows at least one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchvision.utils import make_grid


def _depth_to_unit(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each tile's valid depth stretched to [0, 1]; invalid pixels black."""
    out = torch.zeros_like(depth)
    for i in range(depth.shape[0]):
        v = depth[i][valid[i]]
        if v.numel():
            lo, hi = v.min(), v.max()
            out[i] = torch.where(valid[i], (depth[i] - lo) / (hi - lo).clamp_min(1e-6), 0.0)
    return out


class PredictionImages(L.Callback):
    """Rows of depth, target and prediction for the first `max_images` tiles of the first validation batch."""

    def __init__(self, every_n_epochs: int = 5, max_images: int = 8) -> None:
        self.every_n_epochs, self.max_images = every_n_epochs, max_images
        self._pending: tuple[torch.Tensor, int] | None = None  # the last validation's grid, when it was not due

    def _due(self, trainer: L.Trainer) -> bool:
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _grid(self, outputs: Any, batch: Any) -> torch.Tensor:
        k = self.max_images
        depth, valid = batch["depth"][:k].float().cpu(), batch["valid"][:k].cpu()
        rows = [
            _depth_to_unit(depth, valid),
            batch["mask"][:k].float().cpu(),
            outputs["logits"][:k].float().sigmoid().cpu(),
        ]
        return make_grid(torch.cat(rows), nrow=depth.shape[0], padding=2, pad_value=0.5)

    @staticmethod
    def _log(trainer: L.Trainer, grid: torch.Tensor, step: int) -> None:
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val/predictions", grid, global_step=step)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        *_: Any,
    ) -> None:
        if batch_idx != 0 or self.every_n_epochs <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        grid = self._grid(outputs, batch)
        if self._due(trainer):
            self._log(trainer, grid, trainer.global_step)
            self._pending = None
        else:
            self._pending = (grid, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            self._log(trainer, *self._pending)
            self._pending = None
