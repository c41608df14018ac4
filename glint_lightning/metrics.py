"""The metrics the framework logs, declared once: names, direction, and the torchmetrics class behind each.

Config options that name a metric (`optimized_metric`, a checkpoint or early-stopping `monitor`) are checked
against this table at start-up, so a typo fails before training rather than after the first epoch.
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
)

from glint_lightning.errors import GlintError

# name -> (class, mode): scored on valid pixels only, for the val and test splits.
PIXEL_METRICS = {
    "iou": (BinaryJaccardIndex, "max"),
    "f1": (BinaryF1Score, "max"),
    "precision": (BinaryPrecision, "max"),
    "recall": (BinaryRecall, "max"),
    "ap": (BinaryAveragePrecision, "max"),
}
EVAL_STAGES = ("val", "test")


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
    return names


def check_metric(option: str, name: str, mode: str | None = None) -> None:
    """Fail with one line if `name` is not a logged metric, or `mode` points the wrong way."""
    known = logged_metrics()
    if name not in known:
        raise GlintError(f"{option}={name} is not a logged metric; use one of {sorted(known)}")
    if mode is not None and mode != known[name]:
        raise GlintError(f"{option}: {name} improves towards '{known[name]}', not '{mode}'; set mode={known[name]}")
