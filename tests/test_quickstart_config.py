"""experiment=quickstart (what `make train` runs) composes to the run benchmarks/quickstart.py times: its schedule
spans exactly its steps, it is scored on the default demo set's val split, and train's start-up checks accept it.
Composition only (no training): the timing itself is a benchmark, not a test."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from glint_lightning.data.demo import make_demo
from glint_lightning.train import check_config
from glint_lightning.utils.config_dir import CONFIG_DIR


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    fixed = [f"paths.output_dir={tmp_path}", f"paths.outputs_root={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, *fixed])


def test_quickstart_sets_the_fast_options(tmp_path):
    cfg = _compose(tmp_path, "experiment=quickstart")
    check_config(cfg)
    assert cfg.channels_last is True
    assert cfg.trainer.num_sanity_val_steps == 0
    assert cfg.trainer.precision == "32-true"  # bf16 autocast is slower on the CPU (benchmarks/speed_options.py)
    assert (cfg.model.base_channels, cfg.model.depth) == (16, 3)
    assert cfg.optimizer.lr > 1e-3


def test_quickstart_cosine_ends_with_the_last_step(tmp_path):
    """Warm-up plus T_max (both in steps) is the run's length: the learning rate reaches its minimum at the last
    step instead of climbing back (a per-step cosine with a fixed T_max is periodic)."""
    cfg = _compose(tmp_path, "experiment=quickstart")
    sched = cfg.scheduler
    assert sched.interval == "step"
    assert sched.scheduler._target_.endswith("CosineAnnealingLR")
    steps = cfg.trainer.max_epochs * (cfg.data.demo.n_train // cfg.data.batch_size)  # the loader drops the last
    assert sched.warmup_epochs + sched.scheduler.T_max == steps


def test_quickstart_validates_on_the_default_demo_val_split(tmp_path):
    """A real training: fewer training tiles, but the held-out val and test tiles are the default set's (each
    demo split is drawn from its own seed, so n_train does not change them)."""
    quick, default = _compose(tmp_path, "experiment=quickstart").data.demo, _compose(tmp_path).data.demo
    assert quick.n_train < default.n_train
    assert [quick[k] for k in ("n_val", "n_test", "tile", "seed")] == [
        default[k] for k in ("n_val", "n_test", "tile", "seed")
    ]


def test_demo_val_tiles_do_not_depend_on_n_train(tmp_path):
    a = make_demo(tmp_path / "a", n_train=4, n_val=3, n_test=0, tile=16, seed=0)["val"]
    b = make_demo(tmp_path / "b", n_train=8, n_val=3, n_test=0, tile=16, seed=0)["val"]
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for key in ("depth", "mask", "valid"):
            np.testing.assert_array_equal(fa[key][()], fb[key][()])
