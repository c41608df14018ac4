"""A callback that holds a training run at its start until a file appears (for tests with two processes)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class WaitForFile(L.Callback):
    """Writes `ready` when training starts, then waits (at most `timeout_s`) until `go` exists."""

    def __init__(self, ready: str, go: str, timeout_s: float = 240) -> None:
        self.ready, self.go, self.timeout_s = Path(ready), Path(go), timeout_s

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ready.touch()
        end = time.monotonic() + self.timeout_s
        while not self.go.exists() and time.monotonic() < end:
            time.sleep(0.05)
