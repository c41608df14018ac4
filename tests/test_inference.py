"""Full-frame prediction (sliding windows, gaussian blending, full mode), predict and ckpt_info CLIs."""

import json

import h5py
import numpy as np
import pytest
import torch

from glint_lightning.inference.frames import FramePredictor, gaussian_importance, window_starts
from glint_lightning.module import GlintModule
from tests.helpers import pointwise_module, run_cli


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


def test_predict_cli_writes_prob_and_mask_of_each_frame(trained_ckpt, tmp_path):
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

    before = (tmp_path / "masks.h5").read_bytes()
    again = run_cli(
        "glint_lightning.predict", f"ckpt_path={trained_ckpt}", "input=frames.h5", "output=masks.h5", cwd=tmp_path
    )
    assert again.returncode == 2 and "error: masks.h5 exists; pass another output= or overwrite=true" in again.stderr
    assert (tmp_path / "masks.h5").read_bytes() == before
    bad = run_cli(
        "glint_lightning.predict",
        f"ckpt_path={trained_ckpt}",
        "input=frames.h5",
        "output=o.h5",
        "key=depth",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "frames.h5: no dataset 'depth' (found ['frames'])" in bad.stderr
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob(".o.h5.tmp*"))


def test_ckpt_info_cli(trained_ckpt, tmp_path):
    res = run_cli("glint_lightning.ckpt_info", str(trained_ckpt), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "epoch / step:    0 / 6" in res.stdout and "optimizer state: yes" in res.stdout
    assert "glint_lightning.models.UNet" in res.stdout and "val/iou=" in res.stdout
    info = json.loads(run_cli("glint_lightning.ckpt_info", str(trained_ckpt), "--json", cwd=tmp_path).stdout)
    stored = torch.load(trained_ckpt, weights_only=True)
    assert info["threshold"] == stored["threshold_calibration"]["threshold"], "the calibrated threshold"
    assert info["has_optimizer_state"] and "val/iou" in info["best"]
    assert info["metrics"]["val/iou"] == pytest.approx(info["best"]["val/iou"])
    missing = run_cli("glint_lightning.ckpt_info", "nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: nope.ckpt: no such file")


def test_predict_a_folder_of_png_and_npy_into_masks_and_overlays(trained_ckpt, tmp_path):
    from PIL import Image

    (tmp_path / "frames").mkdir()
    rng = np.random.default_rng(0)
    depth = rng.uniform(600, 1400, (50, 90))
    Image.fromarray(depth.astype(np.uint16)).save(tmp_path / "frames" / "a.png")
    np.save(tmp_path / "frames" / "b.npy", depth.astype(np.float32))
    res = run_cli("glint_lightning.predict", f"ckpt_path={trained_ckpt}", "input=frames", "output=out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote out: PNG masks and overlays for 2 frame(s) of 50x90" in res.stdout
    for name in ("a", "b"):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (50, 90) and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png")).shape == (50, 90, 3)


def test_predict_h5_with_overlays(trained_ckpt, tmp_path):
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.random.default_rng(0).uniform(600, 1400, (2, 40, 60)).astype(np.float32)
    args = [f"ckpt_path={trained_ckpt}", "input=frames.h5", "output=m.h5", "overlays=ov", "mode=full"]
    res = run_cli("glint_lightning.predict", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["frame00000_overlay.png", "frame00001_overlay.png"]
