"""torchvision backbones as multi-scale encoders: features at strides 4, 8, 16 and 32 (or fewer with dilation).

The torchvision model is kept under `body` (without its classifier; VGG is built without one), so torchvision
weight files load into it by name; the encoder only knows where each stage ends.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from glint_lightning.models.base import SegmentationNetwork
from glint_lightning.models.common import batchnorm_to_groupnorm
from glint_lightning.models.pretrained import apply_pretrained
from glint_lightning.utils.errors import GlintError


def _vgg16_features(weights: None = None, batch_norm: bool = False) -> nn.Module:
    """torchvision's VGG16 without its classifier: a module holding only `features` (the same layer names, so
    torchvision weight files load by name, and VGG's own initialisation). Building `tvm.vgg16` would allocate
    and initialise its 102M-parameter classifier (about 1.5 s) only for the encoder to drop it."""
    body = nn.Module()
    body.features = tvm.vgg.make_layers(tvm.vgg.cfgs["D"], batch_norm=batch_norm)
    for m in body.features.modules():  # as torchvision's VGG.__init__ initialises them (BatchNorm: 1 and 0 already)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return body


# name -> (constructor, weights enum, stage boundaries, channels per stage)
# Boundaries are the names (ResNet) or `features` indices (MobileNetV2, VGG) that end each stage.
RESNETS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights, (64, 128, 256, 512)),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights, (64, 128, 256, 512)),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights, (256, 512, 1024, 2048)),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights, (256, 512, 1024, 2048)),
}
FEATURE_NETS = {  # stage ends as `features` slice stops
    "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights, (4, 7, 14, 19), (24, 32, 96, 1280)),
    "vgg16": (partial(_vgg16_features, batch_norm=False), tvm.VGG16_Weights, (10, 17, 24, 31), (128, 256, 512, 512)),
    "vgg16_bn": (
        partial(_vgg16_features, batch_norm=True),
        tvm.VGG16_BN_Weights,
        (14, 24, 34, 44),
        (128, 256, 512, 512),
    ),
}
BACKBONES = sorted([*RESNETS, *FEATURE_NETS])


def _dilate(stage: nn.Module, dilation: int) -> None:
    """Trade a stage's stride 2 for dilation: strided convs become stride 1, 3x3 convs dilate (and pad) by d."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


def _replace_input_conv(parent: nn.Module, name: str, in_channels: int) -> None:
    """Rebuild the conv `parent.<name>` for `in_channels` inputs (pretrained weights are adapted on load)."""
    old: nn.Conv2d = getattr(parent, name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    setattr(parent, name, new)


class Encoder(nn.Module):
    """Runs a torchvision backbone stage by stage; `forward` returns one feature map per stage.

    Args:
        name: one of BACKBONES.
        in_channels: input channels (1 for depth); the first conv is rebuilt for it.
        output_stride: 32, 16 or 8: the last stages trade stride for dilation (ResNets, MobileNetV2).
    """

    def __init__(self, name: str, in_channels: int = 1, output_stride: int = 32) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise GlintError(f"model.backbone={name} is not available; use one of {BACKBONES}")
        if output_stride not in (8, 16, 32):
            raise GlintError(f"model.output_stride={output_stride}; use 8, 16 or 32")
        self.name, self.output_stride = name, output_stride
        n_dilated = {32: 0, 16: 1, 8: 2}[output_stride]
        if name in RESNETS:
            ctor, self.weights_enum, self.channels = RESNETS[name]
            bottleneck = name in ("resnet50", "resnet101")
            flags = [False, n_dilated == 2, n_dilated >= 1]
            self.body = ctor(weights=None, replace_stride_with_dilation=flags if bottleneck else None)
            self.body.fc = nn.Identity()
            _replace_input_conv(self.body, "conv1", in_channels)
            b = self.body
            self._stages: list[Callable] = [
                nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1),
                b.layer2,
                b.layer3,
                b.layer4,
            ]
            if not bottleneck:  # torchvision's BasicBlock refuses dilation; set it on the convs directly
                for i in range(n_dilated):
                    _dilate(self._stages[3 - i], 2 ** (n_dilated - i))
        else:
            ctor, self.weights_enum, ends, self.channels = FEATURE_NETS[name]
            if name.startswith("vgg") and output_stride != 32:
                raise GlintError(f"model.backbone={name} supports output_stride=32 only")
            self.body = ctor(weights=None)
            if not name.startswith("vgg"):  # the VGG body is built without one
                self.body.classifier = nn.Identity()
            first = self.body.features if name.startswith("vgg") else self.body.features[0]
            _replace_input_conv(first, "0", in_channels)
            starts = (0, *ends[:-1])
            self._stages = [self.body.features[s:e] for s, e in zip(starts, ends)]
            for i in range(n_dilated):
                _dilate(self._stages[3 - i], 2 ** (n_dilated - i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self._stages:
            x = stage(x)
            feats.append(x)
        return feats


class BackboneSegmenter(SegmentationNetwork):
    """What DeepLabV3Plus and FCN share: an Encoder `backbone`, an optional auxiliary head on the stride-16
    features, GroupNorm heads, and pretrained loading. Each defines `_decode(feats) -> low-resolution logits`."""

    stride = 32  # inputs of forward_padded must have H and W divisible by this
    backbone: Encoder
    aux_head: nn.Module | None

    def _finish_init(
        self, heads: list[nn.Module | None], norm: str, groups: int, pretrained: str | None, strict: bool
    ) -> None:
        if norm == "group":
            for part in heads:
                if part is not None:
                    batchnorm_to_groupnorm(part, groups)
        imagenet = (self.backbone.weights_enum, self.backbone.name)
        apply_pretrained(self, pretrained, strict, backbone=self.backbone.body, imagenet=imagenet)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = F.interpolate(self._decode(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return {"out": out, "aux": aux}
        return out
