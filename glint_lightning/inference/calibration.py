"""Choosing the threshold and post-processing from data, and storing them in a checkpoint.

`calibrate_threshold`: the threshold maximising validation pixel F1. `PostprocessSearch` scores every (threshold,
fill_holes, min_size) of small grids in one streaming pass over probabilities, targets and validity: pixel and glint
counts add up over batches, tiles and folds (glint-cv), so nothing is held in memory but the counts. `Selection`
picks the best by pixel IoU or glint-level F1; post-processing is kept only when it beats no post-processing (each at
its own best threshold) on that data, by at least MIN_GAIN. Probabilities come from scoring.predict_loader, the
scoring path every tool shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.checkpoints.io import atomic_torch_save
from glint_lightning.checkpoints.reader import read_torch_file
from glint_lightning.inference.postprocess import PostProcess, fill_enclosed
from glint_lightning.metrics import COUNT_FIELDS, EIGHT_IN_PLANE, as_stack, glint_pairs, scores_from_counts
from glint_lightning.scoring import predict_loader
from glint_lightning.utils.errors import GlintError, OptionError

THRESHOLDS = tuple(round(0.02 * i, 2) for i in range(1, 50))  # 0.02 ... 0.98, as calibrate_threshold's grid
MIN_SIZES = (0, 2, 3, 4, 6, 8, 12, 16)
FILL_HOLES = (False, True)
OPTIMIZED_METRICS = ("iou", "object_f1")  # what a selection may maximise
MIN_GAIN = 1e-4  # post-processing is kept when it adds at least this to the metric (what 4-digit reports show)
REPORTED = ("iou", "f1", "precision", "recall", "object_precision", "object_recall", "object_f1")


class PostprocessSearch:
    """Pixel and glint counts at every (threshold, fill_holes, min_size) of the grids, accumulated over `update`s.

    Each update labels the batch's mask once per (threshold, fill_holes); every min_size then only drops the
    glints under it, so the counts for all min_sizes come from that one labelling.
    """

    def __init__(
        self,
        thresholds: tuple[float, ...] = THRESHOLDS,
        min_sizes: tuple[int, ...] = MIN_SIZES,
        fill_holes: tuple[bool, ...] = FILL_HOLES,
        iou_threshold: float = 0.25,
    ) -> None:
        if 0 not in min_sizes or False not in fill_holes:
            raise OptionError("the post-processing grid must hold min_size 0 and fill_holes false (no post-processing)")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.min_sizes = tuple(int(m) for m in min_sizes)
        self.fill_holes = tuple(bool(f) for f in fill_holes)
        self.iou_threshold = float(iou_threshold)
        self.counts = np.zeros((len(self.thresholds), len(self.fill_holes), len(self.min_sizes), 6), np.int64)
        self.tiles = 0

    def update(self, prob: Any, target: Any, valid: Any = None) -> None:
        """prob: probabilities (B, [1,] H, W); target: the {0, 1} mask; valid: the pixels that count (numpy arrays
        or tensors)."""
        shape = tuple(prob.shape)
        prob = as_stack(prob, shape)
        valid = np.ones(prob.shape, bool) if valid is None else as_stack(valid, shape).astype(bool)
        truth = (as_stack(target, shape) > 0.5) & valid
        truth_labels = ndimage.label(truth, EIGHT_IN_PLANE)
        self.tiles += prob.shape[0]
        for i, threshold in enumerate(self.thresholds):
            above = (prob >= threshold) & valid
            for j, fill in enumerate(self.fill_holes):
                pred = (fill_enclosed(above) & valid) if fill else above
                pairs = glint_pairs(truth, pred, self.iou_threshold, truth_labels)
                for k, min_size in enumerate(self.min_sizes):
                    kept = pairs.pred_size >= min_size
                    kept[0] = False
                    counts = (pairs.tp[kept].sum(), pairs.pred_size[kept].sum(), pairs.true_px)
                    self.counts[i, j, k] += (*counts, pairs.matches(kept), int(kept.sum()), pairs.n_true)

    def merge(self, other: PostprocessSearch) -> PostprocessSearch:
        """A new search holding both searches' counts (same grids)."""
        grids = ("thresholds", "min_sizes", "fill_holes", "iou_threshold")
        if any(getattr(self, g) != getattr(other, g) for g in grids):
            raise GlintError("post-processing searches over different grids cannot be merged")
        merged = PostprocessSearch(self.thresholds, self.min_sizes, self.fill_holes, self.iou_threshold)
        merged.counts = self.counts + other.counts
        merged.tiles = self.tiles + other.tiles
        return merged

    def index(self, threshold: float, post: PostProcess) -> tuple[int, int, int]:
        """Grid indices of a (threshold, post-processing); a min_size of 1 is the grid's 0."""
        min_size = post.min_size if post.min_size > 1 else 0
        try:
            i = min(range(len(self.thresholds)), key=lambda k: abs(self.thresholds[k] - threshold))
            if abs(self.thresholds[i] - threshold) > 1e-6:
                raise ValueError
            return i, self.fill_holes.index(post.fill_holes), self.min_sizes.index(min_size)
        except ValueError:
            raise GlintError(f"threshold {threshold} with {post.describe()} is not on the search grid") from None

    def metrics_at(self, threshold: float, post: PostProcess) -> dict[str, float]:
        """Every score in REPORTED at one grid point, and the glint counts."""
        counts = self.counts[self.index(threshold, post)]
        out = {k: float(v) for k, v in scores_from_counts(counts).items()}
        out.update({f"object_{k}": int(counts[COUNT_FIELDS.index(k)]) for k in ("true", "predicted", "matched")})
        return out

    def select(self, metric: str = "iou", min_gain: float = MIN_GAIN) -> Selection:
        """The threshold and post-processing maximising `metric` (iou or object_f1); post-processing only when it
        beats the best threshold without it by at least `min_gain`."""
        check_optimized_metric(metric)
        score = scores_from_counts(self.counts)[metric]
        off_f, off_m = self.fill_holes.index(False), self.min_sizes.index(0)
        without = score[:, off_f, off_m]
        base = int(np.argmax(without))
        active = score.copy()
        active[:, off_f, off_m] = -np.inf
        for k, m in enumerate(self.min_sizes):
            if m <= 1:  # min_size 1 removes nothing: not a post-processing of its own
                active[:, off_f, k] = -np.inf
        i, j, k = np.unravel_index(int(np.argmax(active)), active.shape)
        beats = bool(active[i, j, k] >= without[base] + min_gain)
        post = PostProcess(self.min_sizes[k], self.fill_holes[j]) if beats else PostProcess()
        threshold = self.thresholds[i] if beats else self.thresholds[base]
        return Selection(
            metric=metric,
            threshold=threshold,
            postprocess=post,
            score=float(active[i, j, k] if beats else without[base]),
            threshold_without=self.thresholds[base],
            score_without=float(without[base]),
            best_postprocess=PostProcess(self.min_sizes[k], self.fill_holes[j]),
            best_postprocess_score=float(active[i, j, k]),
            tiles=self.tiles,
            metrics=self.metrics_at(threshold, post),
        )


