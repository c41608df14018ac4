"""Optuna pruning inside one trial of a sweep (`hydra.sweeper.pruner=median`).

The sweeper (glint_lightning.runs.optuna_sweep) adds this callback to each trial's overrides as
`+callbacks.optuna_pruning.*`: the study's storage, name, trial number, metric and pruner. Every validation epoch
it reports the metric to the study (`Trial.report`) and asks the pruner (`Trial.should_prune`); when the pruner says
so, it stops training cleanly (the run dir keeps its checkpoints and metrics.json, which records `pruned_at_epoch`)
and marks the trial, so that the sweeper tells it PRUNED rather than complete. Under DDP rank 0 talks to the study
and broadcasts its decision, so every rank stops at the same epoch.

The pruner is named (`median`, `hyperband`, `threshold`... = optuna.pruners.<Name>Pruner, see
glint_lightning.utils.optuna_storage). Optuna is imported only when a trial starts: the callback package works
without the `sweep` extra.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning as L

from glint_lightning.utils.optuna_storage import PRUNED_ATTR, make_pruner, open_storage

if TYPE_CHECKING:
    import optuna


class OptunaPruning(L.Callback):
    """Report `monitor` to trial `trial` of the study after every validation epoch; stop when the pruner says so."""

    def __init__(
        self, storage: str, study_name: str, trial: int, monitor: str, pruner: str, pruner_args: dict | None = None
    ) -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study_name, int(trial), monitor
        self.pruner, self.pruner_args = pruner, dict(pruner_args or {})
        self.pruned_at: int | None = None
        self._trial: optuna.trial.Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, pruner=make_pruner(self.pruner, self.pruner_args)
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if self._trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                self._trial.report(float(value), step=trainer.current_epoch)
                prune = self._trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune and self.pruned_at is None:
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True
            if self._trial is not None:
                self._trial.set_user_attr(PRUNED_ATTR, trainer.current_epoch)

    @staticmethod
    def summary(trainer: L.Trainer) -> dict[str, int]:
        """`{"pruned_at_epoch": n}` for metrics.json when this callback stopped the run, else {}."""
        cb = next((c for c in trainer.callbacks if isinstance(c, OptunaPruning)), None)
        return {PRUNED_ATTR: cb.pruned_at} if cb is not None and cb.pruned_at is not None else {}
