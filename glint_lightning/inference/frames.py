"""Full-frame inference: overlapping windows of the training tile size blended with a gaussian importance map
(as nnU-Net does, so window seams do not show), or one padded forward pass over the whole frame; either with
test-time augmentation (flips, 90-degree rotations).

Windows start on multiples of the network's stride (the frame is padded up to one, as the whole-frame pass pads it,
and cropped back), so window mode agrees with full mode up to the windows' own borders. The windows of a frame are
cut out with one gather and blended back with one index_add per batch, on the model's device.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F

from glint_lightning.data.windows import padded_length, round_up, window_starts
from glint_lightning.inference.ensemble import Ensemble
from glint_lightning.models.base import network_stride
from glint_lightning.module import GlintModule
from glint_lightning.scoring import TTA_MODES, tta_transforms, with_tta
from glint_lightning.utils.errors import GlintError

__all__ = ["FramePredictor", "gaussian_importance", "window_starts"]  # data/convert.py imports window_starts here

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@lru_cache(maxsize=16)
def _gaussian(height: int, width: int, sigma_scale: float) -> torch.Tensor:
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    gy = torch.exp(-0.5 * (ys / max(sigma_scale * height, 1e-6)) ** 2)
    gx = torch.exp(-0.5 * (xs / max(sigma_scale * width, 1e-6)) ** 2)
    w = gy[:, None] * gx[None, :]
    w = w / w.max()
    return w.clamp_min(w[w > 0].min()).float()


def gaussian_importance(height: int, width: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(height, width) weights peaking at 1 in the centre, sigma = sigma_scale x the window; never exactly 0.

    Computed once per (size, sigma) and cached; each call returns a copy."""
    return _gaussian(height, width, float(sigma_scale)).clone()


