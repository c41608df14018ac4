"""Where windows start along a frame side: the one geometry behind cutting frames into tiles (glint-convert) and
sliding windows over full frames (glint-predict, glint_lightning.inference.frames).

Window starts are multiples of the network's total stride: a network that pools is shift-equivariant only for
shifts by whole multiples of its stride, so only then does a window see what the whole-frame pass sees at the same
pixels, and blending agrees with one forward pass over the frame.
"""

from __future__ import annotations

import math

from glint_lightning.utils.errors import OptionError


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
