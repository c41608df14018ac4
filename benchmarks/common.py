"""Shared set-up for the benchmark scripts: the demo tiles, a Hydra-composed config, timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from glint_lightning.data.demo import cached_demo
from glint_lightning.utils.config_dir import CONFIG_DIR

CACHE = Path(os.environ.get("GLINT_CACHE_DIR", "outputs/cache"))


def demo_tiles(n: int = 256, tile: int = 64) -> Path:
    """train.h5 of the built-in synthetic set (generated once, cached like `make train`'s)."""
    return cached_demo(CACHE, n_train=n, n_val=32, n_test=0, tile=tile, seed=0) / "train.h5"


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=outputs/bench", *overrides])


def median_rate(run: Callable[[], tuple[int, float]], repeats: int) -> float:
    """Median of `items / seconds` over `repeats` calls of run() -> (items, seconds)."""
    return statistics.median(items / seconds for items, seconds in (run() for _ in range(repeats)))


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def timed_steps(step: Callable[[], None], steps: int, device: str, warmup: int = 1) -> float:
    """Seconds for `steps` calls of step() after `warmup` calls, with the GPU's queue drained on both sides."""
    import torch

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
