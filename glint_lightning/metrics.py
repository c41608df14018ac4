"""The metrics the framework logs, declared once: names, direction, and the torchmetrics class behind each.

Config options that name a metric (`optimized_metric`, a checkpoint or early-stopping `monitor`) are checked
against this table at start-up, so a typo fails before training rather than after the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# In-plane structures for (N, H, W) stacks: components never reach across tiles.
EIGHT_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
EIGHT_IN_PLANE[1] = True
FOUR_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
FOUR_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def as_stack(a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An array (or tensor) broadcast to `shape` (..., H, W), as a contiguous numpy (N, H, W) stack."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(np.broadcast_to(a, shape).reshape(-1, *shape[-2:]))


@dataclass
class GlintPairs:
    """The glints (8-connected components, per tile) of a true and a predicted (N, H, W) stack, and the candidate
    matches: (true, predicted) pairs overlapping with IoU >= the threshold, best IoU first."""

    true_px: int
    n_true: int
    pred_size: np.ndarray  # pixels per predicted label (label 0 is the background)
    tp: np.ndarray  # true pixels per predicted label
    pair_t: np.ndarray
    pair_p: np.ndarray

    def matches(self, kept: np.ndarray | None = None) -> int:
        """Matches of the one-to-one greedy matching (by IoU, best first) among the predicted glints `kept`
        (a boolean per label; all when None). A pair whose glints are in no other pair matches whatever the order;
        only the rest go through the greedy loop."""
        pair_t, pair_p = self.pair_t, self.pair_p
        if kept is not None:
            pair_t, pair_p = pair_t[kept[pair_p]], pair_p[kept[pair_p]]
        if len(pair_t) == 0:
            return 0
        alone = (np.bincount(pair_t)[pair_t] == 1) & (np.bincount(pair_p)[pair_p] == 1)
        used_t: set[int] = set()
        used_p: set[int] = set()
        for t, p in zip(pair_t[~alone].tolist(), pair_p[~alone].tolist()):
            if t not in used_t and p not in used_p:
                used_t.add(t)
                used_p.add(p)
        return int(alone.sum()) + len(used_t)


def glint_pairs(truth: np.ndarray, pred: np.ndarray, iou_threshold: float, truth_labels: Any = None) -> GlintPairs:
    """Label both boolean (N, H, W) stacks (tile by tile) and list the candidate matches. `truth_labels`
    ((labels, count) of `truth`) saves labelling the truth again when it is scored against many predictions."""
    t_labels, n_true = truth_labels or ndimage.label(truth, EIGHT_IN_PLANE)
    t_area = np.bincount(t_labels[truth], minlength=n_true + 1)
    p_labels, n_pred = ndimage.label(pred, EIGHT_IN_PLANE)
    labels_px = p_labels[pred]
    size = np.bincount(labels_px, minlength=n_pred + 1)
    tp = np.bincount(labels_px, weights=truth[pred].astype(np.float64), minlength=n_pred + 1).astype(np.int64)
    both = pred & truth
    key = t_labels[both].astype(np.int64) * (n_pred + 1) + p_labels[both]
    pairs, overlap = np.unique(key, return_counts=True)
    pair_t, pair_p = pairs // (n_pred + 1), pairs % (n_pred + 1)
    iou = overlap / (t_area[pair_t] + size[pair_p] - overlap)
    ok = iou >= iou_threshold
    order = np.argsort(-iou[ok], kind="stable")
    return GlintPairs(int(truth.sum()), n_true, size, tp, pair_t[ok][order], pair_p[ok][order])


def match_components(truth: Any, pred: Any, iou_threshold: float) -> tuple[int, int, int]:
    """(matched, predicted, true) glint counts of boolean masks (..., H, W), tile by tile; greedy one-to-one by
    IoU."""
    shape = tuple(truth.shape)
    pairs = glint_pairs(as_stack(truth, shape).astype(bool), as_stack(pred, shape).astype(bool), iou_threshold)
    return pairs.matches(), len(pairs.pred_size) - 1, pairs.n_true


def scores_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel IoU, F1, precision, recall and glint-level precision, recall, F1 from counts (..., 6) in COUNT_FIELDS
    order, with the conventions of the logged metrics (pixel scores 0 when undefined; nothing predicted is
    precision 1 only when there was nothing to find; nothing to find is recall 1)."""
    c = np.asarray(counts, dtype=np.float64)
    tp, pred, true, matched, n_pred, n_true = (c[..., i] for i in range(6))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "iou": np.where(pred + true - tp > 0, tp / (pred + true - tp), 0.0),
            "f1": np.where(pred + true > 0, 2 * tp / (pred + true), 0.0),
            "precision": np.where(pred > 0, tp / pred, 0.0),
            "recall": np.where(true > 0, tp / true, 0.0),
            "object_precision": np.where(n_pred > 0, matched / n_pred, (n_true == 0).astype(np.float64)),
            "object_recall": np.where(n_true > 0, matched / n_true, 1.0),
        }
        p, r = out["object_precision"], out["object_recall"]
        out["object_f1"] = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return out


COUNT_FIELDS = ("tp_px", "predicted_px", "true_px", "matched", "predicted", "true")


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
        truth, pred = target.bool() & valid, (preds >= self.threshold) & valid
        matched, predicted, true = match_components(truth, pred, self.iou_threshold)
        self.matched += matched
        self.predicted += predicted
        self.true += true

    def compute(self) -> dict[str, torch.Tensor]:
        """precision, recall, f1 and the counts. Nothing predicted scores precision 1 only when there was nothing
        to find; nothing to find scores recall 1."""
        counts = [0, 0, 0, int(self.matched), int(self.predicted), int(self.true)]
        scores = scores_from_counts(np.array(counts))
        out = {k: float(scores[f"object_{k}"]) for k in ("precision", "recall", "f1")}
        out.update(true=counts[5], predicted=counts[4], matched=counts[3])
        return {k: torch.tensor(float(v), device=self.matched.device) for k, v in out.items()}
