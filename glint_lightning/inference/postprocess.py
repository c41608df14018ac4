"""Post-processing of binary glint masks, and choosing it (with the threshold) from data.

- `min_size`: predicted glints smaller than this many pixels are removed (glints are 8-connected components, as
  the glint-level metrics count them); 0 (or 1) keeps all.
- `fill_holes`: background enclosed by a glint (not reachable from the tile's border through 4-connected
  background) becomes glint.

Both act per tile or frame, after the threshold, fill_holes first; invalid pixels stay background, as without
post-processing.

`PostprocessSearch` scores every (threshold, fill_holes, min_size) of small grids in one streaming pass over
probabilities, targets and validity: pixel and glint counts add up over batches, tiles and folds, so nothing is
held in memory but the counts. `Selection` picks the best by pixel IoU or glint-level F1; post-processing is kept
only when it beats no post-processing (each at its own best threshold) on that data, by at least MIN_GAIN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from glint_lightning.utils.errors import GlintError, OptionError

# In-plane structures for (N, H, W) stacks: components never reach across tiles.
_EIGHT = np.zeros((3, 3, 3), dtype=bool)
_EIGHT[1] = True
_FOUR = np.zeros((3, 3, 3), dtype=bool)
_FOUR[1] = ndimage.generate_binary_structure(2, 1)

THRESHOLDS = tuple(round(0.02 * i, 2) for i in range(1, 50))  # 0.02 ... 0.98, as calibrate_threshold's grid
MIN_SIZES = (0, 2, 3, 4, 6, 8, 12, 16)
FILL_HOLES = (False, True)
METRICS = ("iou", "object_f1")  # what a selection may maximise
MIN_GAIN = 1e-4  # post-processing is kept when it adds at least this to the metric (what 4-digit reports show)
REPORTED = ("iou", "f1", "precision", "recall", "object_precision", "object_recall", "object_f1")


@dataclass(frozen=True)
class PostProcess:
    """What is done to a thresholded mask; the default does nothing."""

    min_size: int = 0
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int | np.integer) or self.min_size < 0:
            raise OptionError(f"postprocess.min_size={self.min_size}; use a whole number of pixels >= 0 (0 = keep all)")
        if not isinstance(self.fill_holes, bool | np.bool_):
            raise OptionError(f"postprocess.fill_holes={self.fill_holes}; use true or false")
        object.__setattr__(self, "min_size", int(self.min_size))
        object.__setattr__(self, "fill_holes", bool(self.fill_holes))

    @property
    def active(self) -> bool:
        """Whether it changes any mask (every component has at least one pixel, so min_size 1 removes nothing)."""
        return self.min_size > 1 or self.fill_holes

    def as_dict(self) -> dict[str, Any]:
        return {"min_size": self.min_size, "fill_holes": self.fill_holes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "postprocess") -> PostProcess:
        """From plain data ({min_size, fill_holes}, other keys ignored); None or {} is no post-processing."""
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise GlintError(f"{source}: postprocess is {data!r}; expected {{min_size: <int>, fill_holes: <bool>}}")
        try:
            return cls(int(data.get("min_size") or 0), bool(data.get("fill_holes") or False))
        except (TypeError, ValueError) as err:
            raise GlintError(f"{source}: postprocess {dict(data)} is not valid ({err})") from None

    def describe(self) -> str:
        """`min_size=4 px, fill_holes` / `off`."""
        parts = ([f"min_size={self.min_size} px"] if self.min_size > 1 else []) + (["fill_holes"] * self.fill_holes)
        return ", ".join(parts) or "off"

    def apply(self, mask: Any, valid: Any = None) -> Any:
        """The post-processed mask, of mask's type (numpy array or tensor, on its device) and shape (..., H, W)."""
        if isinstance(mask, torch.Tensor):
            v = valid.detach().cpu().numpy() if isinstance(valid, torch.Tensor) else valid
            out = postprocess_mask(mask.detach().cpu().numpy(), v, self.min_size, self.fill_holes)
            return torch.from_numpy(out).to(mask.device)
        return postprocess_mask(mask, valid, self.min_size, self.fill_holes)


