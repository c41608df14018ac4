"""Hydra callbacks: checks that must run before Hydra creates the run folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from glint_lightning.utils.errors import EXIT_USER_ERROR


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created and written, or None: the nearest existing part decides."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class CheckOutputDir(Callback):
    """One-line error, exit 2, before Hydra would fail with a traceback creating an unwritable run folder."""

    def _check(self, config: DictConfig, key: str) -> None:
        folder = Path(str(config.hydra[key.split(".")[1]].dir))
        reason = unwritable_reason(folder)
        if reason:
            print(
                f"error: {key}={folder}: {reason}; pass a writable folder, e.g. {key}=outputs/my_run", file=sys.stderr
            )
            raise SystemExit(EXIT_USER_ERROR)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
