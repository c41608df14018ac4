"""Full-frame prediction (sliding windows, gaussian blending, full mode), predict and ckpt_info CLIs."""

import json
import re

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from glint_lightning.ckpt_info import main as ckpt_info_main
from glint_lightning.inference.frames import FramePredictor, gaussian_importance, window_starts
from glint_lightning.module import GlintModule
from glint_lightning.predict import main as predict_main
from glint_lightning.predict import predict_file
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import pointwise_module, run_cli


def _predict_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def test_gaussian_importance_map():
    w = gaussian_importance(64, 48)
    assert w.shape == (64, 48) and w.max() == pytest.approx(1.0) and w.min() > 0
    torch.testing.assert_close(w, w.flip(0))
    torch.testing.assert_close(w, w.flip(1))
    assert w[32, 24] > w[32, 40] > w[32, 47]


@pytest.mark.parametrize("length, window, overlap", [(100, 32, 0.5), (64, 64, 0.5), (20, 32, 0.5), (1000, 256, 0.25)])
def test_windows_cover_the_frame(length, window, overlap):
    starts = window_starts(length, window, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, length - window)
    covered = np.zeros(max(length, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:length].all()
    assert all(b - a <= window * (1 - overlap) + 1 for a, b in zip(starts, starts[1:]))


def test_constant_logits_give_a_constant_map_without_seams():
    prob = FramePredictor(pointwise_module(0.0, 0.7), (32, 32), overlap=0.5)(
        torch.rand(150, 97) * 1000 + 500, torch.ones(150, 97, dtype=torch.bool)
    )
    torch.testing.assert_close(prob, torch.full((150, 97), torch.sigmoid(torch.tensor(0.7)).item()))


@pytest.mark.parametrize("shape", [(150, 97), (20, 50)])
def test_windows_are_placed_where_they_were_cut(shape):
    module = pointwise_module(1.0, 0.0)  # logit = depth (mean 0, std 1): the map must equal sigmoid(depth)
    depth = torch.randn(*shape)
    valid = torch.rand(*shape) > 0.1
    expected = torch.sigmoid(torch.where(valid, depth, 0.0))
    for mode in ("window", "full"):
        torch.testing.assert_close(FramePredictor(module, (32, 32), mode=mode)(depth, valid), expected)


def test_a_frame_of_one_tile_equals_the_plain_forward_pass(trained_ckpt):
    module = GlintModule.from_checkpoint(str(trained_ckpt))
    depth = torch.rand(32, 32) * 800 + 600
    valid = torch.rand(32, 32) > 0.05
    with torch.no_grad():
        plain = torch.sigmoid(module(depth[None, None], valid[None, None]))[0, 0]
    torch.testing.assert_close(FramePredictor(module, (32, 32))(depth, valid), plain, atol=1e-6, rtol=0)


def test_predict_cli_writes_prob_and_mask_of_each_frame(trained_ckpt, tmp_path, monkeypatch):
    frames = np.random.default_rng(0).uniform(600, 1400, (3, 100, 70)).astype(np.float32)
    frames[:, :5, :5] = 0  # dropout
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = frames
    res = run_cli(
        "glint_lightning.predict",
        f"ckpt_path={trained_ckpt}",
        "input=frames.h5",
        "output=masks.h5",
        "threshold=0.3",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote masks.h5: prob (float16) and mask (uint8) for 3 frame(s) of 100x70; threshold 0.3" in res.stdout
    assert "window 32x32" in res.stdout and "megapixels/s" in res.stdout
    with h5py.File(tmp_path / "masks.h5") as g:
        prob, mask = g["prob"][:], g["mask"][:]
    assert prob.shape == mask.shape == (3, 100, 70) and prob.dtype == np.float16 and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, ((prob.astype(np.float32) >= 0.3) & (frames != 0)).astype(np.uint8))
    assert not mask[:, :5, :5].any(), "invalid pixels are never glints"

    # the refusals in this process: the app makes each one `error:` line and exit 2 (tests/test_console_scripts.py)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "masks.h5").read_bytes()
    with pytest.raises(GlintError, match=r"^masks\.h5 exists; pass another output= or overwrite=true$"):
        predict_file(_predict_cfg(f"ckpt_path={trained_ckpt}", "input=frames.h5", "output=masks.h5"))
    assert (tmp_path / "masks.h5").read_bytes() == before
    with pytest.raises(GlintError, match=re.escape("frames.h5: no dataset 'depth' (found ['frames'])")):
        predict_file(_predict_cfg(f"ckpt_path={trained_ckpt}", "input=frames.h5", "output=o.h5", "key=depth"))
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob(".o.h5.tmp*"))


def test_ckpt_info_cli(trained_ckpt, capsys):
    """In this process: the console script (tests/test_console_scripts.py) and `python -m` (test_robustness.py) run
    this same main() in subprocesses."""
    ckpt_info_main([str(trained_ckpt)])
    out = capsys.readouterr().out
    assert "epoch / step:    0 / 6" in out and "optimizer state: yes" in out
    assert "glint_lightning.models.UNet" in out and "val/iou=" in out
    ckpt_info_main([str(trained_ckpt), "--json"])
    info = json.loads(capsys.readouterr().out)
    stored = torch.load(trained_ckpt, weights_only=True)
    assert info["threshold"] == stored["threshold_calibration"]["threshold"], "the calibrated threshold"
    assert info["has_optimizer_state"] and "val/iou" in info["best"]
    assert info["metrics"]["val/iou"] == pytest.approx(info["best"]["val/iou"])
    with pytest.raises(SystemExit) as exit_:
        ckpt_info_main(["nope.ckpt"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: nope.ckpt: no such file")


def test_predict_a_folder_of_png_and_npy_into_masks_and_overlays(trained_ckpt, tmp_path, monkeypatch, capsys):
    from PIL import Image

    (tmp_path / "frames").mkdir()
    rng = np.random.default_rng(0)
    depth = rng.uniform(600, 1400, (50, 90))
    Image.fromarray(depth.astype(np.uint16)).save(tmp_path / "frames" / "a.png")
    np.save(tmp_path / "frames" / "b.npy", depth.astype(np.float32))
    monkeypatch.chdir(tmp_path)  # glint-predict's task in this process (its command line: test_tool_clis.py)
    predict_main.task(_predict_cfg(f"ckpt_path={trained_ckpt}", "input=frames", "output=out"))
    assert "wrote out: PNG masks and overlays for 2 frame(s) of 50x90" in capsys.readouterr().out
    for name in ("a", "b"):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (50, 90) and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png")).shape == (50, 90, 3)


def test_predict_h5_with_overlays(trained_ckpt, tmp_path, monkeypatch):
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.random.default_rng(0).uniform(600, 1400, (2, 40, 60)).astype(np.float32)
    args = [f"ckpt_path={trained_ckpt}", "input=frames.h5", "output=m.h5", "overlays=ov", "mode=full"]
    monkeypatch.chdir(tmp_path)
    assert predict_file(_predict_cfg(*args))["overlays"] == "ov"
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["frame00000_overlay.png", "frame00001_overlay.png"]
