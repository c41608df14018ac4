"""A lab's own project: its config folder adds options, its own package holds a network and a loss, and the whole
life cycle works through the installed commands once the package is trusted."""

from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

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


@pytest.mark.slow
def test_own_network_and_loss_train_resume_eval_predict_export(project, cache_dir):
    env = {"GLINT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(project)}
    base = ["--config-dir", "myconf", "experiment=mine", *_tiny(), "hydra.run.dir=run"]
    res = run_cli("glint_lightning.train", *base, "trainer.max_epochs=1", cwd=project, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("glint_lightning.train", *base, "trainer.max_epochs=2", "ckpt_path=last", cwd=project, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = project / "run" / "checkpoints" / "last.ckpt"
    trusted = "trusted_targets=[mylab.]"

    res = run_cli("glint_lightning.eval", f"ckpt_path={ckpt}", "split=val", trusted, cwd=project, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(
        "glint_lightning.predict", f"ckpt_path={ckpt}", "input=frames.h5", "output=masks.h5", trusted,
        cwd=project, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(project / "masks.h5") as f:
        assert f["mask"].shape == (2, 45, 70)
    for fmt in ("pth", "torchscript", "onnx"):
        res = run_cli("glint_lightning.export", f"ckpt_path={ckpt}", f"format={fmt}", trusted, cwd=project, env=env)
        assert res.returncode == 0, f"{fmt}: {res.stderr[-3000:]}"
        assert "max abs diff" in res.stdout


def test_own_code_is_refused_until_trusted(project, cache_dir):
    env = {"GLINT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(project)}
    res = run_cli("glint_lightning.train", "--config-dir", "myconf", "model=tiny", *_tiny(), cwd=project, env=env)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "model._target_=mylab.nets.TinyNet" in errors[0] and "trusted_targets=[mylab.]" in errors[0]


def test_a_network_that_breaks_the_contract_is_refused_at_start(project, cache_dir):
    env = {"GLINT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(project)}
    args = ["--config-dir", "myconf", "model=wrong", "trusted_targets=[mylab.]", *_tiny(), "hydra.run.dir=run"]
    res = run_cli("glint_lightning.train", *args, cwd=project, env=env)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "mylab.nets.WrongChannels" in errors[0] and "Traceback" not in res.stderr
    assert not (project / "run" / "checkpoints").exists()
