"""Object-level metrics, threshold calibration and the eval entry point."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from glint_lightning.evaluation import ObjectCounts, calibrate_threshold, match_components
from glint_lightning.train import train
from tests.conftest import pointwise_module, run_cli


def _mask(*boxes, size=12):
    m = np.zeros((size, size), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_components_match_one_to_one_by_iou():
    truth = _mask((1, 3, 1, 3), (6, 9, 6, 9))
    pred = _mask((1, 3, 1, 4), (0, 1, 11, 12))  # IoU 4/6 with the first glint, and a spurious pixel
    assert match_components(truth, pred, 0.25) == (1, 2, 2)
    assert match_components(truth, pred, 0.7) == (0, 2, 2)
    merged = _mask((1, 9, 1, 9))  # one blob over both glints matches at most one of them
    assert match_components(truth, merged, 0.01) == (1, 1, 2)
    diagonal = np.eye(4, dtype=bool)  # 8-connected: one glint, not four
    assert match_components(diagonal, diagonal, 0.5) == (1, 1, 1)
    assert match_components(truth, np.zeros_like(truth), 0.5) == (0, 0, 2)


def test_object_counts_over_tiles():
    counts = ObjectCounts(iou_threshold=0.25)
    truth = np.stack([_mask((1, 3, 1, 3), (6, 9, 6, 9)), _mask()])
    pred = np.stack([_mask((1, 3, 1, 3)), _mask((4, 6, 4, 6))])
    counts.update(truth, pred)
    r = counts.compute()
    assert (r["object/matched"], r["object/predicted"], r["object/true"]) == (1, 2, 2)
    assert r["object/precision"] == pytest.approx(0.5) and r["object/recall"] == pytest.approx(0.5)
    assert r["object/f1"] == pytest.approx(0.5)
    assert ObjectCounts().compute()["object/f1"] == 1.0, "nothing to find and nothing found is perfect"


def test_calibration_finds_the_separating_threshold():
    module = pointwise_module(1.0, 0.0)  # logit = depth: positives at +1 (p=0.73), negatives at -1 (p=0.27)
    mask = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    batch = {"depth": mask * 2 - 1, "mask": mask, "valid": torch.ones_like(mask, dtype=torch.bool)}
    threshold, f1 = calibrate_threshold(module, [batch], "cpu")
    assert f1 == pytest.approx(1.0) and 0.27 < threshold <= 0.73


def test_eval_reproduces_the_test_metrics_and_writes_reports(make_cfg, tmp_path, cache_dir):
    train(make_cfg("trainer.max_epochs=2"))
    run = tmp_path / "run"
    logged = json.loads((run / "metrics.json").read_text())
    best = logged["best_checkpoint"]
    stored = torch.load(best, weights_only=True)
    assert stored["hyper_parameters"]["threshold"] == pytest.approx(logged["threshold"]["value"])
    assert stored["threshold_calibration"]["val_f1"] == pytest.approx(logged["threshold"]["val_f1"])

    res = run_cli(
        "glint_lightning.eval",
        f"ckpt_path={best}",
        cwd=tmp_path,
        env={"GLINT_CACHE_DIR": str(cache_dir)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = run / "eval" / f"{Path(best).stem}-test"
    result = json.loads((out / "metrics.json").read_text())
    for key, value in logged["test"].items():
        assert result[key] == pytest.approx(value, abs=1e-5), key
    assert result["threshold"] == pytest.approx(logged["threshold"]["value"])
    assert {"object/precision", "object/recall", "object/f1", "object/true"} <= set(result)
    assert result["object/true"] > 0 and result["tiles"] == 16
    assert (out / "pr_curve.png").stat().st_size > 1000
    with open(out / "metrics.csv") as f:
        rows = dict(csv.reader(f))
    assert float(rows["test/iou"]) == pytest.approx(result["test/iou"])
    assert "test/iou" in res.stdout and "wrote " in res.stdout

    # overrides: another batch size (pixel metrics do not depend on it; batch Dice loss does), another threshold
    args = [f"ckpt_path={best}", "data.eval_batch_size=7", "threshold=0.9", f"out={tmp_path / 'e2'}"]
    forced = run_cli("glint_lightning.eval", *args, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)})
    assert forced.returncode == 0, forced.stderr[-2000:]
    other = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert other["threshold"] == 0.9 and other["tiles"] == 16
    assert other["test/ap"] == pytest.approx(result["test/ap"], abs=1e-5)


def test_eval_bad_input(tmp_path, trained_ckpt):
    missing = run_cli("glint_lightning.eval", "ckpt_path=nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: nope.ckpt: no such file")
    no_test = run_cli("glint_lightning.eval", f"ckpt_path={trained_ckpt}", "data.demo.n_test=0", cwd=tmp_path)
    assert no_test.returncode == 2 and "no test split" in no_test.stderr
    typo = run_cli("glint_lightning.eval", f"ckpt_path={trained_ckpt}", "treshold=0.3", cwd=tmp_path)
    assert typo.returncode == 2 and "unknown option(s) ['treshold']" in typo.stderr
