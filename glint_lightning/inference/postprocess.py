"""Post-processing of binary glint masks: what glint-eval and glint-predict do to a thresholded mask.

- `min_size`: predicted glints smaller than this many pixels are removed (glints are 8-connected components, as
  the glint-level metrics count them); 0 (or 1) keeps all.
- `fill_holes`: background enclosed by a glint (not reachable from the tile's border through 4-connected
  background) becomes glint.

Both act per tile or frame, after the threshold, fill_holes first; invalid pixels stay background, as without
post-processing. Choosing them from data is inference.calibration's `PostprocessSearch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from glint_lightning.metrics import EIGHT_IN_PLANE, FOUR_IN_PLANE, as_stack
from glint_lightning.utils.errors import GlintError, OptionError


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


def postprocess_mask(mask: Any, valid: Any = None, min_size: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Boolean (..., H, W): mask on valid pixels, holes filled (fill_holes), glints under min_size px removed."""
    m = np.asarray(mask).astype(bool)
    shape = m.shape
    stack = m.reshape(-1, *shape[-2:]).copy()
    v = None if valid is None else as_stack(np.asarray(valid).astype(bool), shape)
    if v is not None:
        stack &= v
    if fill_holes:
        stack = fill_enclosed(stack)
        if v is not None:
            stack &= v
    if min_size > 1:
        labels, n = ndimage.label(stack, EIGHT_IN_PLANE)
        keep = np.bincount(labels[stack], minlength=n + 1) >= min_size
        keep[0] = False
        stack = keep[labels]
    return stack.reshape(shape)


def fill_enclosed(stack: np.ndarray) -> np.ndarray:
    """Background not reachable from its tile's border through 4-connected background becomes foreground (as
    scipy's binary_fill_holes per tile, from one labelling of the stack's background)."""
    labels, n = ndimage.label(~stack, FOUR_IN_PLANE)
    if n == 0:
        return stack
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # the foreground (label 0) stays as it is
    return stack | ~outside[labels]


def resolve_postprocess(option: Mapping[str, Any] | None, stored: PostProcess) -> PostProcess:
    """The command's `postprocess.*` options over the stored post-processing: a null option keeps the stored value."""
    option = option or {}
    min_size, fill_holes = option.get("min_size"), option.get("fill_holes")
    return PostProcess(
        stored.min_size if min_size is None else min_size, stored.fill_holes if fill_holes is None else fill_holes
    )
