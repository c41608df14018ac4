"""A lab's own project: its config folder adds options, its own package holds a network and a loss, and the whole
life cycle works once the package is trusted: the first training from the command line (`--config-dir`), the rest
through each console script's task in this process (Hydra's search path holding the config folder, as there)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.eval import main as eval_main
from glint_lightning.export import export
from glint_lightning.predict import main as predict_main
from glint_lightning.train import main as train_main
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.trust import UntrustedTarget
from tests.helpers import TINY, run_cli

NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A plain nn.Module: no base class, no forward_padded; one pooling level, so it declares stride 2."""

    stride = 2

    def __init__(self, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.dec = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x):
        y = self.dec(self.pool(self.enc(x)))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="nearest")


class WrongChannels(TinyNet):
    def forward(self, x):
        return super().forward(x).repeat(1, 3, 1, 1)


class WeightedBCE(nn.Module):
    def __init__(self, pos_weight: float = 2.0):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits, target, valid):
        w = torch.where(target > 0, self.pos_weight, 1.0) * valid
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        return (bce * w).sum() / w.sum().clamp_min(1)
'''

CONFIGS = {
    "model/tiny.yaml": "_target_: mylab.nets.TinyNet\nin_channels: 1\nwidth: 4\n",
    "model/wrong.yaml": "_target_: mylab.nets.WrongChannels\nin_channels: 1\nwidth: 4\n",
    "loss/weighted.yaml": "_target_: mylab.nets.WeightedBCE\npos_weight: 3.0\n",
    "experiment/mine.yaml": "# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /loss: weighted\n"
    "trusted_targets: [mylab.]\n",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throw-away lab project: mylab/ (its code) and myconf/ (its config folder)."""
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "nets.py").write_text(textwrap.dedent(NETS))
    for name, text in CONFIGS.items():
        (tmp_path / "myconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "myconf" / name).write_text(text)
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.random.default_rng(0).uniform(800, 1200, (2, 45, 70)).astype(np.float32)
    return tmp_path


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("model.")] + ["test=false"]


@pytest.fixture
def in_process(project: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> Callable[..., DictConfig]:
    """The project on sys.path and as the cwd, mylab. trusted (as its experiment says); returns compose(<tool>,
    overrides) with the project's config folder on Hydra's search path, as `--config-dir myconf` puts it."""
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.chdir(project)
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "mylab.")
    yield lambda tool, *overrides: _compose(tool, f"hydra.searchpath=[file://{project / 'myconf'}]", *overrides)
    for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
        del sys.modules[name]  # the next test's project is another folder


def _compose(tool: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(tool, overrides=list(overrides))


@pytest.mark.slow
def test_own_network_and_loss_train_resume_eval_predict_export(project, cache_dir, in_process):
    """Training starts from the command line (the user's config folder and package, in a subprocess); resume, eval,
    predict and export then run each console script's own task in this process."""
    env = {"GLINT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(project)}
    base = ["--config-dir", "myconf", "experiment=mine", *_tiny(), "hydra.run.dir=run"]
    res = run_cli("glint_lightning.train", *base, "trainer.max_epochs=1", cwd=project, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = project / "run" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["hyper_parameters"]["model"]["_target_"] == "mylab.nets.TinyNet"

    run = [f"paths.output_dir={project / 'run'}", f"paths.outputs_root={project}", f"paths.cache_dir={cache_dir}"]
    train_main.task(in_process("train", "experiment=mine", *_tiny(), *run, "trainer.max_epochs=2", "ckpt_path=last"))
    resumed = load_checkpoint(ckpt)
    assert resumed["epoch"] == 1 and resumed["hyper_parameters"]["loss"]["_target_"] == "mylab.nets.WeightedBCE"

    result = eval_main.task(in_process("eval", f"ckpt_path={ckpt}", "split=val", "out=eval"))
    assert 0 <= result["val/iou"] <= 1 and (project / "eval" / "metrics.json").is_file(), result
    predict_main.task(in_process("predict", f"ckpt_path={ckpt}", "input=frames.h5", "output=masks.h5"))
    with h5py.File(project / "masks.h5") as f:
        assert f["mask"].shape == (2, 45, 70)
    for fmt in ("pth", "torchscript", "onnx"):
        result = export(in_process("export", f"ckpt_path={ckpt}", f"format={fmt}", f"out=model.{fmt}"))
        assert result["max_abs_diff"] < 1e-3, f"{fmt}: {result}"
        assert (project / f"model.{fmt}").is_file()


def test_own_code_is_refused_until_trusted(project, in_process, cache_dir, monkeypatch):
    monkeypatch.delenv("GLINT_TRUSTED_TARGETS")
    cfg = in_process("train", "model=tiny", *_tiny(), f"paths.output_dir={project / 'run'}")
    with pytest.raises(UntrustedTarget) as err:
        train(cfg)
    assert "model._target_=mylab.nets.TinyNet" in str(err.value) and "trusted_targets=[mylab.]" in str(err.value)
    assert "\n" not in str(err.value) and isinstance(err.value, GlintError), "one line, exit 2"


def test_a_network_that_breaks_the_contract_is_refused_at_start(project, in_process, cache_dir):
    cfg = in_process("train", "model=wrong", *_tiny(), f"paths.output_dir={project / 'run'}")
    with pytest.raises(GlintError) as err:
        train(cfg)
    assert str(err.value).startswith("model._target_=mylab.nets.WrongChannels: ") and "\n" not in str(err.value)
    assert not (project / "run" / "checkpoints").exists()
