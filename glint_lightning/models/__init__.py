"""Segmentation networks: each maps (B, C, H, W) depth input to (B, 1, H, W) logits of any H, W.

In training mode, a network with an auxiliary head returns {"out": logits, "aux": aux_logits}.
"""

from glint_lightning.models.deeplab import DeepLabV3Plus
from glint_lightning.models.fcn import FCN
from glint_lightning.models.smp import SMPModel
from glint_lightning.models.unet import UNet

__all__ = ["FCN", "DeepLabV3Plus", "SMPModel", "UNet"]
