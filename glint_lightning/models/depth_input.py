"""What a network sees: depth normalised with the training data's statistics, invalid pixels set to 0 (the mean).

One module, used by GlintModule and by the exported TorchScript/ONNX models, so training, inference and deployment
feed the network the same input. The statistics are buffers: they travel in every state dict.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthInput(nn.Module):
    """depth (B, 1, H, W) in mm and valid (B, 1, H, W) bool -> normalised depth, 0 where invalid."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def set_statistics(self, mean: float, std: float) -> None:
        self.mean.fill_(mean)
        self.std.fill_(std)

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = (depth - self.mean) / self.std
        return torch.where(valid, x, torch.zeros_like(x))
