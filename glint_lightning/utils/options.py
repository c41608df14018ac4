"""Option values every command reads the same way: "null"/"none" as unset, and `device=auto`."""

from __future__ import annotations

from typing import Any

import torch

from glint_lightning.utils.errors import GlintError

UNSET = ("", "null", "none")


def is_unset(value: Any) -> bool:
    """None, or a string a user typed for "nothing" (`ckpt_path=null`, `model.pretrained=none`)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in UNSET)


def torch_device(device: str) -> str:
    """`device` as torch names it; auto = the GPU when there is one. One line for a device that is not here."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise GlintError(f"device={device} but no CUDA GPU is available here; use device=cpu (or auto)")
        return device
    raise GlintError(f"device={device}; use auto, cpu, cuda or cuda:<index>")
