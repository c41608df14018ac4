"""Test helpers (tiny configs, HDF5 writers, subprocess runner, callbacks that signal or crash): imported by tests
as `from tests.helpers import ...`; fixtures stay in conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch

from glint_lightning.module import GlintModule

REPO = Path(__file__).resolve().parent.parent

# Small enough for 2 CPU cores: tiny networks on 32 px tiles.
TINY_MODEL = {
    "unet": ["model.base_channels=4", "model.depth=2"],
    "deeplabv3plus": ["model.backbone=resnet18", "model.aspp_channels=16", "model.decoder_channels=16"],
    "fcn": ["model.backbone=resnet18"],
    "smp": ["model.encoder=resnet18"],
}
TINY = [
    *TINY_MODEL["unet"],
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "data.demo.n_train=48",
    "data.demo.n_val=16",
    "data.demo.n_test=16",
    "data.demo.tile=32",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "callbacks.progress.refresh_rate=0",
]

# Settings under which any replayed or skipped batch, or lost optimizer state, shows in the weights: dropout,
# augmentation noise and a schedule, deterministic kernels (the exact-resume tests compare against a straight run).
EXACT = [
    "trainer.deterministic=true",
    "scheduler=exponential",
    "model.dropout=0.2",
    "test=false",
    "data.augment.depth_noise=0.01",
]


def write_tiles(
    path: Path,
    depth: np.ndarray,
    mask: np.ndarray,
    valid: np.ndarray | None = None,
    keys: Sequence[str] = ("depth", "mask", "valid"),
    scale: float | None = None,
) -> Path:
    """An HDF5 tile file in the framework's format (one tile per chunk)."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset(keys[0], data=depth, chunks=(1, *depth.shape[1:]) if depth.shape[0] else None)
        if scale is not None:
            d.attrs["scale"] = scale
        f.create_dataset(keys[1], data=mask)
        if valid is not None:
            f.create_dataset(keys[2], data=valid)
    return path


def random_tiles(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(500, 1500, size=(n, size, size)).astype(np.float32)
    mask = (rng.random((n, size, size)) < 0.05).astype(np.uint8)
    return depth, mask


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m <args>` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def pointwise_module(weight: float, bias: float) -> GlintModule:
    """A 'network' whose logit at each pixel is weight * normalised depth + bias: position-independent."""
    module = GlintModule(
        model={"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 1},
        loss={"_target_": "glint_lightning.losses.BCELoss"},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
    )
    with torch.no_grad():
        module.model.weight.fill_(weight)
        module.model.bias.fill_(bias)
    return module.eval()


class SignalAtStep(L.Callback):
    """Sends this process `signum` right after optimizer step `step`, as `kill` or Ctrl-C would."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class Crash(BaseException):
    """A process death, minus the process: no hook may catch it and save anything."""


class CrashAt(L.Callback):
    """Raises Crash when Lightning calls `on_<hook>` after optimizer step `step` (hook: train_batch_start or
    validation_start)."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _maybe_crash(self, hook: str, trainer: L.Trainer) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            raise Crash(f"crash at {hook}, step {self.step}")

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._maybe_crash("train_batch_start", trainer)

    def on_validation_start(self, trainer: L.Trainer, *args: object) -> None:
        self._maybe_crash("validation_start", trainer)


class RankReport(L.Callback):
    """Writes, per rank, the file indices of the tiles it trained on in each epoch and a hash of its final weights
    to `<out>/rank<r>.json` (for the DDP test)."""

    def __init__(self, out: str) -> None:
        self.out, self.tiles = Path(out), {}

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        loader = trainer.train_dataloader
        self.tiles[trainer.current_epoch] = [int(loader.dataset.indices[i]) for i in loader.sampler]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for value in pl_module.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        report = {"world": trainer.world_size, "tiles": self.tiles, "weights": digest.hexdigest()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
