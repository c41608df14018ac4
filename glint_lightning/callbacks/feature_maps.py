"""Log activation maps of chosen layers (forward hooks) for the first validation tile every N epochs.

Every requested layer gives an image or an error. A container that is never called as a whole (a ModuleList such
as the U-Net's `downs`/`ups`, a ModuleDict) has forward hooks that never fire, so its children are hooked instead
(`features/downs.0`, `features/downs.1`, ...). At start-up one probe forward in eval mode (what validation runs)
refuses, in one line listing the layers that do run, a layer that does not run there (e.g. an auxiliary head, used
in training only) or whose output is not an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchvision.utils import make_grid

from glint_lightning.models.base import network_stride
from glint_lightning.models.common import model_part
from glint_lightning.utils.errors import GlintError

OPTION = "callbacks.feature_maps.layers"


def _last_tensor(output: Any) -> Any:
    """A layer's output as one tensor: the last of a list (an encoder's stages) or `out` of a dict."""
    if isinstance(output, dict):
        output = output.get("out", next(iter(output.values()), None))
    if isinstance(output, list | tuple):
        output = output[-1] if output else None
    return output


def _is_container(module: nn.Module) -> bool:
    """Holds layers without a forward of its own (ModuleList, ModuleDict): never called, so never hooked."""
    return type(module).forward is nn.Module.forward and any(True for _ in module.children())


def hook_targets(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Each requested layer name -> the module to hook; a container -> its children (recursively), as `name.i`."""
    targets: dict[str, nn.Module] = {}

    def add(name: str, module: nn.Module) -> None:
        if _is_container(module):
            for child, sub in module.named_children():
                add(f"{name}.{child}", sub)
        else:
            targets[name] = module

    for name in names:
        add(name, model_part(model, name, OPTION))
    return targets


def _probe(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, Any]:
    """Each target's output (its `_last_tensor`) in one eval-mode forward of a (1, 1, 2 x stride, 2 x stride) input;
    targets that did not run are missing."""
    seen: dict[str, Any] = {}
    handles = []
    for name, module in targets.items():

        def keep(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
            seen[name] = _last_tensor(output)

        handles.append(module.register_forward_hook(keep))
    first = next(model.parameters(), None)
    size = 2 * network_stride(model)
    was_training = model.training
    try:
        with torch.no_grad():  # forward, not __call__: a model compiled in place (compile=true) runs eagerly here
            model.eval().forward(torch.zeros(1, 1, size, size, device=first.device if first is not None else "cpu"))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _is_image(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.ndim == 4


def check_layers(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Refuse, in one line, a target that does not run in validation or whose output is not an image."""
    candidates = hook_targets(model, [name for name, _ in model.named_children()])
    seen = _probe(model, {**candidates, **targets})
    for name in targets:
        if _is_image(out := seen.get(name)):
            continue
        if name not in seen:
            why = "does not run in the validation (eval-mode) forward pass"
        else:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            why = f"gives {got}, not (B, C, H, W) maps"
        runs = ", ".join(n for n, o in seen.items() if n in candidates and _is_image(o))
        raise GlintError(f"{OPTION}: '{name}' of {type(model).__name__} {why}; layers that run: {runs}")


class FeatureMaps(L.Callback):
    """For each layer name (e.g. `backbone`, `aspp`, `downs`), a grid of its first `max_channels` channels."""

    def __init__(self, layers: Sequence[str], every_n_epochs: int = 5, max_channels: int = 16) -> None:
        self.layers, self.every_n_epochs, self.max_channels = list(layers), every_n_epochs, max_channels
        self._targets: dict[str, nn.Module] = {}
        self._handles: list[RemovableHandle] = []
        self._maps: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._targets = hook_targets(pl_module.model, self.layers)  # fail at start-up, not after the first epoch
        if stage == "fit":
            check_layers(pl_module.model, self._targets)

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return self.every_n_epochs > 0 and not trainer.sanity_checking and epoch % self.every_n_epochs == 0

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if batch_idx != 0 or not self._due(trainer) or not trainer.is_global_zero:
            return
        for name, module in self._targets.items():

            def keep(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
                self._maps[name] = _last_tensor(output)[0, : self.max_channels].detach().float().cpu()

            self._handles.append(module.register_forward_hook(keep))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in self._targets.keys() - self._maps.keys() - self._warned:  # never silence
            rank_zero_warn(f"{OPTION}: '{name}' did not run in this validation batch; no features/{name} image")
            self._warned.add(name)
        for name, maps in self._maps.items():
            lo = maps.amin(dim=(-2, -1), keepdim=True)
            hi = maps.amax(dim=(-2, -1), keepdim=True)
            grid = make_grid(((maps - lo) / (hi - lo).clamp_min(1e-6))[:, None], nrow=8, padding=1, pad_value=1.0)
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"features/{name}", grid, global_step=trainer.global_step)
        self._maps = {}
