"""An ensemble file: a few checkpoints (e.g. the folds of a cross-validation) used as one model.

The file is plain JSON (`<name>.ensemble.json`, written by glint-cv):

    {"format": "glint-lightning ensemble", "version": 1,
     "members": ["0/checkpoints/best-epoch004.ckpt", "1/checkpoints/best-epoch005.ckpt"],
     "threshold": 0.46, "postprocess": {"min_size": 4, "fill_holes": false}, ...}

Member paths are relative to the file's folder (absolute ones are taken as they are). Loaded, it is a GlintModule
whose forward averages the members' probabilities (each member normalises depth with its own statistics), so eval,
predict and test-time augmentation take it wherever they take a checkpoint. Every member is read like a checkpoint
given directly (`weights_only=True`, every stored `_target_` checked against the trusted prefixes).
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


class EnsembleNet(nn.Module):
    """The members' mean probability, as a logit. `stride` is the least common multiple of the members' strides
    (the largest, for the usual powers of two), so windows placed for it suit every member."""

    def __init__(self, members: Sequence[GlintModule]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.stride = math.lcm(*(network_stride(m.model) for m in members))

    def forward(self, depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Depth in mm (B, 1, H, W) and validity (all valid when None) -> logit of the mean probability."""
        if valid is None:
            valid = torch.ones_like(depth, dtype=torch.bool)
        total = None
        for member in self.members:
            prob = torch.sigmoid(member(depth, valid).float())
            total = prob if total is None else total + prob
        return torch.logit(total / len(self.members), eps=1e-6)


class EnsembleModule(GlintModule):
    """A GlintModule over an EnsembleNet: scored by the same test loop and run by the same frame predictor as one
    checkpoint. Not for training. Build it with `from_members` or `load_ensemble`."""

    postprocess: PostProcess
    configs: list[dict[str, Any]]
    member_paths: list[Path]

    @classmethod
    def from_members(
        cls,
        members: Sequence[GlintModule],
        threshold: float,
        postprocess: PostProcess | None = None,
        configs: Sequence[Mapping[str, Any]] = (),
        paths: Sequence[Path] = (),
    ) -> EnsembleModule:
        tiles = {tuple(m.hparams.get("tile_size") or ()) for m in members}
        if len(tiles) > 1:
            sizes = ", ".join("x".join(map(str, t)) or "none" for t in sorted(tiles))
            raise GlintError(f"ensemble members were trained on different tile sizes ({sizes}); use members that agree")
        first = members[0]
        module = cls(
            model={"_target_": "torch.nn.Identity"},  # replaced by the members below
            loss=first.hparams.loss,
            optimizer={},
            threshold=threshold,
            ap_bins=first.hparams.get("ap_bins", 200),
            tile_size=first.hparams.get("tile_size"),
        )
        module.model = EnsembleNet(members)
        module.postprocess = postprocess or PostProcess()
        module.configs = [dict(c) for c in configs]
        module.member_paths = list(paths)
        return module.to(first.depth_mean.device).eval()

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.model(depth, valid)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise GlintError("an ensemble is for scoring and prediction; train its members instead")


def load_ensemble(path: str | Path, map_location: str | torch.device = "cpu") -> EnsembleModule:
    """An ensemble file as one module in eval mode (each member trust-checked as a direct checkpoint is)."""
    spec = read_ensemble(path)
    ckpts = [load_checkpoint(member) for member in spec.members]
    members = [GlintModule.from_checkpoint_dict(ckpt, map_location) for ckpt in ckpts]
    configs = [(ckpt.get("hyper_parameters") or {}).get("config") or {} for ckpt in ckpts]
    return EnsembleModule.from_members(members, spec.threshold, spec.postprocess, configs, spec.members)
