"""DeepLabV3+ (Chen et al. 2018) on a torchvision backbone, with torchvision's ASPP and FCN auxiliary head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from glint_lightning.models.backbones import BackboneSegmenter, Encoder
from glint_lightning.models.common import check_norm
from glint_lightning.models.options import ModelOptionError

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _conv_norm_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DeepLabV3Plus(BackboneSegmenter):
    """Encoder -> ASPP (1x1, three atrous 3x3, image pooling) -> decoder fusing stride-4 features -> logits.

    Args:
        backbone: resnet18|resnet34|resnet50|resnet101|mobilenet_v2.
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36; dilated last two stages).
        low_level_channels: the stride-4 features are projected to this many channels (48 in the paper).
        norm: batch, or group for small batches (heads only; the backbone keeps its BatchNorm).
        dropout: before the classifier.
        aux: an FCN head on the stride-16 features, trained with `aux_weight` x the loss.
        pretrained: null | imagenet | path to a torchvision, .pth or .ckpt file (matching keys only).
        strict: make any key or shape mismatch of `pretrained` an error.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        in_channels: int = 1,
        out_channels: int = 1,
        output_stride: int = 16,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        norm: str = "batch",
        groups: int = 16,
        dropout: float = 0.1,
        aux: bool = False,
        pretrained: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if output_stride not in ASPP_RATES:
            raise ModelOptionError(f"model.output_stride={output_stride}; DeepLabV3+ uses 8 or 16")
        self.backbone = Encoder(backbone, in_channels, output_stride)
        ch = self.backbone.channels
        self.aspp = ASPP(ch[3], list(ASPP_RATES[output_stride]), aspp_channels)
        self.project = _conv_norm_relu(ch[0], low_level_channels, 1)
        self.decoder = nn.Sequential(
            _conv_norm_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            _conv_norm_relu(decoder_channels, decoder_channels, 3),
            nn.Dropout(dropout),
        )
        self.head = nn.Conv2d(decoder_channels, out_channels, 1)
        self.aux_head = FCNHead(ch[2], out_channels) if aux else None
        self._finish_init([self.aspp, self.project, self.decoder, self.aux_head], norm, groups, pretrained, strict)

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = F.interpolate(self.aspp(feats[3]), size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.decoder(torch.cat([y, self.project(feats[0])], dim=1)))
