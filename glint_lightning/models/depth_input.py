"""What a network sees: depth clipped to a range, normalised with the training data's statistics, invalid pixels set
to 0 (the mean).

One module, used by GlintModule and by the exported TorchScript/ONNX models, so training, inference and deployment
feed the network the same input. The clip range and the statistics are buffers: they travel in every state dict.
The clip (`data.depth_clip`, e.g. the 0.5th/99.5th percentiles) keeps a few far-off depths (sensor outliers) from
stretching the std and from reaching the network as extreme values; -inf/+inf is no clip.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DepthInput(nn.Module):
    """depth (B, 1, H, W) in mm and valid (B, 1, H, W) bool -> clipped, normalised depth, 0 where invalid."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, low: float = -math.inf, high: float = math.inf) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.register_buffer("low", torch.tensor(float(low)))
        self.register_buffer("high", torch.tensor(float(high)))

    def set_statistics(self, mean: float, std: float) -> None:
        self.mean.fill_(mean)
        self.std.fill_(std)

    def set_clip(self, clip: tuple[float, float] | None) -> None:
        """Clip depth to [low, high] mm before normalising; None: no clip."""
        low, high = clip if clip is not None else (-math.inf, math.inf)
        self.low.fill_(float(low))
        self.high.fill_(float(high))

    def clip_range(self) -> tuple[float, float] | None:
        """(low, high) mm, or None when depth is not clipped."""
        low, high = float(self.low), float(self.high)
        return None if math.isinf(low) and math.isinf(high) else (low, high)

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = (torch.minimum(torch.maximum(depth, self.low), self.high) - self.mean) / self.std
        return torch.where(valid, x, torch.zeros_like(x))
