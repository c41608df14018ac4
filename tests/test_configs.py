"""Every option of every config group composes and builds: glob conf/<group>/*.yaml, so a new option is covered."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from glint_lightning.train import build_module
from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import TINY_MODEL

CONF = Path(CONFIG_DIR)
OVERLAYS = ("experiment", "hparams_search", "debug")  # @package _global_ groups with no default option
SKIP = {"hydra", "paths"}  # Hydra's own settings; paths is composed in every case below
REQUIRED = {  # options with a mandatory (???) value the user must give
    ("callbacks", "feature_maps"): ["callbacks.feature_maps.layers=[inc]"],
    ("data", "h5"): ["data.train_path=train.h5"],
}


def _options() -> list[tuple[str, str]]:
    return [
        (group.name, option.stem)
        for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in SKIP)
        for option in sorted(group.glob("*.yaml"))
    ]


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    fixed = [f"paths.output_dir={tmp_path}", f"paths.outputs_root={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, *fixed])


def test_every_group_is_covered():
    groups = {g for g, _ in _options()}
    assert {"data", "model", "loss", "optimizer", "scheduler", "callbacks", "trainer", "logger"} <= groups


# Built by another test that checks more than that it builds: logger=mlflow's client creates and migrates an SQLite
# store (seconds); test_tracking trains with it and reads back the params and metrics it recorded.
ELSEWHERE = {("logger", "mlflow"): ("test_tracking.py", '"logger=[csv,mlflow]"')}  # (test file, its override)


def test_options_built_elsewhere_exist_and_are_used_there():
    for option, (test_file, override) in ELSEWHERE.items():
        assert option in _options()
        assert override in (Path(__file__).parent / test_file).read_text(), f"{test_file} no longer builds {option}"


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, o in _options() if (g, o) not in ELSEWHERE], ids=lambda v: str(v)
)
def test_option_composes_and_builds(group, option, tmp_path):
    if group in OVERLAYS:
        cfg = _compose(tmp_path, f"{group}={option}")
        assert cfg.model._target_
        return
    extra = [*(TINY_MODEL.get(option, []) if group == "model" else []), *REQUIRED.get((group, option), [])]
    cfg = _compose(tmp_path, f"{group}={option}", *extra)
    if group == "model" or group in ("loss", "optimizer", "scheduler"):
        module = build_module(cfg, tile_size=(32, 32)).eval()
        logits = module(torch.full((1, 1, 32, 32), 1000.0), torch.ones(1, 1, 32, 32, dtype=torch.bool))
        assert logits.shape == (1, 1, 32, 32)
        assert module.configure_optimizers()
    elif group == "data":
        datamodule = instantiate(cfg.data, _convert_="all")
        assert isinstance(datamodule, L.LightningDataModule)
        assert datamodule.hparams.batch_size == cfg.data.batch_size, "the composed options reach the data module"
    elif group == "callbacks":
        built = [instantiate(cb) for cb in cfg.callbacks.values() if cb is not None]
        assert built
    elif group == "logger":
        assert [instantiate(lg) for lg in cfg.logger.values() if lg is not None]
    elif group == "trainer":
        if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu needs a CUDA device")
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
        assert trainer.max_epochs == cfg.trainer.max_epochs, "the composed options reach the trainer"
    else:
        pytest.fail(f"no build check for config group {group}: add one")
