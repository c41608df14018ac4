"""Segmentation losses on logits that score valid pixels only.

Every loss takes `(logits, target, valid)` of shape (B, 1, H, W). Invalid pixels are replaced by constants before
any arithmetic, so an invalid pixel's logit or target (even inf or NaN) changes neither the loss nor the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from glint_lightning.utils.errors import OptionError


def _masked(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    valid = valid.bool()
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(valid, logits, zero), torch.where(valid, target.to(logits.dtype), zero), valid


def _valid_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, per_pixel, 0.0).sum() / valid.sum().clamp_min(1)


class BCELoss(nn.Module):
    """Binary cross-entropy with an optional `pos_weight` for the rare glint class."""

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits, target, valid = _masked(logits, target, valid)
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
        return _valid_mean(per_pixel, valid)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017) as torchvision defines it, averaged over valid pixels."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits, target, valid = _masked(logits, target, valid)
        per_pixel = sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="none")
        return _valid_mean(per_pixel, valid)


class TverskyLoss(nn.Module):
    """1 - Tversky index; alpha weighs false positives, beta false negatives (alpha=beta=0.5 is Dice).

    By default the index is computed over the whole batch, so a few tiny glints still count and a batch with no
    glint at all stays finite (the smoothing term keeps it defined); `per_image=True` averages per-tile indices.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0, per_image: bool = False) -> None:
        super().__init__()
        self.alpha, self.beta, self.smooth, self.per_image = alpha, beta, smooth, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits, target, valid = _masked(logits, target, valid)
        prob = torch.sigmoid(logits) * valid
        target = target * valid
        dims = tuple(range(1, prob.ndim)) if self.per_image else tuple(range(prob.ndim))
        tp = (prob * target).sum(dims)
        fp = (prob * (1 - target)).sum(dims)
        fn = ((1 - prob) * target).sum(dims)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return (1 - index).mean()


class DiceLoss(TverskyLoss):
    """Soft Dice loss: the Tversky loss with alpha = beta = 0.5."""

    def __init__(self, smooth: float = 1.0, per_image: bool = False) -> None:
        super().__init__(alpha=0.5, beta=0.5, smooth=smooth, per_image=per_image)


class HybridLoss(nn.Module):
    """Weighted sum of named losses, e.g. focal + dice; `last_terms` keeps each term for logging."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not terms:
            raise OptionError("loss.terms is empty; name at least one loss, e.g. loss.terms.focal")
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise OptionError(f"loss.weights names {sorted(unknown)} which are not in loss.terms {sorted(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.last_terms = {name: term(logits, target, valid) for name, term in self.terms.items()}
        return sum(self.weights[name] * value for name, value in self.last_terms.items())
