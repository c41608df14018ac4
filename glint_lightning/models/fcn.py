"""FCN-32s/16s/8s (Long et al. 2015) on a torchvision backbone: per-stage 1x1 scores fused by learned 2x
up-sampling, then up-sampled to the input size."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from glint_lightning.models.backbones import BackboneSegmenter, Encoder
from glint_lightning.models.common import check_norm
from glint_lightning.models.options import ModelOptionError


def _bilinear_upsampler(channels: int) -> nn.ConvTranspose2d:
    """A learnable 2x up-sampling initialised to bilinear interpolation, as in the FCN paper."""
    up = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, bias=False)
    f = torch.tensor([0.25, 0.75, 0.75, 0.25])
    kernel = f[:, None] * f[None, :]
    with torch.no_grad():
        up.weight.zero_()
        for c in range(channels):
            up.weight[c, c] = kernel
    return up


class FCN(BackboneSegmenter):
    """Fully convolutional network.

    Args:
        backbone: vgg16|vgg16_bn|resnet18|resnet34|resnet50|resnet101|mobilenet_v2.
        variant: 32s (stride-32 scores only), 16s (+ stride-16 scores), 8s (+ stride-8 scores).
        norm: batch, or group for small batches (heads only).
        aux: an FCN head on the stride-16 features, trained with `aux_weight` x the loss.
        pretrained, strict: as for DeepLabV3Plus.
    """

    def __init__(
        self,
        backbone: str = "vgg16",
        variant: str = "8s",
        in_channels: int = 1,
        out_channels: int = 1,
        norm: str = "batch",
        groups: int = 16,
        aux: bool = False,
        pretrained: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if variant not in ("32s", "16s", "8s"):
            raise ModelOptionError(f"model.variant={variant!r}; use 32s, 16s or 8s")
        self.variant = variant
        self.backbone = Encoder(backbone, in_channels, 32)
        ch = self.backbone.channels
        self.head = FCNHead(ch[3], out_channels)  # 3x3 conv, norm, ReLU, dropout 0.1, 1x1 scores
        self.score16 = nn.Conv2d(ch[2], out_channels, 1) if variant in ("16s", "8s") else None
        self.score8 = nn.Conv2d(ch[1], out_channels, 1) if variant == "8s" else None
        self.up32 = _bilinear_upsampler(out_channels) if self.score16 is not None else None
        self.up16 = _bilinear_upsampler(out_channels) if self.score8 is not None else None
        for score in (self.score16, self.score8):  # skips start at zero: training begins as FCN-32s
            if score is not None:
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
        self.aux_head = FCNHead(ch[2], out_channels) if aux else None
        self._finish_init([self.head, self.aux_head], norm, groups, pretrained, strict)

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.head(feats[3])
        if self.score16 is not None:
            y = self.up32(y) + self.score16(feats[2])
        if self.score8 is not None:
            y = self.up16(y) + self.score8(feats[1])
        return y
