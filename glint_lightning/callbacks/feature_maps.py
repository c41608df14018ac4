"""Log activation maps of chosen layers (forward hooks) for the first validation tile every N epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.hooks import RemovableHandle
from torchvision.utils import make_grid

from glint_lightning.models.common import model_part


def _last_tensor(output: Any) -> torch.Tensor:
    """A layer's output as one tensor: the last of a list (an encoder's stages) or `out` of a dict."""
    if isinstance(output, dict):
        output = output.get("out", next(iter(output.values())))
    if isinstance(output, list | tuple):
        output = output[-1]
    return output


class FeatureMaps(L.Callback):
    """For each layer name (e.g. `backbone`, `aspp`, `decoder`), a grid of its first `max_channels` channels."""

    def __init__(self, layers: Sequence[str], every_n_epochs: int = 5, max_channels: int = 16) -> None:
        self.layers, self.every_n_epochs, self.max_channels = list(layers), every_n_epochs, max_channels
        self._handles: list[RemovableHandle] = []
        self._maps: dict[str, torch.Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in self.layers:  # fail at start-up, not after the first epoch
            model_part(pl_module.model, name, "callbacks.feature_maps.layers")

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return self.every_n_epochs > 0 and not trainer.sanity_checking and epoch % self.every_n_epochs == 0

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if batch_idx != 0 or not self._due(trainer) or not trainer.is_global_zero:
            return
        for name in self.layers:

            def keep(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
                self._maps[name] = _last_tensor(output)[0, : self.max_channels].detach().float().cpu()

            self._handles.append(model_part(pl_module.model, name, "layers").register_forward_hook(keep))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, maps in self._maps.items():
            lo = maps.amin(dim=(-2, -1), keepdim=True)
            hi = maps.amax(dim=(-2, -1), keepdim=True)
            grid = make_grid(((maps - lo) / (hi - lo).clamp_min(1e-6))[:, None], nrow=8, padding=1, pad_value=1.0)
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"features/{name}", grid, global_step=trainer.global_step)
        self._maps = {}
