"""Shared fixtures: a tiny demo data set, Hydra-composed configs for tiny CPU runs, a trained checkpoint, the
library's log lines. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import TINY, TINY_MODEL


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly (with the reason) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo-data cache for the whole session (generated on first use, keyed by its parameters)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["GLINT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """compose(train.yaml) with TINY + overrides; the run dir is tmp_path/<run> and outputs_root is tmp_path."""

    def _make(*overrides: str, run: str = "run") -> DictConfig:
        model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "unet")
        tiny = [o for o in TINY if not o.startswith("model.")] + TINY_MODEL[model]
        if "data=h5" in overrides:  # your own files: no demo block
            tiny = [o for o in tiny if not o.startswith("data.demo.")]
        fixed = [
            f"paths.output_dir={tmp_path / run}",
            f"paths.outputs_root={tmp_path}",
            f"paths.cache_dir={cache_dir}",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=[*tiny, *fixed, *overrides])

    return _make


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny U-Net trained for one epoch on the demo data; its last.ckpt."""
    from glint_lightning.train import train

    run = tmp_path_factory.mktemp("trained")
    fixed = [f"paths.output_dir={run}", f"paths.outputs_root={run}", f"paths.cache_dir={cache_dir}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *fixed, "trainer.max_epochs=1", "test=false"])
    train(cfg)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture
def glint_log(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """The library's log lines (resuming, schedules, pretrained weights, locks) since the last call."""
    caplog.set_level(logging.INFO, logger="glint_lightning")

    def read() -> str:
        text = caplog.text
        caplog.clear()
        return text

    return read
