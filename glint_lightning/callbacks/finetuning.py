"""Freeze named parts of the network (`callbacks.freeze.parts=[backbone]`), optionally unfreezing them at an epoch.

Built on Lightning's BaseFinetuning, which freezes before the optimizer is configured and adds the unfrozen
parameters as a new param group. What it leaves to us: BatchNorm layers of frozen parts stay in eval mode (running
statistics untouched) and go back to train mode when unfrozen (Lightning 2.6 never calls `.train()` on the model
during fit; it only restores each module's mode after validation), and a run resumed after the unfreeze epoch gets
its parts trainable again. The new groups' learning rates are logged from the unfreeze epoch's first step by
glint_lightning.callbacks.lr_monitor.LearningRateMonitor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from glint_lightning.models.common import model_part

# torch's public batch norm layers (lazy ones become these on their first batch; torch's common base is private)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FreezeParts(BaseFinetuning):
    """Freeze `parts` of `pl_module.model`; unfreeze at `unfreeze_at_epoch` with lr = optimizer.lr x
    optimizer.lr_mult[part]. With no parts it does nothing at all (it is in the default callbacks)."""

    def __init__(self, parts: Sequence[str] = (), unfreeze_at_epoch: int | None = None) -> None:
        super().__init__()
        self.parts, self.unfreeze_at_epoch = list(parts or []), unfreeze_at_epoch
        self._frozen_bn: list[nn.Module] = []
        self._unfrozen = False  # saved in checkpoints: loops are restored only after on_fit_start

    def _modules(self, pl_module: L.LightningModule) -> dict[str, Any]:
        return {p: model_part(pl_module.model, p, "callbacks.freeze.parts") for p in self.parts}

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        modules = self._modules(pl_module)
        self.freeze(list(modules.values()), train_bn=False)
        self._frozen_bn = [m for mod in modules.values() for m in mod.modules() if isinstance(m, BATCH_NORMS)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": self._unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._unfrozen = bool(state_dict.get("unfrozen", False))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.parts:  # nothing frozen: no param groups to record (a resume restores Lightning's own)
            super().on_train_epoch_start(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # restores the param groups of a resumed run
        if self._unfrozen:  # resumed after the unfreeze epoch: the parts train again
            self.make_trainable(list(self._modules(pl_module).values()))
            self._frozen_bn = []

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.unfreeze_at_epoch is None or epoch != self.unfreeze_at_epoch:
            return
        base_lr = float(pl_module.hparams.optimizer["lr"])
        lr_mult = pl_module.hparams.optimizer.get("lr_mult") or {}
        for part, module in self._modules(pl_module).items():
            lr = base_lr * float(lr_mult.get(part, 1.0))
            self.unfreeze_and_add_param_group(module, optimizer, lr=lr, train_bn=True)
            optimizer.param_groups[-1]["name"] = part  # what LearningRateMonitor calls the group
        for bn in self._frozen_bn:  # put in eval by on_train_batch_start: statistics learn again
            bn.train(pl_module.training)
        self._frozen_bn, self._unfrozen = [], True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for bn in self._frozen_bn:  # also after the user's code calls model.train()
            if bn.training:
                bn.eval()
