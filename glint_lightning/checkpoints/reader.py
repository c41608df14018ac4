"""The one way a torch file is read: `weights_only=True` (no code runs while unpickling), stored `_target_`s
checked against the trusted prefixes (nothing is built from an untrusted file), one-line errors for files that are
not what was asked for. Resume, eval, export, calibration, ckpt-info and `model.pretrained` all read through here.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.trust import check_stored_config, check_targets

# What torch.load raises for a file that is not a (weights-only) torch file: truncated, another format, pickled code.
UNREADABLE = (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError)
# Keys of an old model config that were training settings, not network arguments (now callbacks.freeze).
TRAINING_KEYS = ("freeze", "unfreeze_at_epoch")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_torch_file(
    path: str | Path, what: str, noun: str = "torch file", mmap: bool = False, source: str | None = None
) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU. In the error line `noun` says what the file is not (e.g.
    "checkpoint") and `what` what to pass instead (e.g. "a .ckpt written by glint_lightning"). Dicts are refused
    when they name untrusted code (`source` names the option the file came from, e.g. "model.pretrained=w.pth")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GlintError(f"{path}: no such file; pass {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except UNREADABLE as err:
        reason = _first_line(err)
        raise GlintError(f"{path}: not a loadable {noun} ({reason}); pass {what}") from None
    if isinstance(obj, dict):
        check_stored_config(obj, source or str(path))
    return obj


def sidecar_path(weights: str | Path) -> Path:
    """The JSON file beside a .safetensors file that says what network its tensors belong to."""
    return Path(weights).with_suffix(".json")


def read_sidecar(weights: str | Path, required: bool) -> dict[str, Any] | None:
    """The sidecar of a .safetensors file, its `_target_`s checked before anything is built from it; None when
    there is none and it is not `required`."""
    path = sidecar_path(weights)
    if not path.is_file():
        if required:
            raise GlintError(
                f"{weights}: no sidecar {path} (model config, depth statistics, threshold); keep the .json that "
                "glint-export format=safetensors wrote beside it"
            )
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GlintError(f"{path}: not JSON ({err}); pass the sidecar glint-export wrote") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise GlintError(f"{path}: no model_config; pass the sidecar glint-export format=safetensors wrote")
    check_targets({k: meta.get(k) or {} for k in ("model_config", "loss_config")}, str(path))
    return meta


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file (no unpickler runs); a sidecar beside it, if any, must be trusted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_sidecar(path, required=False)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise GlintError(f"{path}: not a readable .safetensors file ({err})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by glint_lightning (memory-mapped: large files open at once)."""
    what = "a .ckpt written by glint_lightning (see outputs/<run>/checkpoints/)"
    ckpt = read_torch_file(path, what, "checkpoint", mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise GlintError(f"{path}: not a Lightning checkpoint (no state_dict); pass {what}")
    return ckpt


def network_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """A stored model config as the network's constructor takes it to rebuild trained weights: old training keys
    dropped, and `pretrained` off (the stored weights replace whatever it named, and it may not exist here)."""
    config = {k: v for k, v in model.items() if k not in TRAINING_KEYS}
    if "pretrained" in config:
        config["pretrained"] = None
    return config
