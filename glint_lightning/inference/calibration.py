"""The probability threshold that maximises validation F1, and storing it in a checkpoint. (Scoring itself runs
through Lightning's test loop: GlintModule.test_step with the metrics in glint_lightning.metrics.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.checkpoints.io import atomic_torch_save
from glint_lightning.checkpoints.reader import read_torch_file
from glint_lightning.inference.postprocess import PostprocessSearch, Selection, check_metric
from glint_lightning.module import GlintModule


@torch.no_grad()
def predictions(
    module: GlintModule, loader: DataLoader, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (logits, mask, valid) batches on the CPU for a loader, with the module in eval mode."""
    module.eval().to(device)
    for batch in loader:
        depth, valid = batch["depth"].to(device), batch["valid"].to(device)
        yield module(depth, valid).float().cpu(), batch["mask"], batch["valid"]


def calibrate_threshold(module: GlintModule, loader: DataLoader, device: torch.device | str) -> tuple[float, float]:
    """The threshold in (0, 1) that maximises pixel F1 over the valid pixels of `loader`, and that F1."""
    curve = BinaryPrecisionRecallCurve(thresholds=torch.linspace(0.02, 0.98, 49), sync_on_compute=False)  # rank 0 alone
    for logits, mask, valid in predictions(module, loader, device):
        curve.update(torch.sigmoid(logits)[valid], mask[valid].int())
    return _best_f1(curve)


def _best_f1(curve: BinaryPrecisionRecallCurve) -> tuple[float, float]:
    precision, recall, thresholds = curve.compute()
    precision, recall = precision[:-1], recall[:-1]  # the last point is the (1, 0) end of the curve
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall).clamp_min(1e-12))  # no positives: 0
    best = int(torch.argmax(f1))
    return round(float(thresholds[best]), 4), float(f1[best])


@dataclass
class Calibration:
    """A calibrated threshold, the val F1 it gives, and the post-processing selection made with it."""

    threshold: float
    val_f1: float
    selection: Selection


def calibrate_postprocess(
    module: GlintModule,
    loader: DataLoader,
    device: torch.device | str,
    metric: str = "iou",
    iou_threshold: float = 0.25,
) -> Calibration:
    """One pass over `loader`: the threshold maximising pixel F1 (as calibrate_threshold), and the threshold and
    post-processing (min_size, fill_holes) maximising `metric` (iou or object_f1). Post-processing is kept only
    when it beats none; then its threshold is stored, else the F1 one (for iou, the same up to ties)."""
    check_metric(metric)
    curve = BinaryPrecisionRecallCurve(thresholds=torch.linspace(0.02, 0.98, 49), sync_on_compute=False)
    search = PostprocessSearch(iou_threshold=iou_threshold)
    for logits, mask, valid in predictions(module, loader, device):
        prob = torch.sigmoid(logits)
        curve.update(prob[valid], mask[valid].int())
        search.update(prob, mask, valid)
    selection = search.select(metric)
    if selection.kept or metric != "iou":
        return Calibration(selection.threshold, selection.metrics["f1"], selection)
    return Calibration(*_best_f1(curve), selection)


def write_threshold(
    path: str | Path,
    threshold: float,
    val_f1: float,
    weights: Mapping[str, Any] | None = None,
    postprocess: Mapping[str, Any] | None = None,
) -> None:
    """Store a calibrated threshold in a checkpoint (as its `threshold` hyper-parameter), atomically, with the
    weights it was calibrated with: `weights` ({"checkpoint": file name, "epoch", "global_step", "role"}, e.g. the
    best checkpoint's for last.ckpt), or this checkpoint's own when None. ckpt_info tells the two apart.
    `postprocess` ({min_size, fill_holes, and how they were chosen}) is stored beside it; eval and predict use it."""
    path = Path(path)
    ckpt = read_torch_file(path, "a .ckpt written by glint_lightning", "checkpoint")
    own = {"checkpoint": path.name, "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}
    ckpt["hyper_parameters"]["threshold"] = threshold
    ckpt["threshold_calibration"] = {"threshold": threshold, "val_f1": val_f1, "weights": dict(weights or own)}
    if postprocess is not None:
        ckpt["threshold_calibration"]["postprocess"] = dict(postprocess)
    atomic_torch_save(ckpt, path)
