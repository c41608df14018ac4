"""U-Net for dense binary segmentation of single-channel depth tiles."""

from __future__ import annotations

import torch
from torch import nn

from glint_lightning.models.base import SegmentationNetwork
from glint_lightning.models.options import ModelOptionError
from glint_lightning.models.pretrained import apply_pretrained


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ModelOptionError(f"model.norm={kind!r}; use batch, group or none")


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + norm + ReLU, with optional dropout between them."""

    def __init__(self, cin: int, cout: int, norm: str, groups: int, dropout: float) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout, groups),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout, groups),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Up-sample 2x (transposed conv or bilinear + 1x1), concatenate the skip, convolve."""

    def __init__(self, cin: int, cout: int, mode: str, norm: str, groups: int, dropout: float) -> None:
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cout, 1)
            )
        else:
            raise ModelOptionError(f"model.upsample={mode!r}; use transpose or bilinear")
        self.conv = ConvBlock(2 * cout, cout, norm, groups, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(SegmentationNetwork):
    """Ronneberger-style U-Net; any input size works (padded to a multiple of 2**depth, cropped back).

    Args:
        in_channels: input channels (1 for depth).
        out_channels: output logit channels (1 for binary glint masks).
        base_channels: channels of the first level; doubled at each level down.
        depth: number of 2x down-samplings.
        norm: batch | group | none.
        groups: groups for GroupNorm.
        dropout: Dropout2d inside each block (0 disables).
        upsample: transpose | bilinear.
        init: kaiming | xavier.
        pretrained: null or a .pth/.ckpt to fine-tune from (tensors with matching names and shapes).
        strict: make any key or shape mismatch of `pretrained` an error.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        norm: str = "batch",
        groups: int = 8,
        dropout: float = 0.0,
        upsample: str = "transpose",
        init: str = "kaiming",
        pretrained: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ModelOptionError(f"model.depth={depth}, model.base_channels={base_channels}: both must be >= 1")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.multiple = 2**depth
        self.inc = ConvBlock(in_channels, widths[0], norm, groups, dropout)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[i], widths[i + 1], norm, groups, dropout))
            for i in range(depth)
        )
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], upsample, norm, groups, dropout) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self._init_weights(init)
        apply_pretrained(self, pretrained, strict)

    def _init_weights(self, init: str) -> None:
        if init not in ("kaiming", "xavier"):
            raise ModelOptionError(f"model.init={init!r}; use kaiming or xavier")
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def stride(self) -> int:
        """Inputs of forward_padded must have H and W divisible by this."""
        return self.multiple

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)
