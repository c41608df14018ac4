"""Geometry of full-frame inference, apart from any model: where the windows go, how they are weighted, and the
test-time augmentations (flips, 90-degree rotations) with their inverses.

Window starts are multiples of the network's total stride: a network that pools is shift-equivariant only for
shifts by whole multiples of its stride, so only then does a window see what the whole-frame pass sees at the same
pixels, and blending agrees with one forward pass over the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch

from glint_lightning.utils.errors import OptionError

TTA_MODES = ("none", "flip", "d4")

Transform = Callable[[torch.Tensor], torch.Tensor]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def padded_length(length: int, window: int, stride: int = 1) -> int:
    """Length a frame side is padded to before windowing: a multiple of `stride`, and at least one window."""
    return max(round_up(length, stride), window)


def window_starts(length: int, window: int, overlap: float, stride: int = 1) -> list[int]:
    """Start offsets of windows of `window` px over a side of `length` px padded to `padded_length(...)`.

    Every start is a multiple of `stride` (`window` must be one too); neighbours share about `overlap` of a window
    (never less), spread evenly on the stride grid; the first starts at 0 and the last ends at the padded length.
    With stride 1 the padded length is the frame's (or the window, when the frame is smaller).
    """
    if window < 1 or stride < 1 or window % stride:
        raise OptionError(f"window={window}, stride={stride}: the window must be a positive multiple of the stride")
    if not 0 <= overlap < 1:
        raise OptionError(f"overlap={overlap}; use a value in [0, 1)")
    span = (padded_length(length, window, stride) - window) // stride  # last start, in strides
    if span == 0:
        return [0]
    step = max(1, int(window * (1 - overlap)) // stride)  # in strides
    n = math.ceil(span / step) + 1
    return [round(i * span / (n - 1)) * stride for i in range(n)]


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


def _d4(k: int, flip: bool) -> tuple[Transform, Transform]:
    """Rotate by k x 90 degrees after an optional left-right flip, and the inverse of that."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.flip(-1) if flip else x
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    def inverse(y: torch.Tensor) -> torch.Tensor:
        y = torch.rot90(y, -k, dims=(-2, -1)) if k else y
        return y.flip(-1) if flip else y

    return forward, inverse


def tta_transforms(name: str, square: bool = True) -> list[tuple[Transform, Transform]]:
    """(forward, inverse) pairs over the last two dims: none = identity; flip = identity, left-right, up-down and
    both flips; d4 = those and the four transposing ones (90/270-degree rotations, with and without a flip), which
    swap H and W: so only for square inputs (`square=False` refuses it) or a network that takes any size."""
    if name not in TTA_MODES:
        raise OptionError(f"tta={name!r}; use none, flip or d4")
    if name == "d4" and not square:
        raise OptionError("tta=d4 rotates by 90 degrees, which needs a square window; use tta=flip or mode=full")
    if name == "none":
        return [_d4(0, False)]
    flips = [_d4(0, False), _d4(0, True), _d4(2, True), _d4(2, False)]  # identity, left-right, up-down, both
    return flips if name == "flip" else [*flips, _d4(1, False), _d4(1, True), _d4(3, False), _d4(3, True)]


def with_tta(
    probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    depth: torch.Tensor,
    valid: torch.Tensor,
    name: str,
    batched: bool = False,
) -> torch.Tensor:
    """Mean over the `name` transforms T of T^-1(probs(T(depth), T(valid))): probabilities, not logits, averaged.

    `probs` maps (B, 1, H, W) depth and validity to (B, 1, H, W) probabilities, and must take W x H inputs for d4
    when H != W. batched=True stacks the transformed inputs into one call of `probs` (fewer, fuller passes, for
    small windows; T times the memory), else one call per transform."""
    transforms = tta_transforms(name)
    if len(transforms) == 1:
        return probs(depth, valid)
    if batched and (name == "flip" or depth.shape[-2] == depth.shape[-1]):  # all of one shape: one batch
        n = depth.shape[0]
        out = probs(torch.cat([f(depth) for f, _ in transforms]), torch.cat([f(valid) for f, _ in transforms]))
        parts = [inverse(out[i * n : (i + 1) * n]) for i, (_, inverse) in enumerate(transforms)]
    else:
        parts = (inverse(probs(forward(depth), forward(valid))) for forward, inverse in transforms)
    total = None
    for p in parts:
        total = p.clone() if total is None else total.add_(p)
    return total.div_(len(transforms))
