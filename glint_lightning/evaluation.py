"""Evaluation beyond pixels: glints as connected components, matched one-to-one by IoU; and the probability
threshold that maximises validation F1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.checkpoint_io import atomic_torch_save
from glint_lightning.module import GlintModule

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def match_components(truth: np.ndarray, pred: np.ndarray, iou_threshold: float) -> tuple[int, int, int]:
    """(matched, predicted, true) glint counts for one binary mask pair; greedy one-to-one by IoU."""
    t_labels, n_t = ndimage.label(truth, structure=EIGHT_CONNECTED)
    p_labels, n_p = ndimage.label(pred, structure=EIGHT_CONNECTED)
    if n_t == 0 or n_p == 0:
        return 0, n_p, n_t
    overlap = np.bincount((t_labels * (n_p + 1) + p_labels).ravel(), minlength=(n_t + 1) * (n_p + 1))
    overlap = overlap.reshape(n_t + 1, n_p + 1)[1:, 1:]
    t_area = np.bincount(t_labels.ravel(), minlength=n_t + 1)[1:]
    p_area = np.bincount(p_labels.ravel(), minlength=n_p + 1)[1:]
    iou = overlap / (t_area[:, None] + p_area[None, :] - overlap)
    matched, used_t, used_p = 0, set(), set()
    for ti, pi in zip(*np.unravel_index(np.argsort(-iou, axis=None), iou.shape)):
        if iou[ti, pi] < iou_threshold:
            break
        if ti not in used_t and pi not in used_p:
            used_t.add(ti)
            used_p.add(pi)
            matched += 1
    return matched, n_p, n_t


@dataclass
class ObjectCounts:
    """Running glint-level counts; precision/recall/F1 over all tiles."""

    iou_threshold: float = 0.25
    matched: int = 0
    predicted: int = 0
    true: int = 0
    tiles_with_glints: int = field(default=0)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        for t, p in zip(truth, pred):
            m, n_p, n_t = match_components(t, p, self.iou_threshold)
            self.matched, self.predicted, self.true = self.matched + m, self.predicted + n_p, self.true + n_t
            self.tiles_with_glints += int(n_t > 0)

    def compute(self) -> dict[str, float]:
        precision = self.matched / self.predicted if self.predicted else float(self.true == 0)
        recall = self.matched / self.true if self.true else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "object/precision": precision,
            "object/recall": recall,
            "object/f1": f1,
            "object/true": float(self.true),
            "object/predicted": float(self.predicted),
            "object/matched": float(self.matched),
        }


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
    precision, recall, thresholds = curve.compute()
    precision, recall = precision[:-1], recall[:-1]  # the last point is the (1, 0) end of the curve
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall).clamp_min(1e-12))  # no positives: 0
    best = int(torch.argmax(f1))
    return round(float(thresholds[best]), 4), float(f1[best])


def write_threshold(path: str | Path, threshold: float, val_f1: float) -> None:
    """Store a calibrated threshold in a checkpoint (as its `threshold` hyper-parameter), atomically."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["threshold"] = threshold
    ckpt["threshold_calibration"] = {"threshold": threshold, "val_f1": val_f1}
    atomic_torch_save(ckpt, path)
