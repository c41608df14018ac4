"""What every network shares, written once: a total `stride`, and a forward that pads the input up to a multiple
of it, runs the architecture (`forward_padded`), and crops the logits back — as segmentation_models_pytorch's
`SegmentationModel` does for all its architectures. U-Net, the torchvision-backbone models and the smp wrapper
inherit `SegmentationNetwork`; a user's plain `nn.Module` (the contract in models/common.py) goes through the same
`forward_any_size`, and the exported TorchScript/ONNX model scripts the same base forward.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at run time.
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Logits = Union[torch.Tensor, dict[str, torch.Tensor]]  # noqa: UP007 (TorchScript reads typing.Union only)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right edges so H and W are multiples of `multiple` (crop back with [..., :h, :w]).

    Written for TorchScript too: the exported models pad any input size at run time with it.
    """
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")


def crop(out: Logits, h: int, w: int) -> Logits:
    """Crop logits (or each entry of {"out", "aux"}) back to the input's (h, w)."""
    if isinstance(out, torch.Tensor):
        return out[..., :h, :w]
    return {k: v[..., :h, :w] for k, v in out.items()}


def declared_stride(net: nn.Module) -> Optional[int]:  # noqa: UP045
    """`net.stride` as an int (1 when absent; torch layers' (s, s) as s), or None when it is not a positive int."""
    stride = getattr(net, "stride", 1)
    if isinstance(stride, tuple) and len(set(stride)) == 1:  # a bare torch layer as the network, e.g. Conv2d
        stride = stride[0]
    return stride if isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1 else None


def network_stride(net: nn.Module) -> int:
    """The network's declared `stride` (1 when it declares none): input sizes must be multiples of it."""
    return declared_stride(net) or 1


class SegmentationNetwork(nn.Module):
    """Base of the networks here: (B, C, H, W) of any H, W -> (B, 1, H, W) logits (or {"out", "aux"} in training).

    Subclasses set `stride` (the total down-sampling: `forward_padded` inputs have H and W divisible by it) and
    implement `forward_padded`.
    """

    stride: int = 1

    def forward_padded(self, x: torch.Tensor) -> Logits:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Logits:
        h, w = x.shape[-2], x.shape[-1]
        return crop(self.forward_padded(pad_to_multiple(x, self.stride)), h, w)


def forward_any_size(net: nn.Module, x: torch.Tensor) -> Logits:
    """Run any network on any H, W: ours pad themselves; a plain network is padded to its stride here."""
    if isinstance(net, SegmentationNetwork):
        return net(x)
    h, w = x.shape[-2], x.shape[-1]
    return crop(net(pad_to_multiple(x, network_stride(net))), h, w)
