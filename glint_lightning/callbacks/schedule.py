"""Resuming with a different schedule, optimizer settings or none stored: the LR schedule this run configures,
continued from where its curve stands at the resumed epoch/step.

Lightning restores the stored optimizer and scheduler state as they were, so a cosine over 2 epochs resumed with
`trainer.max_epochs=4` keeps T_max=2 and climbs back to the full learning rate, and a changed `optimizer.lr` or
`weight_decay` is silently replaced by the stored one. `train` adds this callback when the checkpoint's settings
differ from the run's (or it holds no optimizer state): the freshly configured schedulers are stepped as often as
the resumed run's would have been, and their state and the optimizer's hyperparameters replace the stored ones
before Lightning restores them. The optimizer's moments are kept when its class and parameter groups match.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim.lr_scheduler import ReduceLROnPlateau

from glint_lightning.utils.log import get_logger

log = get_logger(__name__)


class ResumeSchedule(L.Callback):
    """Advance the fresh schedulers by `steps`, then make the checkpoint's optimizer/scheduler state match them.

    Args:
        steps: scheduler steps the resumed run has taken.
        schedule: what is rebuilt, for the line it prints (e.g. "cosine over 2 -> 4 epochs").
        at: where training continues (e.g. "epoch 2").
        fresh_optimizer: non-empty when the stored optimizer state does not fit (its class changed).
    """

    def __init__(self, steps: int, schedule: str, at: str, fresh_optimizer: str = "") -> None:
        self.steps, self.schedule, self.at, self.fresh_optimizer = steps, schedule, at, fresh_optimizer
        self._checkpoint: dict[str, Any] | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":
            return
        self._checkpoint = checkpoint
        if trainer.optimizers:  # strategies that restore after setup already have their optimizers
            self._apply(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the optimizers exist, before Lightning restores their state from the checkpoint. Whether
        # OptimizerStateCallback filled in fresh state before or after this, both read the live objects.
        if self._checkpoint is not None:
            self._apply(trainer)

    def _apply(self, trainer: L.Trainer) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore")
            for config in trainer.lr_scheduler_configs:
                if not isinstance(config.scheduler, ReduceLROnPlateau):
                    for _ in range(self.steps):
                        config.scheduler.step()
        checkpoint["lr_schedulers"] = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        fresh = ""
        if "optimizer_states" in checkpoint:
            stored = checkpoint["optimizer_states"]
            # FreezeParts (a BaseFinetuning) may add the groups of parts unfrozen before the checkpoint only later
            extra_groups = any(isinstance(cb, BaseFinetuning) for cb in trainer.callbacks)
            for i, optimizer in enumerate(trainer.optimizers):
                live = optimizer.state_dict()
                if i < len(stored) and not self.fresh_optimizer and _fits(stored[i], live, extra_groups):
                    for mine, theirs in zip(live["param_groups"], stored[i]["param_groups"]):
                        theirs.update({k: v for k, v in mine.items() if k != "params"})
                    continue
                fresh = self.fresh_optimizer or "its parameter groups changed"
                stored[i : i + 1] = [live]
        if trainer.is_global_zero:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            fresh = f"; the optimizer state starts fresh ({fresh})" if fresh else ""
            log.info(f"schedule: {self.schedule}; continuing at {self.at} (lr {lr:.1e}){fresh}")


def _fits(stored: dict[str, Any], live: dict[str, Any], extra_groups: bool) -> bool:
    """Whether the stored optimizer state belongs to the live parameter groups (so its moments still fit); with
    `extra_groups`, it may hold further groups after them."""
    a, b = stored.get("param_groups", []), live.get("param_groups", [])
    count_ok = len(a) >= len(b) if extra_groups else len(a) == len(b)
    return count_ok and all(len(x["params"]) == len(y["params"]) for x, y in zip(a, b))
