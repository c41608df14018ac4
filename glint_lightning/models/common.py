"""Small pieces the networks share, and the contract every network (ours or a user's `_target_`) meets.

The contract: a network is an `nn.Module` whose `forward` maps normalised depth (B, 1, H, W) to glint logits
(B, 1, H, W), or to a dict whose "out" holds them (an auxiliary head may add "aux" in training mode). It may declare
`stride` (a positive int, default 1): then H and W must be multiples of it, and the framework's export pads to it.
Nothing else is required (no `forward_padded`); `check_network` tests it on a tiny input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from glint_lightning.models.base import declared_stride
from glint_lightning.models.options import ModelOptionError
from glint_lightning.utils.errors import GlintError


def check_network(net: nn.Module, source: str) -> None:
    """Refuse, with one line naming `source` (e.g. "model._target_=mylab.Net"), a network that breaks the contract:
    a `stride` that is not a positive int, or not (B, 1, H, W) logits from a probe of size 2 x stride."""
    stride = declared_stride(net)
    if stride is None:
        raise GlintError(
            f"{source}: stride={getattr(net, 'stride', None)!r}; a network's stride must be a positive int (or left "
            "out: 1)"
        )
    first = next(net.parameters(), None)
    probe = torch.zeros(2, 1, 2 * stride, 2 * stride, device=first.device if first is not None else "cpu")
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(probe)
    except Exception as err:  # the user's forward: any failure is the same finding
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise GlintError(
            f"{source}: forward failed on a (2, 1, {2 * stride}, {2 * stride}) input ({type(err).__name__}: "
            f"{first_line}); a network maps (B, 1, H, W) depth to (B, 1, H, W) logits for H, W multiples of its "
            "stride"
        ) from None
    finally:
        net.train(was_training)
    logits = out.get("out") if isinstance(out, dict) else out
    if not isinstance(logits, torch.Tensor):
        got = "a dict without 'out'" if isinstance(out, dict) else f"a {type(out).__name__}"
    elif tuple(logits.shape) != tuple(probe.shape):
        got = f"shape {tuple(logits.shape)}"
    elif not logits.is_floating_point():
        got = f"{logits.dtype} values"
    else:
        return
    raise GlintError(
        f"{source}: returned {got} for a (2, 1, {2 * stride}, {2 * stride}) input; a network returns (B, 1, H, W) "
        "float logits (or a dict with them under 'out')"
    )


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
        raise ModelOptionError(f"model.norm={norm!r}; use batch or group")


def model_part(model: nn.Module, name: str, option: str) -> nn.Module:
    """`model.get_submodule(name)` with a one-line error listing the parts there are."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parts = ", ".join(n for n, _ in model.named_children())
        raise GlintError(f"{option}: {type(model).__name__} has no part '{name}'; its parts are {parts}") from None
