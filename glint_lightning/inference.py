"""Full-frame inference: overlapping windows of the training tile size blended with a gaussian importance map
(as nnU-Net does, so window seams do not show), or one padded forward pass over the whole frame."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from glint_lightning.module import GlintModule


def gaussian_importance(height: int, width: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(height, width) weights peaking at 1 in the centre, sigma = sigma_scale x the window; never exactly 0."""
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    gy = torch.exp(-0.5 * (ys / max(sigma_scale * height, 1e-6)) ** 2)
    gx = torch.exp(-0.5 * (xs / max(sigma_scale * width, 1e-6)) ** 2)
    w = gy[:, None] * gx[None, :]
    w = w / w.max()
    return w.clamp_min(w[w > 0].min()).float()


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` px covering `length` px with about `overlap` of each window shared."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


class FramePredictor:
    """Glint probabilities for whole depth frames from a trained module.

    Args:
        module: a GlintModule (in eval mode on `device`).
        window: (h, w) of the windows, normally the training tile size.
        overlap: share of a window overlapping its neighbour (0.5 by default).
        batch_size: windows per forward pass.
        sigma_scale: gaussian sigma as a share of the window (0.125 as nnU-Net).
        mode: window (blended overlapping windows) or full (one forward pass over the padded frame).
        precision: 32 or bf16 (autocast).
    """

    def __init__(
        self,
        module: GlintModule,
        window: tuple[int, int],
        overlap: float = 0.5,
        batch_size: int = 16,
        sigma_scale: float = 0.125,
        mode: str = "window",
        precision: str = "32",
    ) -> None:
        if mode not in ("window", "full"):
            raise ValueError(f"mode={mode}; use window or full")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap={overlap}; use a value in [0, 1)")
        self.module, self.window, self.overlap = module.eval(), tuple(window), overlap
        self.batch_size, self.mode = batch_size, mode
        self.device = module.depth_mean.device
        self.weights = gaussian_importance(*self.window, sigma_scale).to(self.device)
        dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[str(precision)]
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype is not None else (lambda: nullcontext())
        )

    def _logits(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.module(depth, valid).float()

    @torch.no_grad()
    def __call__(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """depth (H, W) in mm and valid (H, W) bool -> probability (H, W) float32 on the CPU."""
        depth, valid = depth.to(self.device, torch.float32), valid.to(self.device)
        if self.mode == "full":
            return torch.sigmoid(self._logits(depth[None, None], valid[None, None]))[0, 0].cpu()
        height, width = depth.shape
        wh, ww = self.window
        pad_h, pad_w = max(0, wh - height), max(0, ww - width)  # frames smaller than a window
        if pad_h or pad_w:
            depth = torch.nn.functional.pad(depth[None, None], (0, pad_w, 0, pad_h), mode="replicate")[0, 0]
            valid = torch.nn.functional.pad(valid, (0, pad_w, 0, pad_h), value=False)
        total = torch.zeros_like(depth)
        norm = torch.zeros_like(depth)
        corners = [
            (y, x)
            for y in window_starts(depth.shape[0], wh, self.overlap)
            for x in window_starts(depth.shape[1], ww, self.overlap)
        ]
        for i in range(0, len(corners), self.batch_size):
            batch = corners[i : i + self.batch_size]
            d = torch.stack([depth[y : y + wh, x : x + ww] for y, x in batch])[:, None]
            v = torch.stack([valid[y : y + wh, x : x + ww] for y, x in batch])[:, None]
            prob = torch.sigmoid(self._logits(d, v))[:, 0]
            for (y, x), p in zip(batch, prob):
                total[y : y + wh, x : x + ww] += p * self.weights
                norm[y : y + wh, x : x + ww] += self.weights
        return (total / norm)[:height, :width].cpu()