def pad_frame(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Replicate-pad (H, W) at the bottom/right to (height, width): what the networks' own padding does, so the
    padded frame reads the same to window and full mode (validity is replicated too, so padded depth stays valid)."""
    pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
    if not (pad_h or pad_w):
        return x
    as_float = x.to(torch.float32) if x.dtype == torch.bool else x
    padded = F.pad(as_float[None, None], (0, pad_w, 0, pad_h), mode="replicate")[0, 0]
    return padded.bool() if x.dtype == torch.bool else padded


def use_channels_last(net: torch.nn.Module, stride: int, device: torch.device) -> bool:
    """Switch the network's 4-d weights to channels_last (values unchanged) when its forward takes such input:
    convolutions then run 1.4-2x faster on CPUs (oneDNN) and GPUs (cuDNN). A network whose forward breaks on it
    (a `.view` on activations, say) is put back as it was."""
    net.to(memory_format=torch.channels_last)
    first = next(net.parameters(), None)
    probe = torch.zeros(1, 1, 2 * stride, 2 * stride, device=first.device if first is not None else device)
    try:
        with torch.no_grad():
            net(probe.contiguous(memory_format=torch.channels_last))
    except Exception:  # the user's forward: any failure means "not this layout"
        net.to(memory_format=torch.contiguous_format)
        return False
    return True


class _Geometry:
    """Where the windows of one padded frame size go, and 1 / (sum of the weights) at every pixel: both depend on
    the size only, so they are computed once per size."""

    def __init__(
        self, size: tuple[int, int], window: tuple[int, int], overlap: float, stride: int, weights: torch.Tensor
    ) -> None:
        height, width = size
        wh, ww = window
        self.size = (padded_length(height, wh, stride), padded_length(width, ww, stride))
        ys = window_starts(height, wh, overlap, stride)
        xs = window_starts(width, ww, overlap, stride)
        device = weights.device
        row = self.size[1]
        self.starts = (torch.tensor(ys, device=device)[:, None] * row + torch.tensor(xs, device=device)).view(-1)
        self.offsets = (torch.arange(wh, device=device)[:, None] * row + torch.arange(ww, device=device)).view(-1)
        norm = torch.zeros(self.size[0] * row, device=device)
        norm.index_add_(0, self.indices(0, len(self.starts)), weights.view(-1).repeat(len(self.starts)))
        self.inv_norm = norm.reciprocal_()

    def indices(self, first: int, last: int) -> torch.Tensor:
        """Flat indices into the padded frame of the pixels of windows first..last-1, window after window."""
        return (self.starts[first:last, None] + self.offsets[None, :]).view(-1)


class FramePredictor:
    """Glint probabilities for whole depth frames from a trained module.

    Args:
        module: a GlintModule or an Ensemble (in eval mode, on the device it predicts on).
        window: (h, w) of the windows, normally the training tile size; rounded up to a multiple of the network's
            stride (the network would pad a window to that size anyway).
        overlap: share of a window overlapping its neighbour (0.5 by default).
        batch_size: windows per forward pass.
        sigma_scale: gaussian sigma as a share of the window (0.125 as nnU-Net).
        mode: window (blended overlapping windows) or full (one forward pass over the padded frame).
        precision: 32, bf16 or 16 (autocast).
        tta: test-time augmentation, probabilities averaged: none; flip (4 passes: as is, left-right, up-down,
            both); d4 (8 passes: the flips and the 90-degree rotations). d4 in window mode needs square windows;
            in full mode a rotated frame is simply W x H (the networks are fully convolutional).
        channels_last: switch the network's weights to channels_last in place (same values; see
            `use_channels_last`), unless its forward refuses that layout.

    Bad options raise GlintError naming the option.
    """

    def __init__(
        self,
        module: GlintModule | Ensemble,
        window: tuple[int, int],
        overlap: float = 0.5,
        batch_size: int = 16,
        sigma_scale: float = 0.125,
        mode: str = "window",
        precision: str = "32",
        tta: str = "none",
        channels_last: bool = True,
    ) -> None:
        if mode not in ("window", "full"):
            raise GlintError(f"mode={mode}; use window or full")
        if not 0 <= overlap < 1:
            raise GlintError(f"overlap={overlap}; use a value in [0, 1)")
        if int(batch_size) < 1:
            raise GlintError(f"batch_size={batch_size}; use 1 or more windows per forward pass")
        if str(precision) not in PRECISIONS:
            raise GlintError(f"precision={precision}; use 32, bf16 or 16")
        if tta not in TTA_MODES:
            raise GlintError(f"tta={tta}; use none, flip or d4")
        net = getattr(module, "model", module)
        self.stride = network_stride(net)
        self.window = tuple(round_up(int(s), self.stride) for s in window)
        if mode == "window" and tta == "d4" and self.window[0] != self.window[1]:
            raise GlintError(
                f"tta=d4 rotates windows by 90 degrees, which needs square ones (window {self.window[0]}x"
                f"{self.window[1]}); use tta=flip, or mode=full"
            )
        tta_transforms(tta)  # fails here, not on the first frame, if the name is wrong
        self.module, self.overlap, self.tta = module.eval(), overlap, tta
        self.batch_size, self.mode = int(batch_size), mode
        self.device = next(module.buffers()).device  # every module here has buffers (the depth statistics)
        self.channels_last = channels_last and use_channels_last(net, self.stride, self.device)
        self.weights = gaussian_importance(*self.window, sigma_scale).to(self.device)
        self._geometry: dict[tuple[int, int], _Geometry] = {}
        dtype = PRECISIONS[str(precision)]
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype is not None else (lambda: nullcontext())
        )

    def _probs(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            depth = depth.contiguous(memory_format=torch.channels_last)
            valid = valid.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return torch.sigmoid(self.module(depth, valid).float())

    def geometry(self, height: int, width: int) -> _Geometry:
        """The window layout of frames of this size (cached)."""
        key = (height, width)
        if key not in self._geometry:
            if len(self._geometry) >= 8:  # a folder of many frame sizes: keep memory bounded
                self._geometry.clear()
            self._geometry[key] = _Geometry(key, self.window, self.overlap, self.stride, self.weights)
        return self._geometry[key]

    @torch.no_grad()
    def __call__(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """depth (H, W) in mm and valid (H, W) bool -> probability (H, W) float32 on the CPU."""
        depth, valid = depth.to(self.device, torch.float32), valid.to(self.device, torch.bool)
        height, width = depth.shape
        if self.mode == "full":
            size = (round_up(height, self.stride), round_up(width, self.stride))
            d, v = pad_frame(depth, *size)[None, None], pad_frame(valid, *size)[None, None]
            return with_tta(self._probs, d, v, self.tta)[0, 0, :height, :width].cpu()
        geo = self.geometry(height, width)
        depth, valid = pad_frame(depth, *geo.size).reshape(-1), pad_frame(valid, *geo.size).reshape(-1)
        total = torch.zeros_like(depth)
        wh, ww = self.window
        weights = self.weights.view(1, -1)
        for first in range(0, len(geo.starts), self.batch_size):
            last = min(first + self.batch_size, len(geo.starts))
            index = geo.indices(first, last)
            d, v = depth[index].view(-1, 1, wh, ww), valid[index].view(-1, 1, wh, ww)
            prob = with_tta(self._probs, d, v, self.tta, batched=True)
            total.index_add_(0, index, (prob.reshape(last - first, -1) * weights).view(-1))
        return (total * geo.inv_norm).view(geo.size)[:height, :width].cpu()
