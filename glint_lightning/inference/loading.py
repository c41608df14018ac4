"""Reading model files as modules: what `glint-export` writes, read back as a GlintModule (`.safetensors` with its JSON
sidecar: no unpickler runs at all; `.pth`: weights_only), besides Lightning `.ckpt` files and glint-cv's ensemble
files, so a tool that takes a checkpoint takes them too. Every `_target_` they name is checked against the trusted
prefixes before anything is built. Also the post-processing a model file records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from glint_lightning.checkpoints.reader import (
    load_checkpoint,
    network_config,
    read_safetensors,
    read_sidecar,
    read_torch_file,
)
from glint_lightning.inference.ensemble import Ensemble, is_ensemble_file, load_ensemble, read_ensemble
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.module import GlintModule
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.trust import check_targets

DEFAULT_LOSS = {"_target_": "glint_lightning.losses.BCELoss"}  # only for exports that record no loss


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> GlintModule | Ensemble:
    """A .ckpt, an exported .pth or a .safetensors (+ .json) file as a GlintModule in eval mode; an ensemble file
    as an Ensemble."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GlintError(f"{path}: no such file; pass a .ckpt, or a .pth/.safetensors file from glint-export")
    if is_ensemble_file(path):  # glint-cv's ensemble file: the mean of its (trust-checked) members
        return load_ensemble(path, map_location)
    if path.suffix == ".safetensors":
        return load_safetensors(path).to(map_location)
    if path.suffix == ".pth":
        return load_pth(path).to(map_location)
    return GlintModule.from_checkpoint(str(path), map_location)


def load_safetensors(path: Path) -> GlintModule:
    """A `glint-export format=safetensors` file and its sidecar; no unpickler runs."""
    meta = read_sidecar(path, required=True)
    return module_from_export(meta, read_safetensors(path), str(path))


def load_pth(path: Path) -> GlintModule:
    """A `glint-export format=pth` file, loaded with weights_only=True."""
    payload = read_torch_file(path, "a .pth written by glint-export", "export")
    if not isinstance(payload, dict) or not {"model_config", "model_state_dict"} <= set(payload):
        raise GlintError(f"{path}: no model_config and model_state_dict; pass a .pth written by glint-export")
    check_targets({"loss_config": payload.get("loss_config") or {}}, str(path))
    return module_from_export(payload, payload["model_state_dict"], str(path))


def module_from_export(meta: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> GlintModule:
    """Build the network its (already trusted) model config names, load `state` exactly, set the depth statistics,
    clip range, threshold and tile size the export recorded."""
    model = network_config(meta["model_config"])
    module = GlintModule(
        model=model,
        loss=meta.get("loss_config") or DEFAULT_LOSS,
        optimizer={},  # not for training: no optimizer was exported
        threshold=float(meta.get("threshold", 0.5)),
        tile_size=meta.get("tile_size"),
    )
    try:
        module.model.load_state_dict(state)
    except RuntimeError as err:
        raise GlintError(
            f"{source}: its tensors do not fit {model.get('_target_')} ({str(err).splitlines()[0]}); "
            "export the checkpoint again"
        ) from None
    module.set_depth_stats(float(meta["depth_mean"]), float(meta["depth_std"]), _clip(meta.get("depth_clip"), source))
    return module.eval()


def _clip(value: Any, source: str) -> tuple[float, float] | None:
    """The depth clip range an export recorded (exports written before data.depth_clip record none: no clip)."""
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise GlintError(f"{source}: depth_clip={value!r} is not [low, high] (mm) or null; export the checkpoint again")
    return float(value[0]), float(value[1])


def checkpoint_postprocess(ckpt: Mapping[str, Any], source: str = "checkpoint") -> PostProcess:
    """The post-processing a loaded checkpoint records (stored by glint-eval calibrate=true beside the threshold)."""
    return PostProcess.from_dict((ckpt.get("threshold_calibration") or {}).get("postprocess"), source)


def stored_postprocess(path: str | Path) -> PostProcess:
    """The post-processing a model file records: a .ckpt's calibration, an ensemble file's; exported files (.pth,
    .safetensors) record none."""
    path = Path(path).expanduser()
    if is_ensemble_file(path):
        return read_ensemble(path).postprocess
    if path.suffix == ".ckpt":
        return checkpoint_postprocess(load_checkpoint(path), str(path))
    return PostProcess()