def _stack(a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An array of `shape` (..., H, W) as a contiguous (N, H, W) stack."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(a), shape).reshape(-1, *shape[-2:]))


def postprocess_mask(mask: Any, valid: Any = None, min_size: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Boolean (..., H, W): mask on valid pixels, holes filled (fill_holes), glints under min_size px removed."""
    m = np.asarray(mask).astype(bool)
    shape = m.shape
    stack = m.reshape(-1, *shape[-2:]).copy()
    v = None if valid is None else _stack(np.asarray(valid).astype(bool), shape)
    if v is not None:
        stack &= v
    if fill_holes:
        stack = _fill_holes(stack)
        if v is not None:
            stack &= v
    if min_size > 1:
        labels, n = ndimage.label(stack, _EIGHT)
        keep = np.bincount(labels[stack], minlength=n + 1) >= min_size
        keep[0] = False
        stack = keep[labels]
    return stack.reshape(shape)


def _numpy(a: Any) -> np.ndarray:
    return a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _fill_holes(stack: np.ndarray) -> np.ndarray:
    """Background not reachable from its tile's border through 4-connected background becomes foreground (as
    scipy's binary_fill_holes per tile, from one labelling of the stack's background)."""
    labels, n = ndimage.label(~stack, _FOUR)
    if n == 0:
        return stack
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # the foreground (label 0) stays as it is
    return stack | ~outside[labels]


def _greedy_matches(pair_t: np.ndarray, pair_p: np.ndarray) -> int:
    """Matches of the one-to-one greedy matching over candidate pairs sorted by IoU (best first), as
    metrics.match_components matches tile by tile (pairs never cross tiles). A pair whose glints are in no other
    pair matches whatever the order; only the rest go through the greedy loop."""
    if len(pair_t) == 0:
        return 0
    once_t = np.bincount(pair_t)[pair_t] == 1
    once_p = np.bincount(pair_p)[pair_p] == 1
    alone = once_t & once_p
    used_t: set[int] = set()
    used_p: set[int] = set()
    for t, p in zip(pair_t[~alone].tolist(), pair_p[~alone].tolist()):
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
    return int(alone.sum()) + len(used_t)


FIELDS = ("tp_px", "predicted_px", "true_px", "matched", "predicted", "true")


def scores_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel IoU, F1, precision, recall and glint-level precision, recall, F1 from counts (..., 6) in FIELDS order,
    with the conventions of the logged metrics (pixel scores 0 when undefined; nothing predicted is precision 1
    only when there was nothing to find; nothing to find is recall 1)."""
    c = counts.astype(np.float64)
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
        prob = _numpy(prob)
        shape = prob.shape
        prob = prob.reshape(-1, *shape[-2:])
        valid = np.ones(prob.shape, bool) if valid is None else _stack(_numpy(valid).astype(bool), shape)
        truth = _stack(_numpy(target) > 0.5, shape) & valid
        t_labels, n_true = ndimage.label(truth, _EIGHT)
        t_area = np.bincount(t_labels[truth], minlength=n_true + 1)
        true_px = int(truth.sum())
        self.tiles += prob.shape[0]
        for i, threshold in enumerate(self.thresholds):
            above = (prob >= threshold) & valid
            for j, fill in enumerate(self.fill_holes):
                pred = (_fill_holes(above) & valid) if fill else above
                self.counts[i, j] += self._counts(pred, truth, t_labels, t_area, n_true, true_px)

    def _counts(
        self, pred: np.ndarray, truth: np.ndarray, t_labels: np.ndarray, t_area: np.ndarray, n_true: int, true_px: int
    ) -> np.ndarray:
        """(len(min_sizes), 6) counts of one binary prediction."""
        p_labels, n_pred = ndimage.label(pred, _EIGHT)
        labels_px = p_labels[pred]
        size = np.bincount(labels_px, minlength=n_pred + 1)
        tp = np.bincount(labels_px, weights=truth[pred].astype(np.float64), minlength=n_pred + 1).astype(np.int64)
        both = pred & truth
        key = t_labels[both].astype(np.int64) * (n_pred + 1) + p_labels[both]
        pairs, overlap = np.unique(key, return_counts=True)
        pair_t, pair_p = pairs // (n_pred + 1), pairs % (n_pred + 1)
        iou = overlap / (t_area[pair_t] + size[pair_p] - overlap)
        ok = iou >= self.iou_threshold
        order = np.argsort(-iou[ok], kind="stable")
        pair_t, pair_p = pair_t[ok][order], pair_p[ok][order]
        out = np.zeros((len(self.min_sizes), 6), np.int64)
        for k, min_size in enumerate(self.min_sizes):
            kept = size >= min_size
            kept[0] = False
            candidate = kept[pair_p]
            matched = _greedy_matches(pair_t[candidate], pair_p[candidate])
            out[k] = (tp[kept].sum(), size[kept].sum(), true_px, matched, int(kept.sum()), n_true)
        return out

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
        out.update({f"object_{k}": int(counts[FIELDS.index(k)]) for k in ("true", "predicted", "matched")})
        return out

    def select(self, metric: str = "iou", min_gain: float = MIN_GAIN) -> Selection:
        """The threshold and post-processing maximising `metric` (iou or object_f1); post-processing only when it
        beats the best threshold without it by at least `min_gain`."""
        check_metric(metric)
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


def check_metric(metric: str) -> None:
    if metric not in METRICS:
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


def resolve_postprocess(option: Mapping[str, Any] | None, stored: PostProcess) -> PostProcess:
    """The command's `postprocess.*` options over the stored post-processing: a null option keeps the stored value."""
    option = option or {}
    min_size, fill_holes = option.get("min_size"), option.get("fill_holes")
    return PostProcess(
        stored.min_size if min_size is None else min_size, stored.fill_holes if fill_holes is None else fill_holes
    )


def checkpoint_postprocess(ckpt: Mapping[str, Any], source: str = "checkpoint") -> PostProcess:
    """The post-processing a loaded checkpoint records (stored by glint-eval calibrate=true beside the threshold)."""
    return PostProcess.from_dict((ckpt.get("threshold_calibration") or {}).get("postprocess"), source)


def stored_postprocess(path: str | Path) -> PostProcess:
    """The post-processing a model file records: a .ckpt's calibration, an ensemble file's; exported files (.pth,
    .safetensors) record none."""
    from glint_lightning.checkpoints.reader import load_checkpoint
    from glint_lightning.inference.ensemble import is_ensemble_file, read_ensemble

    path = Path(path).expanduser()
    if is_ensemble_file(path):
        return read_ensemble(path).postprocess
    if path.suffix == ".ckpt":
        return checkpoint_postprocess(load_checkpoint(path), str(path))
    return PostProcess()
