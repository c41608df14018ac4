"""data.depth_clip: the normalisation statistics are those of the clipped valid depth, and every path to the network
(the checkpoint, .pth/.safetensors exports read back, TorchScript, ONNX) clips the same way; old checkpoints without
the clip buffers load as unclipped."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from glint_lightning.data import GlintDataModule
from glint_lightning.export import export
from glint_lightning.inference.loading import load_module
from glint_lightning.module import GlintModule
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import TINY, random_tiles, write_tiles


def _dm(tmp_path: Path, depth: np.ndarray, mask: np.ndarray, **kw) -> GlintDataModule:
    dm = GlintDataModule(
        train_path=str(write_tiles(tmp_path / "t.h5", depth, mask)),
        val_path=str(write_tiles(tmp_path / "v.h5", *random_tiles(2))),
        val_fraction=0.0,
        batch_size=4,
        norm_samples=1000,
        **kw,
    )
    dm.setup("fit")
    return dm


def test_statistics_are_those_of_the_clipped_valid_depth(tmp_path):
    depth, mask = random_tiles(10)
    depth[:, :4] = 0.0  # invalid: excluded before clipping
    values = depth[depth != 0].astype(np.float64)
    low, high = np.percentile(values, [10, 90])
    dm = _dm(tmp_path, depth, mask, depth_clip=[float(low), float(high)])
    clipped = np.clip(values, low, high)
    assert dm.depth_stats == pytest.approx((clipped.mean(), clipped.std()), rel=1e-6)
    assert dm.depth_stats[1] < values.std(), "the clip narrowed the spread"
    assert dm.describe()["depth_clip_mm"] == [low, high]


@pytest.mark.parametrize("clip", [[3000, 500], [1], "far", [math.nan, 1], [0, math.inf]])
def test_a_bad_clip_is_one_error(tmp_path, clip):
    with pytest.raises(GlintError, match=r"data.depth_clip=.*use null or \[low, high\] in mm with low < high"):
        GlintDataModule(train_path="t.h5", depth_clip=clip)


def _logits(model, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.as_tensor(model(depth, valid))


def _export(ckpt: Path, fmt: str, out: Path) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={ckpt}", f"format={fmt}", f"out={out}"])
    export(cfg)
    return out


@pytest.fixture(scope="module")
def clipped_ckpt(tmp_path_factory, trained_run, cache_dir) -> tuple[Path, tuple[float, float]]:
    """A tiny run on the demo data with depth clipped to mean +- 0.5 std of the unclipped run's statistics."""
    described = json.loads((trained_run / "data.json").read_text())
    mean, std = described["depth_mean_mm"], described["depth_std_mm"]
    clip = (round(mean - 0.5 * std, 3), round(mean + 0.5 * std, 3))
    run = tmp_path_factory.mktemp("clipped")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY,
                "trainer.max_epochs=1",
                "test=false",
                f"data.depth_clip=[{clip[0]},{clip[1]}]",
                f"paths.output_dir={run}",
                f"paths.outputs_root={run}",
                f"paths.cache_dir={cache_dir}",
            ],
        )
    train(cfg)
    return run / "checkpoints" / "last.ckpt", clip


def test_every_path_to_the_network_clips_the_same_way(clipped_ckpt, tmp_path):
    ckpt, clip = clipped_ckpt
    module = GlintModule.from_checkpoint(str(ckpt))
    assert module.depth_input.clip_range() == pytest.approx(clip)
    g = torch.Generator().manual_seed(0)
    depth = module.depth_mean + 4 * module.depth_std * torch.randn(2, 1, 40, 56, generator=g)  # much beyond the clip
    valid = torch.rand(2, 1, 40, 56, generator=g) > 0.1
    expected = _logits(module, depth, valid)
    torch.testing.assert_close(_logits(module, depth.clamp(*clip), valid), expected, atol=0, rtol=0)
    unclipped = GlintModule.from_checkpoint(str(ckpt))
    unclipped.depth_input.set_clip(None)
    assert not torch.allclose(_logits(unclipped, depth, valid), expected), "the clip changes what the network sees"
    models = {
        "ckpt": load_module(ckpt),
        "pth": load_module(_export(ckpt, "pth", tmp_path / "m.pth")),
        "safetensors": load_module(_export(ckpt, "safetensors", tmp_path / "m.safetensors")),
        "torchscript": torch.jit.load(str(_export(ckpt, "torchscript", tmp_path / "m.torchscript"))),
    }
    if importlib.util.find_spec("onnxruntime"):  # the [export] extra
        import onnxruntime as ort

        onnx = ort.InferenceSession(str(_export(ckpt, "onnx", tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
        models["onnx"] = lambda d, v: onnx.run(None, {"depth": d.numpy(), "valid": v.numpy()})[0]
    assert json.loads((tmp_path / "m.json").read_text())["depth_clip"] == pytest.approx(list(clip))
    for name, model in models.items():
        torch.testing.assert_close(_logits(model, depth, valid), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_an_export_with_a_bad_clip_is_one_error(clipped_ckpt, tmp_path):
    out = _export(clipped_ckpt[0], "safetensors", tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "depth_clip": [1.0]}))
    with pytest.raises(GlintError, match=r"m.safetensors: depth_clip=\[1.0\] is not \[low, high\]"):
        load_module(out)


@pytest.mark.parametrize("oldest", [False, True])
def test_a_checkpoint_without_the_clip_buffers_loads_unclipped(trained_ckpt, tmp_path, oldest):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    state = ckpt["state_dict"]
    del state["depth_input.low"], state["depth_input.high"]
    if oldest:  # before DepthInput: the statistics were the module's own buffers
        state["depth_mean"], state["depth_std"] = state.pop("depth_input.mean"), state.pop("depth_input.std")
    torch.save(ckpt, tmp_path / "old.ckpt")
    old, new = GlintModule.from_checkpoint(str(tmp_path / "old.ckpt")), GlintModule.from_checkpoint(str(trained_ckpt))
    assert old.depth_input.clip_range() is None
    depth = old.depth_mean + 4 * old.depth_std * torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(depth, dtype=torch.bool)
    torch.testing.assert_close(_logits(old, depth, valid), _logits(new, depth, valid), atol=0, rtol=0)
