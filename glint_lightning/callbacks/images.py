"""Log a grid of depth / target / predicted probability for a few validation tiles every N epochs."""

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

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            self.every_n_epochs > 0
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        *_: Any,
    ) -> None:
        if batch_idx != 0 or not self._due(trainer) or not trainer.is_global_zero:
            return
        k = self.max_images
        depth, valid = batch["depth"][:k].float().cpu(), batch["valid"][:k].cpu()
        rows = [
            _depth_to_unit(depth, valid),
            batch["mask"][:k].float().cpu(),
            outputs["logits"][:k].sigmoid().cpu(),
        ]
        grid = make_grid(torch.cat(rows), nrow=depth.shape[0], padding=2, pad_value=0.5)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val/predictions", grid, global_step=trainer.global_step)
