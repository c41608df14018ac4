"""The metrics the framework logs, declared once: names, direction, and the torchmetrics class behind each.

Config options that name a metric (`optimized_metric`, a checkpoint or early-stopping `monitor`) are checked
against this table at start-up, so a typo fails before training rather than after the first epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
)

from glint_lightning.utils.errors import GlintError

# name -> (class, mode): scored on valid pixels only, for the val and test splits.
PIXEL_METRICS = {
    "iou": (BinaryJaccardIndex, "max"),
    "f1": (BinaryF1Score, "max"),
    "precision": (BinaryPrecision, "max"),
    "recall": (BinaryRecall, "max"),
    "ap": (BinaryAveragePrecision, "max"),
}
EVAL_STAGES = ("val", "test")
# name -> mode: glint-level scores, for the test stage (`<stage>/object_<name>`); see ObjectMetric.
OBJECT_METRICS = {"precision": "max", "recall": "max", "f1": "max"}
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def pixel_metrics(stage: str, threshold: float, ap_bins: int | None) -> MetricCollection:
    """A fresh collection for one stage; AP uses `ap_bins` thresholds (constant memory) or exact when None."""
    metrics = {}
    for name, (cls, _) in PIXEL_METRICS.items():
        metrics[name] = cls(thresholds=ap_bins) if name == "ap" else cls(threshold=threshold)
    return MetricCollection(metrics, prefix=f"{stage}/")


def logged_metrics() -> dict[str, str]:
    """Every metric name the module logs, with the direction in which it improves."""
    names = {"train/loss": "min"}
    for stage in EVAL_STAGES:
        names[f"{stage}/loss"] = "min"
        names.update({f"{stage}/{m}": mode for m, (_, mode) in PIXEL_METRICS.items()})
    names.update({f"test/object_{m}": mode for m, mode in OBJECT_METRICS.items()})
    return names


def check_metric(option: str, name: str, mode: str | None = None) -> None:
    """Fail with one line if `name` is not a logged metric, or `mode` points the wrong way."""
    known = logged_metrics()
    if name not in known:
        raise GlintError(f"{option}={name} is not a logged metric; use one of {sorted(known)}")
    if mode is not None and mode != known[name]:
        raise GlintError(f"{option}: {name} improves towards '{known[name]}', not '{mode}'; set mode={known[name]}")


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


class ObjectMetric(Metric):
    """Glint-level precision, recall and F1: glints are the 8-connected components of each tile's mask, and a
    predicted glint matches at most one true glint, with IoU >= `iou_threshold` (see match_components).

    The states are three sum-reduced counts, so under DDP each rank labels its own tiles and `compute()` adds the
    counts over ranks. Labelling runs on the CPU (scipy), tile by tile.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    matched: torch.Tensor
    predicted: torch.Tensor
    true: torch.Tensor

    def __init__(self, threshold: float = 0.5, iou_threshold: float = 0.25, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.threshold, self.iou_threshold = threshold, iou_threshold
        for name in ("matched", "predicted", "true"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """preds: probabilities (B, [1,] H, W); target: the {0, 1} mask; valid: pixels that count (invalid ones are
        neither glint nor background in either mask)."""
        valid = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.bool()
        size = target.shape[-2:]
        truth = (target.bool() & valid).reshape(-1, *size).cpu().numpy()
        pred = ((preds >= self.threshold) & valid).reshape(-1, *size).cpu().numpy()
        counts = np.zeros(3, dtype=np.int64)
        for t, p in zip(truth, pred):
            counts += match_components(t, p, self.iou_threshold)
        self.matched += int(counts[0])
        self.predicted += int(counts[1])
        self.true += int(counts[2])

    def compute(self) -> dict[str, torch.Tensor]:
        """precision, recall, f1 and the counts. Nothing predicted scores precision 1 only when there was nothing
        to find; nothing to find scores recall 1."""
        m, p, t = self.matched.float(), self.predicted.float(), self.true.float()  # exact below 2**24 glints
        precision = torch.where(p > 0, m / p.clamp_min(1), (t == 0).float())
        recall = torch.where(t > 0, m / t.clamp_min(1), torch.ones_like(m))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
        return {"precision": precision, "recall": recall, "f1": f1, "true": t, "predicted": p, "matched": m}
