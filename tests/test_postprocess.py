"""Post-processing of thresholded masks (min_size, fill_holes) and choosing it, with the threshold, from data."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from glint_lightning.inference.calibration import PostprocessSearch, calibrate_postprocess
from glint_lightning.inference.postprocess import PostProcess, postprocess_mask, resolve_postprocess
from glint_lightning.metrics import ObjectMetric
from glint_lightning.utils.errors import GlintError
from tests.helpers import pointwise_module


def _blobs(n: int, size: int = 32, seed: int = 0, blob: int = 3, count: int = 4) -> np.ndarray:
    """(n, size, size) masks with `count` separated square glints of `blob` px a side per tile."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    cells = size // 8
    for tile in masks:
        for cell in rng.choice(cells * cells, count, replace=False):
            y, x = (cell // cells) * 8 + 2, (cell % cells) * 8 + 2
            tile[y : y + blob, x : x + blob] = True
    return masks


def test_min_size_removes_small_8_connected_glints_and_fill_holes_fills_enclosed_ones():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True
    m[2, 2] = False  # a ring of 8 px around a hole
    m[6, 6] = m[7, 7] = True  # diagonal neighbours: one glint of 2 px (8-connected)
    m[10, 10] = True  # one pixel
    kept = postprocess_mask(m, min_size=2)
    assert kept[6, 6] and kept[7, 7] and not kept[10, 10] and kept[1:4, 1:4].sum() == 8
    assert not postprocess_mask(m, min_size=3)[6:8, 6:8].any()
    filled = postprocess_mask(m, fill_holes=True)
    assert filled[2, 2] and filled.sum() == m.sum() + 1
    # fill first, then min_size: the filled ring has 9 px
    assert postprocess_mask(m, min_size=9, fill_holes=True).sum() == 9
    # a hole pixel that is invalid stays background; invalid pixels are never glint
    valid = np.ones_like(m)
    valid[2, 2] = valid[10, 10] = False
    out = postprocess_mask(m, valid, fill_holes=True)
    assert not out[2, 2] and not out[10, 10]
    # tensors in, tensors out (same shape); numpy (B, 1, H, W) too
    t = PostProcess(2, True).apply(torch.from_numpy(m)[None, None])
    assert isinstance(t, torch.Tensor) and t.shape == (1, 1, 12, 12) and t.dtype == torch.bool
    assert PostProcess(2, True).apply(m[None, None]).shape == (1, 1, 12, 12)


def test_fill_holes_matches_scipy_tile_by_tile_and_never_joins_tiles():
    rng = np.random.default_rng(0)
    stack = rng.random((40, 16, 16)) < 0.45
    expected = np.stack([ndimage.binary_fill_holes(t) for t in stack])
    assert (postprocess_mask(stack, fill_holes=True) == expected).all()
    one = np.zeros((2, 4, 4), bool)
    one[0, 3, :2] = one[1, 0, :2] = True  # 2 px at the bottom of tile 0, 2 px at the top of tile 1
    assert not postprocess_mask(one, min_size=3).any(), "glints of neighbouring tiles must not merge"


def test_no_post_processing_is_the_default_and_options_override_the_stored_one():
    assert not PostProcess().active and not PostProcess(1).active and PostProcess(2).active
    stored = PostProcess(4, True)
    assert resolve_postprocess({"min_size": None, "fill_holes": None}, stored) == stored
    assert resolve_postprocess({"min_size": 0, "fill_holes": None}, stored) == PostProcess(0, True)
    assert resolve_postprocess(None, PostProcess()) == PostProcess()
    assert PostProcess.from_dict({"min_size": 3, "fill_holes": False, "metric": "iou"}) == PostProcess(3)
    with pytest.raises(GlintError, match="postprocess.min_size=-1"):
        PostProcess(-1)
    with pytest.raises(GlintError, match="postprocess.fill_holes"):
        resolve_postprocess({"fill_holes": "yes"}, PostProcess())


def test_the_search_counts_what_the_logged_metrics_count():
    g = torch.Generator().manual_seed(0)
    mask = torch.nn.functional.max_pool2d((torch.rand(12, 1, 24, 24, generator=g) < 0.08).float(), 3, 1, 1)
    prob = (0.6 * torch.roll(mask, (1, 0), (2, 3)) + 0.45 * torch.rand(12, 1, 24, 24, generator=g)).clamp(0, 1)
    valid = torch.rand(12, 1, 24, 24, generator=g) > 0.05
    search = PostprocessSearch(iou_threshold=0.3)
    search.update(prob[:5], mask[:5], valid[:5])  # counts add up over batches
    search.update(prob[5:], mask[5:], valid[5:])
    for threshold in (0.3, 0.5, 0.7):
        for post in (PostProcess(), PostProcess(4), PostProcess(3, True), PostProcess(0, True)):
            pred = post.apply((prob >= threshold) & valid, valid)
            objects = ObjectMetric(0.5, 0.3)
            objects.update(pred.float(), mask, valid)
            expected = objects.compute()
            truth = mask.bool() & valid
            tp, n_pred, n_true = (pred & truth).sum().item(), pred.sum().item(), truth.sum().item()
            got = search.metrics_at(threshold, post)
            assert got["iou"] == pytest.approx(tp / (n_pred + n_true - tp))
            assert got["f1"] == pytest.approx(2 * tp / (n_pred + n_true))
            assert got["object_f1"] == pytest.approx(float(expected["f1"]))
            counts = tuple(got[f"object_{k}"] for k in ("matched", "predicted", "true"))
            assert counts == tuple(int(expected[k]) for k in ("matched", "predicted", "true"))


def test_small_false_positives_turn_min_size_on():
    truth = _blobs(16, seed=1)  # 3x3 glints
    rng = np.random.default_rng(2)
    prob = np.where(truth, 0.9, rng.uniform(0, 0.3, truth.shape))
    specks = (rng.random(truth.shape) < 0.01) & ~ndimage.binary_dilation(truth, np.ones((1, 3, 3)), iterations=2)
    prob[specks] = 0.9  # single-pixel false positives as confident as the glints: no threshold removes them
    search = PostprocessSearch()
    search.update(prob, truth)
    for metric in ("iou", "object_f1"):
        chosen = search.select(metric)
        assert chosen.kept and 2 <= chosen.postprocess.min_size <= 9 and not chosen.postprocess.fill_holes
        assert chosen.score == pytest.approx(1.0) and chosen.score_without < 0.95
        assert metric != "iou" or 0.3 <= chosen.threshold < 0.9  # glint F1 may also drop background specks
        assert f"post-processing min_size={chosen.postprocess.min_size} px: {metric} 1.0000 vs" in chosen.describe()
        assert chosen.record()["min_size"] == chosen.postprocess.min_size


def test_post_processing_that_would_hurt_stays_off():
    truth = _blobs(16, seed=3, blob=1, count=3) | _blobs(16, seed=4, blob=3, count=2)  # true 1-px glints too
    rng = np.random.default_rng(5)
    prob = np.where(truth, rng.uniform(0.6, 1.0, truth.shape), rng.uniform(0, 0.4, truth.shape))
    search = PostprocessSearch()
    search.update(torch.from_numpy(prob).float()[:, None], torch.from_numpy(truth)[:, None])
    chosen = search.select("iou")
    assert not chosen.kept and chosen.postprocess == PostProcess()
    assert chosen.score == chosen.score_without == pytest.approx(1.0)
    assert chosen.best_postprocess_score <= chosen.score
    assert "post-processing off: none on the grid beat no post-processing" in chosen.describe()
    assert chosen.record() | {} == {**chosen.record(), "min_size": 0, "fill_holes": False}


def test_glints_with_unsure_centres_turn_fill_holes_on():
    truth = _blobs(16, seed=6, blob=5)
    rng = np.random.default_rng(7)
    prob = np.where(truth, 0.9, rng.uniform(0, 0.2, truth.shape))
    centre = ndimage.binary_erosion(truth, np.ones((1, 3, 3)), iterations=2)  # the middle pixel of each 5x5 glint
    assert centre.sum() == 64
    prob[centre] = 0.05
    search = PostprocessSearch()
    search.update(prob, truth)
    chosen = search.select("iou")
    assert chosen.postprocess == PostProcess(0, True)
    assert chosen.score == pytest.approx(1.0) and chosen.score_without < 1.0


def test_calibration_chooses_post_processing_in_one_pass_over_a_loader():
    blobs = _blobs(8, seed=8)
    truth = torch.from_numpy(blobs)[:, None].float()
    far = ~ndimage.binary_dilation(blobs, np.ones((1, 3, 3)), iterations=2)
    specks = torch.from_numpy((np.random.default_rng(9).random(blobs.shape) < 0.01) & far)[:, None]
    depth = truth * 2 - 1  # the pointwise module's logit is the depth: glints at +1 (p=0.73), rest -1 (p=0.27)
    depth[specks] = 1.0
    batch = {"depth": depth, "mask": truth, "valid": torch.ones_like(truth, dtype=torch.bool)}
    cal = calibrate_postprocess(pointwise_module(1.0, 0.0), [batch], "cpu", "iou")
    assert cal.selection.kept and cal.selection.postprocess.min_size >= 2
    assert 0.27 < cal.threshold <= 0.73 and cal.val_f1 == pytest.approx(1.0)
    clean = {"depth": truth * 2 - 1, "mask": truth, "valid": batch["valid"]}
    plain = calibrate_postprocess(pointwise_module(1.0, 0.0), [clean], "cpu", "iou")
    assert not plain.selection.kept and plain.val_f1 == pytest.approx(1.0)
    with pytest.raises(GlintError, match="optimized_metric=dice"):
        calibrate_postprocess(pointwise_module(1.0, 0.0), [clean], "cpu", "dice")
