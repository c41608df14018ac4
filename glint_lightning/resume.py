"""Which checkpoint `ckpt_path` means, and whether it fits the composed config. Never silently start over."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from glint_lightning.errors import GlintError
from glint_lightning.trust import check_stored_config

LAST = "last.ckpt"


def resolve_ckpt_path(value: str | None, ckpt_dir: Path, outputs_root: Path) -> Path | None:
    """`null` -> None; `last` -> this run's last.ckpt, else the newest last.ckpt under outputs_root; a path -> itself.

    Lightning's own `ckpt_path="last"` only looks in the current checkpoint dir and quietly starts from scratch
    when it finds nothing; Hydra gives every run a new dir, so we resolve it here and fail loudly instead.
    """
    if value is None or str(value) in ("", "null", "none"):
        return None
    if str(value) == "last":
        here = ckpt_dir / LAST
        if here.is_file():
            print(f"ckpt_path=last: resuming this run in place from {here}", flush=True)
            return here
        found = [p for p in outputs_root.rglob(LAST) if p.is_file()] if outputs_root.is_dir() else []
        if not found:
            raise GlintError(
                f"ckpt_path=last: no {LAST} in {ckpt_dir} nor under {outputs_root}/; pass "
                "hydra.run.dir=<earlier run dir> or ckpt_path=/path/to/file.ckpt"
            )
        newest = max(found, key=lambda p: p.stat().st_mtime)
        print(f"ckpt_path=last: resuming from the newest {LAST} under {outputs_root}/: {newest}", flush=True)
        return newest
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise GlintError(f"ckpt_path={value}: no such file; pass an existing .ckpt file or ckpt_path=last")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True (no code runs) and refuse untrusted stored `_target_`s; a clear error for files
    that are not our checkpoints."""
    if not Path(path).is_file():
        raise GlintError(f"{path}: no such file; pass an existing .ckpt (see outputs/<run>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GlintError(
            f"{path}: not a loadable checkpoint ({first}); pass a .ckpt written by glint_lightning"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise GlintError(f"{path}: not a Lightning checkpoint (no state_dict); pass a .ckpt written by glint_lightning")
    check_stored_config(ckpt, str(path))
    return ckpt


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(stored: Mapping[str, Any], composed: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: stored -> composed'."""
    a, b = _flatten(stored), _flatten(composed)
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def check_resumable(path: Path, model_cfg: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Refuse a checkpoint whose stored model config differs from the composed one (keys in `ignore` aside)."""
    ckpt = load_checkpoint(path)
    stored = (ckpt.get("hyper_parameters") or {}).get("model")
    if stored is None:
        raise GlintError(
            f"{path}: no model config stored in the checkpoint; it was not written by glint_lightning.train"
        )
    diffs = config_differences(
        {k: v for k, v in stored.items() if k not in ignore}, {k: v for k, v in model_cfg.items() if k not in ignore}
    )
    if diffs:
        raise GlintError(
            f"{path}: its model config differs from this run's ({'; '.join(f'model.{d}' for d in diffs)}); "
            "override the model to match or start a new run without ckpt_path"
        )
    return ckpt
