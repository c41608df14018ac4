"""An ensemble file: a few checkpoints (e.g. the folds of a cross-validation) used as one model.

The file is plain JSON (`<name>.ensemble.json`, written by glint-cv):

    {"format": "glint-lightning ensemble", "version": 1,
     "members": ["0/checkpoints/best-epoch004.ckpt", "1/checkpoints/best-epoch005.ckpt"],
     "threshold": 0.46, "postprocess": {"min_size": 4, "fill_holes": false}, ...}

Member paths are relative to the file's folder (absolute ones are taken as they are). Loaded, it is an `Ensemble`:
a plain nn.Module whose forward averages the members' probabilities (each member normalises depth with its own
statistics), so the scoring path (glint_lightning.scoring) and the frame predictor take it as they take one network.
Every member is read like a checkpoint given directly (`weights_only=True`, every stored `_target_` checked against
the trusted prefixes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.models.base import network_stride
from glint_lightning.module import GlintModule
from glint_lightning.utils.errors import GlintError

ENSEMBLE_SUFFIX = ".ensemble.json"
FORMAT = "glint-lightning ensemble"
VERSION = 1


def is_ensemble_file(path: str | Path) -> bool:
    return str(path).endswith(ENSEMBLE_SUFFIX)


@dataclass
class EnsembleSpec:
    """An ensemble file's contents, member paths resolved."""

    path: Path
    members: list[Path]
    threshold: float
    postprocess: PostProcess
    info: dict[str, Any] = field(default_factory=dict)  # the file's other keys (how it was made)


def read_ensemble(path: str | Path) -> EnsembleSpec:
    """The ensemble file, checked: one line naming the file and the key for anything wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GlintError(f"{path}: no such file; pass an ensemble file written by glint-cv (<dir>/cv{ENSEMBLE_SUFFIX})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GlintError(f"{path}: not JSON ({err}); pass an ensemble file written by glint-cv") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GlintError(f'{path}: not an ensemble file (no "format": "{FORMAT}"); pass one written by glint-cv')
    if data.get("version") != VERSION:
        raise GlintError(f"{path}: ensemble file version {data.get('version')}; this glint_lightning reads {VERSION}")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise GlintError(f'{path}: "members" must be a non-empty list of checkpoint paths')
    resolved = [p if p.is_absolute() else path.parent / p for p in (Path(m).expanduser() for m in members)]
    for member, given in zip(resolved, members):
        if is_ensemble_file(member) or member.suffix != ".ckpt":
            raise GlintError(f"{path}: member {given} is not a .ckpt; an ensemble lists checkpoints written by train")
        if not member.is_file():
            raise GlintError(f"{path}: member {given} ({member}): no such file")
    if len({m.resolve() for m in resolved}) != len(resolved):
        raise GlintError(f"{path}: a member is listed twice")
    threshold = data.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise GlintError(f'{path}: "threshold" is {threshold!r}; expected a probability in (0, 1)')
    postprocess = PostProcess.from_dict(data.get("postprocess"), str(path))
    info = {k: v for k, v in data.items() if k not in ("format", "version", "members", "threshold", "postprocess")}
    return EnsembleSpec(path, resolved, float(threshold), postprocess, info)


def write_ensemble(
    path: str | Path,
    members: Sequence[str | Path],
    threshold: float,
    postprocess: PostProcess | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write an ensemble file; member paths are stored relative to its folder (the folder moves as a whole)."""
    path = Path(path)
    if not is_ensemble_file(path):
        raise GlintError(f"{path}: an ensemble file's name ends with {ENSEMBLE_SUFFIX}")
    folder = path.parent.resolve()
    relative = [os.path.relpath(Path(m).resolve(), folder) for m in members]
    data = {
        "format": FORMAT,
        "version": VERSION,
        "members": relative,
        "threshold": float(threshold),
        "postprocess": (postprocess or PostProcess()).as_dict(),
        **dict(info or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


class Ensemble(nn.Module):
    """The members' mean probability (returned as its logit, so it reads like one network), with what the ensemble
    file records: its threshold and post-processing, and each member's run config and path. `stride` is the least
    common multiple of the members' strides, so windows placed for it suit every member. Not for training."""

    def __init__(
        self,
        members: Sequence[GlintModule],
        threshold: float,
        postprocess: PostProcess | None = None,
        configs: Sequence[Mapping[str, Any]] = (),
        paths: Sequence[Path] = (),
    ) -> None:
        tiles = {tuple(m.hparams.get("tile_size") or ()) for m in members}
        if len(tiles) > 1:
            sizes = ", ".join("x".join(map(str, t)) or "none" for t in sorted(tiles))
            raise GlintError(f"ensemble members were trained on different tile sizes ({sizes}); use members that agree")
        super().__init__()
        self.members = nn.ModuleList(members)
        self.stride = math.lcm(*(network_stride(m.model) for m in members))
        self.threshold = float(threshold)
        self.postprocess = postprocess or PostProcess()
        self.configs = [dict(c) for c in configs]
        self.member_paths = list(paths)
        self.tile_size = members[0].hparams.get("tile_size")
        self.ap_bins = members[0].hparams.get("ap_bins", 200)
        self.eval()

    @property
    def loss_fn(self) -> nn.Module:
        """The first member's loss: what glint-eval reports as `<split>/loss`."""
        return self.members[0].loss_fn

    def forward(self, depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Depth in mm (B, 1, H, W) and validity (all valid when None) -> logit of the mean probability."""
        if valid is None:
            valid = torch.ones_like(depth, dtype=torch.bool)
        total = sum(torch.sigmoid(member(depth, valid).float()) for member in self.members)
        return torch.logit(total / len(self.members), eps=1e-6)


def load_ensemble(path: str | Path, map_location: str | torch.device = "cpu") -> Ensemble:
    """An ensemble file as one module in eval mode (each member trust-checked as a direct checkpoint is)."""
    spec = read_ensemble(path)
    ckpts = [load_checkpoint(member) for member in spec.members]
    members = [GlintModule.from_checkpoint_dict(ckpt, map_location) for ckpt in ckpts]
    configs = [(ckpt.get("hyper_parameters") or {}).get("config") or {} for ckpt in ckpts]
    return Ensemble(members, spec.threshold, spec.postprocess, configs, spec.members)
