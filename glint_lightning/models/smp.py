"""Any segmentation_models_pytorch architecture and encoder through the same module (`pip install '.[smp]'`)."""

from __future__ import annotations

from typing import Any

import torch

from glint_lightning.models.base import SegmentationNetwork
from glint_lightning.models.pretrained import apply_pretrained
from glint_lightning.utils.errors import GlintError


class SMPModel(SegmentationNetwork):
    """`smp.create_model(arch, encoder_name=encoder, ...)`; inputs padded to a multiple of 32 and cropped back.

    Args:
        arch: e.g. Unet, UnetPlusPlus, FPN, DeepLabV3Plus, MAnet, Segformer.
        encoder: e.g. resnet34, efficientnet-b0, mobilenet_v2.
        encoder_weights: smp's pretrained encoder weights (downloaded; needs a network), or null.
        pretrained, strict: a local .pth/.ckpt, loaded by matching keys as for the other models.
        extra: further keyword arguments for the architecture.
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder: str = "resnet34",
        in_channels: int = 1,
        out_channels: int = 1,
        encoder_weights: str | None = None,
        pretrained: str | None = None,
        strict: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise GlintError("model=smp needs segmentation_models_pytorch: pip install '.[smp]'") from None
        try:
            self.net = smp.create_model(
                arch,
                encoder_name=encoder,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=out_channels,
                **(extra or {}),
            )
        except KeyError as err:
            raise GlintError(f"model.arch={arch} / model.encoder={encoder}: not known to smp ({err})") from None
        apply_pretrained(self, pretrained, strict)

    stride = 32  # inputs of forward_padded must have H and W divisible by this

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
