"""The one scoring path: a batch -> probabilities (`predict_batch`, with test-time augmentation: flips, 90-degree
rotations), probabilities -> post-processed masks and metric updates (`update_scores`), and both with the loss
(`score_batch`). Validation, test, glint-eval, calibration, glint-cv and full-frame prediction all go through here.

It sits below the LightningModule (and knows nothing of it), so the module, the ensemble and the inference tools
all call it: any network mapping (depth, valid) to logits is scored the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchmetrics import MetricCollection

from glint_lightning.metrics import ObjectMetric
from glint_lightning.utils.errors import OptionError

TTA_MODES = ("none", "flip", "d4")

Transform = Callable[[torch.Tensor], torch.Tensor]


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


def predict_batch(
    net: nn.Module, depth: torch.Tensor, valid: torch.Tensor, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, probabilities), float32 (B, 1, H, W), of a network mapping (depth, valid) to logits (a GlintModule,
    an Ensemble). With `tta`, the probabilities are the mean over the transforms and the logits theirs (the loss
    scores the averaged prediction)."""
    if tta == "none":
        logits = net(depth, valid).float()
        return logits, torch.sigmoid(logits)
    prob = with_tta(lambda d, v: torch.sigmoid(net(d, v).float()), depth, valid, tta, batched=True)
    return torch.logit(prob, eps=1e-6), prob


@torch.no_grad()
def predict_loader(
    net: nn.Module, loader: Iterable[dict[str, torch.Tensor]], device: torch.device | str, tta: str = "none"
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(probabilities, mask, valid) on the CPU for each batch of `loader`, the network in eval mode on `device`."""
    net.eval().to(device)
    for batch in loader:
        _, prob = predict_batch(net, batch["depth"].to(device), batch["valid"].to(device), tta)
        yield prob.cpu(), batch["mask"], batch["valid"]


@contextmanager
def _native_bincount_on_cpu(device: torch.device) -> Iterator[None]:
    """torchmetrics replaces torch.bincount by an [N, bins] mesh whenever deterministic mode is on: gigabytes for
    a validation split's pixels. On the CPU torch.bincount is deterministic already, so let it run there."""
    if device.type != "cpu" or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def update_scores(
    prob: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    pixels: MetricCollection,
    objects: ObjectMetric | None = None,
    postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Probabilities -> (post-processed) masks -> metric updates, on the valid pixels: the one scoring step of
    validation, test and glint-eval. `postprocess(mask, valid)` (a PostProcess's `apply`) changes the thresholded
    mask that the thresholded pixel metrics and the glint metrics see; average precision scores the probabilities."""
    target = mask[valid].int()
    kept = prob if postprocess is None else postprocess((prob >= threshold) & valid, valid).to(prob.dtype)
    with _native_bincount_on_cpu(prob.device):
        if postprocess is None:
            pixels.update(prob[valid], target)  # one update of the collection: its metrics share their counts
        else:
            for name, metric in pixels.items():  # each on its own: AP takes the probabilities
                metric.update((prob if name.endswith("/ap") else kept)[valid], target)
    if objects is not None:
        objects.update(kept, mask, valid)


def score_batch(
    net: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    threshold: float,
    pixels: MetricCollection,
    objects: ObjectMetric | None = None,
    tta: str = "none",
    postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, probabilities) of one batch, the metrics updated: the validation and test steps and
    glint-eval's loop."""
    logits, prob = predict_batch(net, batch["depth"], batch["valid"], tta)
    loss = loss_fn(logits, batch["mask"], batch["valid"])
    update_scores(prob, batch["mask"], batch["valid"], threshold, pixels, objects, postprocess)
    return loss, logits, prob
