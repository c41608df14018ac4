"""Small pieces the networks share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glint_lightning.errors import GlintError


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right edges so H and W are multiples of `multiple` (crop back with [..., :h, :w]).

    Written for TorchScript too: the exported models pad any input size at run time with it.
    """
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")


def crop(out: torch.Tensor | dict[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Crop logits (or each entry of {"out", "aux"}) back to the input's (h, w)."""
    h, w = size
    if isinstance(out, dict):
        return {k: v[..., :h, :w] for k, v in out.items()}
    return out[..., :h, :w]


def batchnorm_to_groupnorm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm2d under `module` by GroupNorm (for batches too small for batch statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features))
        else:
            batchnorm_to_groupnorm(child, groups)
    return module


def check_norm(norm: str) -> None:
    if norm not in ("batch", "group"):
        raise ValueError(f"model.norm={norm!r}; use batch or group")


def model_part(model: nn.Module, name: str, option: str) -> nn.Module:
    """`model.get_submodule(name)` with a one-line error listing the parts there are."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parts = ", ".join(n for n, _ in model.named_children())
        raise GlintError(f"{option}: {type(model).__name__} has no part '{name}'; its parts are {parts}") from None
