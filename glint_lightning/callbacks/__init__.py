"""Callbacks the framework adds to Lightning's own (ModelCheckpoint, LearningRateMonitor, EarlyStopping...)."""

from glint_lightning.callbacks.feature_maps import FeatureMaps
from glint_lightning.callbacks.finetuning import FreezeParts
from glint_lightning.callbacks.images import PredictionImages
from glint_lightning.callbacks.interrupt import CheckpointOnInterrupt
from glint_lightning.callbacks.last_checkpoint import LastCheckpoint
from glint_lightning.callbacks.optimizer_state import OptimizerStateCallback
from glint_lightning.callbacks.schedule import ResumeSchedule

__all__ = [
    "CheckpointOnInterrupt",
    "FeatureMaps",
    "FreezeParts",
    "LastCheckpoint",
    "OptimizerStateCallback",
    "PredictionImages",
    "ResumeSchedule",
]
