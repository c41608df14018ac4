"""Loading weights for fine-tuning: torchvision's ImageNet weights, local torchvision files, plain `.pth` state
dicts (also the old `{"model_state_dict": ...}` files), Lightning `.ckpt` files and `.safetensors` files (read
without any unpickler; `glint-export format=safetensors` writes them with a JSON sidecar).

Only tensors whose names and shapes match are loaded; RGB first-conv weights are adapted to the model's input
channels; a one-line report says what was loaded, adapted, skipped for shape and missing.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glint_lightning.checkpoints.reader import read_safetensors, read_torch_file
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.log import get_logger
from glint_lightning.utils.options import is_unset

log = get_logger(__name__)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return f" ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else ""

        return (
            f"pretrained {self.source}: loaded {len(self.loaded)}, adapted {len(self.adapted)}{few(self.adapted)}, "
            f"skipped for shape {len(self.skipped_shape)}{few(self.skipped_shape)}, missing {len(self.missing)}"
            f"{few(self.missing)}, unused {len(self.unexpected)}{few(self.unexpected)}"
        )


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB conv weights (out, 3, k, k) for `in_channels` inputs.

    For 1 channel the three filters are summed, so the net on x gives exactly what the RGB net gives on x repeated
    three times. For k channels the filters are repeated cyclically and scaled by 3/k (exact when 3 divides k).
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .pth/.ckpt file, loaded with weights_only=True (Lightning's `model.` prefix removed), or from
    a .safetensors file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GlintError(
            f"model.pretrained={path}: no such file; pass a .pth/.ckpt/.safetensors path, imagenet or null"
        )
    if path.suffix == ".safetensors":
        return {k.removeprefix("module."): v for k, v in read_safetensors(path).items()}
    # nothing is built from the file, but one that names untrusted code is not used at all
    obj = read_torch_file(path, "a .pth state dict or a .ckpt", "weights file", source=f"model.pretrained={path}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint
        obj = {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):  # train_glint_unet.py checkpoint
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GlintError(f"{path}: holds no state dict (name -> tensor); pass a .pth state dict or a .ckpt")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def imagenet_state_dict(weights_enum: Any, name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (downloaded once into the torch hub cache); a clear error offline."""
    weights = weights_enum.DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise GlintError(
            f"model.pretrained=imagenet: cannot download {name} weights from {weights.url} ({err}); offline, "
            "download that file elsewhere and pass model.pretrained=/path/to/file.pth"
        ) from None


def load_matching(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = False, input_conv: str | None = None
) -> LoadReport:
    """Copy the tensors of `state` whose names and shapes match into `module`; adapt `input_conv` if needed."""
    own = module.state_dict()
    report = LoadReport(source)
    accepted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif value.shape == own[key].shape:
            accepted[key] = value
            report.loaded.append(key)
        elif key == input_conv and value.ndim == 4 and value.shape[0] == own[key].shape[0]:
            accepted[key] = adapt_input_conv(value, own[key].shape[1])
            report.adapted.append(f"{key} {value.shape[1]}->{own[key].shape[1]} ch")
        else:
            report.skipped_shape.append(key)
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if strict and (report.skipped_shape or report.missing or report.unexpected):
        raise GlintError(f"model.strict=true but the weights do not match exactly: {report.summary()}")
    module.load_state_dict(accepted, strict=False)
    log.info(report.summary())
    return report


def first_conv_key(module: nn.Module) -> str | None:
    """Name of the first 4-d weight in the state dict: the input convolution."""
    return next((k for k, v in module.state_dict().items() if v.ndim == 4), None)


def apply_pretrained(
    model: nn.Module,
    pretrained: str | None,
    strict: bool = False,
    backbone: nn.Module | None = None,
    imagenet: tuple[Any, str] | None = None,
) -> LoadReport | None:
    """Load `pretrained` (null | imagenet | path) into the model, or into its torchvision backbone when the
    file's names match the backbone's better (a torchvision weights file)."""
    if is_unset(pretrained):
        return None
    if str(pretrained) == "imagenet":
        if backbone is None or imagenet is None:
            raise GlintError("model.pretrained=imagenet needs a torchvision backbone; pass a file path instead")
        state = imagenet_state_dict(*imagenet)
        return load_matching(backbone, state, f"imagenet ({imagenet[1]})", strict, first_conv_key(backbone))
    state = read_state_dict(pretrained)
    target = model
    if backbone is not None:
        in_model = len(set(state) & set(model.state_dict()))
        in_backbone = len(set(state) & set(backbone.state_dict()))
        target = backbone if in_backbone > in_model else model
    return load_matching(target, state, str(pretrained), strict, first_conv_key(target))
