"""ckpt_info says which weights a stored threshold was calibrated with: train calibrates with the best weights and
stores the threshold in the best and last checkpoints, and last.ckpt may hold later weights."""

from __future__ import annotations

import json
import shutil

from glint_lightning.ckpt_info import describe, format_info
from glint_lightning.inference.calibration import write_threshold
from glint_lightning.train import train


def _threshold_line(path):
    return next(ln for ln in format_info(describe(path)).splitlines() if ln.startswith("threshold:"))


def test_ckpt_info_says_last_ckpts_threshold_comes_from_the_best_weights(make_cfg, tmp_path):
    # norm=none and a vanishing learning rate: epoch 1 scores exactly as epoch 0, so the best stays at epoch 0
    train(make_cfg("model.norm=none", "optimizer.lr=1e-30", "scheduler=none", "test=false"))
    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_checkpoint"].endswith("best-epoch000.ckpt") and summary["epochs"] == 2
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best-epoch000.ckpt"
    f1 = f"val F1 {summary['threshold']['val_f1']:.4f}"
    assert _threshold_line(last).endswith(
        f"(calibrated with the best weights, best-epoch000.ckpt at epoch 0, not these: {f1})"
    )
    assert _threshold_line(best).endswith(f"(calibrated with these weights: {f1})")
    info = describe(last)
    assert info["threshold_from_these_weights"] is False
    assert info["threshold_calibration"]["weights"] == {
        "checkpoint": "best-epoch000.ckpt",
        "epoch": 0,
        "global_step": 6,
        "role": "best",
    }

    own = tmp_path / "own.ckpt"  # eval calibrate=true: calibrated with the checkpoint's own weights
    shutil.copy(last, own)
    write_threshold(own, 0.3, 0.5)
    assert describe(own)["threshold_from_these_weights"] is True
    assert _threshold_line(own) == "threshold:       0.3 (calibrated with these weights: val F1 0.5000)"
