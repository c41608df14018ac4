"""`hydra/sweeper=glint_optuna`: hydra-optuna-sweeper whose study survives a crash (glint_lightning.runs.optuna_sweep).

Hydra builds sweepers only from classes under the `hydra_plugins` namespace, and imports every module there when
any Hydra app starts: this one stays tiny and imports the work (and Optuna) only when the sweeper is built.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `sweep` extra is not installed: no Optuna sweepers at all
    OptunaSweeper = None

if OptunaSweeper is not None:

    class GlintOptunaSweeper(OptunaSweeper):
        """OptunaSweeper whose work is done by glint_lightning.runs.optuna_sweep.ResumableSweep."""

        def __init__(self, **kwargs: Any) -> None:
            logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna imports it; it lists its plugins
            from glint_lightning.runs.optuna_sweep import ResumableSweep

            self.sweeper = ResumableSweep(**kwargs)