def check_optimized_metric(metric: str) -> None:
    """Refuse (one line) a metric a selection cannot maximise."""
    if metric not in OPTIMIZED_METRICS:
        raise OptionError(f"optimized_metric={metric}; use iou (pixel IoU) or object_f1 (glint-level F1)")


@dataclass
class Selection:
    """A chosen threshold and post-processing, what it scores, and what the best threshold scores without it."""

    metric: str
    threshold: float
    postprocess: PostProcess
    score: float
    threshold_without: float
    score_without: float
    best_postprocess: PostProcess  # the best post-processing on the grid, kept or not
    best_postprocess_score: float
    tiles: int
    metrics: dict[str, float] = field(default_factory=dict)  # every score at the chosen point

    @property
    def kept(self) -> bool:
        return self.postprocess.active

    def describe(self) -> str:
        """One line saying what was chosen and why."""
        if self.kept:
            return (
                f"threshold {self.threshold:.2f}, post-processing {self.postprocess.describe()}: {self.metric} "
                f"{self.score:.4f} vs {self.score_without:.4f} without it (at threshold {self.threshold_without:.2f})"
                f", on {self.tiles} tiles"
            )
        return (
            f"threshold {self.threshold:.2f}, post-processing off: none on the grid beat no post-processing "
            f"({self.metric} {self.score_without:.4f}; the best, {self.best_postprocess.describe()}, scored "
            f"{self.best_postprocess_score:.4f}), on {self.tiles} tiles"
        )

    def record(self) -> dict[str, Any]:
        """Plain data: the post-processing with how it was chosen (stored in checkpoints and ensemble files)."""
        return {
            **self.postprocess.as_dict(),
            "metric": self.metric,
            "score": round(self.score, 6),
            "threshold_without": self.threshold_without,
            "score_without": round(self.score_without, 6),
            "tiles": self.tiles,
        }


def calibrate_threshold(module: nn.Module, loader: DataLoader, device: torch.device | str) -> tuple[float, float]:
    """The threshold in (0, 1) that maximises pixel F1 over the valid pixels of `loader`, and that F1."""
    curve = _f1_curve()
    for prob, mask, valid in predict_loader(module, loader, device):
        curve.update(prob[valid], mask[valid].int())
    return _best_f1(curve)


def _f1_curve() -> BinaryPrecisionRecallCurve:
    """Precision and recall at the THRESHOLDS grid, on this rank alone (calibration runs on rank 0)."""
    return BinaryPrecisionRecallCurve(thresholds=torch.linspace(0.02, 0.98, 49), sync_on_compute=False)


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
    module: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    metric: str = "iou",
    iou_threshold: float = 0.25,
) -> Calibration:
    """One pass over `loader`: the threshold maximising pixel F1 (as calibrate_threshold), and the threshold and
    post-processing (min_size, fill_holes) maximising `metric` (iou or object_f1). Post-processing is kept only
    when it beats none; then its threshold is stored, else the F1 one (for iou, the same up to ties)."""
    check_optimized_metric(metric)
    curve = _f1_curve()
    search = PostprocessSearch(iou_threshold=iou_threshold)
    for prob, mask, valid in predict_loader(module, loader, device):
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
