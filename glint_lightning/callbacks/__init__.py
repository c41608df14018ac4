"""Callbacks the framework adds to Lightning's own (ModelCheckpoint, LearningRateMonitor, EarlyStopping...)."""

from glint_lightning.callbacks.images import PredictionImages
from glint_lightning.callbacks.optimizer_state import OptimizerStateCallback

__all__ = ["OptimizerStateCallback", "PredictionImages"]
