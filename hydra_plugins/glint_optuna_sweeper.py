"""`hydra/sweeper=glint_optuna`: our Optuna sweeper (the work is in glint_lightning.runs.optuna_sweep).

Hydra builds sweepers only from classes under the `hydra_plugins` namespace, and imports every module there when
any Hydra app starts: this one stays tiny and imports the work (and Optuna) only when the sweeper is built.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class GlintOptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches them with the configured launcher, tells their results."""

    def __init__(self, **kwargs: Any) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's RDB storage lists its migrations
        from glint_lightning.runs.optuna_sweep import StudySweep

        self.sweep_ = StudySweep(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweep_.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.sweep_.sweep(arguments)
