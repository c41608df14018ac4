"""Segmentation networks: each maps (B, C, H, W) depth input to (B, 1, H, W) logits of any H, W."""

from glint_lightning.models.unet import UNet

__all__ = ["UNet"]
