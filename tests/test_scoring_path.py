"""One scoring path: Lightning's validation and test steps, glint-eval's loop, calibration and glint-cv's search score
the same tiles to the same numbers (all through glint_lightning.scoring and the one glint matcher in metrics.py)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from glint_lightning.eval import score_split
from glint_lightning.inference.calibration import PostprocessSearch, calibrate_postprocess
from glint_lightning.inference.ensemble import Ensemble
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.scoring import predict_loader
from tests.helpers import pointwise_module

PIXEL = ("iou", "f1", "precision", "recall")
OBJECT = ("object_precision", "object_recall", "object_f1")


def _batches(n: int = 3, size: int = 32) -> DataLoader:
    """Tiles with 3x3 glints, noisy depth (speckle a min_size removes) and some invalid pixels."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        mask = torch.zeros(4, 1, size, size)
        for tile in mask:
            for y, x in torch.randint(1, size - 4, (5, 2), generator=g).tolist():
                tile[0, y : y + 3, x : x + 3] = 1
        depth = mask * 2 - 1 + 0.9 * torch.randn(mask.shape, generator=g)
        valid = torch.rand(mask.shape, generator=g) > 0.1
        batches.append({"depth": depth, "mask": mask, "valid": valid})
    return DataLoader(batches, batch_size=None)  # one loader of these batches, as they are


def _trainer() -> L.Trainer:
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return L.Trainer(accelerator="cpu", enable_model_summary=False, **quiet)


def test_validation_test_eval_calibration_and_cv_score_the_same_tiles_alike():
    module, batches = pointwise_module(1.5, 0.0), _batches()
    validated = _trainer().validate(module, dataloaders=batches, verbose=False)[0]
    tested = _trainer().test(module, dataloaders=batches, verbose=False)[0]
    evaluated, _ = score_split(module, batches, "cpu", "val", 0.5)
    search = PostprocessSearch()  # glint-cv's search over the out-of-fold probabilities
    for prob, mask, valid in predict_loader(module, batches, "cpu"):
        search.update(prob, mask, valid)
    searched = search.metrics_at(0.5, PostProcess())

    assert evaluated["val/object_true"] > 30 and 0 < evaluated["val/iou"] < 1, "a case where scores can differ"
    for name in ("loss", *PIXEL, "ap"):
        assert evaluated[f"val/{name}"] == pytest.approx(validated[f"val/{name}"], abs=1e-6), name
        assert evaluated[f"val/{name}"] == pytest.approx(tested[f"test/{name}"], abs=1e-6), name
    for name in OBJECT:
        assert evaluated[f"val/{name}"] == pytest.approx(tested[f"test/{name}"], abs=1e-6), name
    for name in (*PIXEL, *OBJECT):
        assert searched[name] == pytest.approx(evaluated[f"val/{name}"], abs=1e-6), name
    counts = [evaluated[f"val/object_{k}"] for k in ("true", "predicted", "matched")]
    assert counts == [searched[f"object_{k}"] for k in ("true", "predicted", "matched")]


def test_post_processed_scores_of_eval_equal_the_search_that_chose_them():
    module, batches = pointwise_module(1.5, 0.0), _batches()
    post = PostProcess(min_size=3, fill_holes=True)
    plain, _ = score_split(module, batches, "cpu", "test", 0.4)
    processed, _ = score_split(module, batches, "cpu", "test", 0.4, post=post)
    cal = calibrate_postprocess(module, batches, "cpu", "object_f1")
    search = PostprocessSearch()
    for prob, mask, valid in predict_loader(module, batches, "cpu"):
        search.update(prob, mask, valid)

    assert processed["test/object_predicted"] < plain["test/object_predicted"], "min_size removed speckle"
    assert processed["test/ap"] == plain["test/ap"], "average precision scores the probabilities"
    at = search.metrics_at(0.4, post)
    for name in (*PIXEL, *OBJECT):
        assert at[name] == pytest.approx(processed[f"test/{name}"], abs=1e-6), name
    chosen, _ = score_split(module, batches, "cpu", "test", cal.threshold, post=cal.selection.postprocess)
    assert chosen["test/object_f1"] == pytest.approx(cal.selection.score, abs=1e-6)


def test_an_ensemble_is_scored_by_the_same_path_as_its_mean():
    a, b = pointwise_module(1.5, 0.0), pointwise_module(0.5, 0.2)
    batches = _batches(1)
    ensemble = Ensemble([a, b], 0.5)
    scored, _ = score_split(ensemble, batches, "cpu", "test", 0.5, tta="flip")
    search = PostprocessSearch()
    for prob, mask, valid in predict_loader(ensemble, batches, "cpu", tta="flip"):
        d, v = batches.dataset[0]["depth"], batches.dataset[0]["valid"]
        with torch.no_grad():
            mean = (torch.sigmoid(a(d, v)) + torch.sigmoid(b(d, v))) / 2  # pointwise: flips change nothing
        assert torch.allclose(prob, mean, atol=1e-6)
        search.update(prob, mask, valid)
    for name in (*PIXEL, *OBJECT):
        assert search.metrics_at(0.5, PostProcess())[name] == pytest.approx(scored[f"test/{name}"], abs=1e-6), name
