"""Batch augmentations applied after the batch reaches the device: flips, rot90 and depth noise.

They draw from a generator seeded by (seed, global step), so the same step gets the same augmentation whether
the run was interrupted or not, and whatever `num_workers` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    depth_noise: float = 0.0  # std of multiplicative noise on valid depth (0.01 = 1 %)


def _where(sel: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(sel.view(-1, *([1] * (a.ndim - 1))), a, b)


def augment_batch(batch: dict[str, torch.Tensor], cfg: AugmentConfig, generator: torch.Generator) -> dict:
    """Per-sample random flips, 90-degree rotations (square tiles) and depth noise, the same for every key."""
    keys = ("depth", "mask", "valid")
    n = batch["depth"].shape[0]
    out = {k: batch[k] for k in keys}
    device = batch["depth"].device

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)

    if cfg.hflip:
        sel = draw(2).bool()
        out = {k: _where(sel, v.flip(-1), v) for k, v in out.items()}
    if cfg.vflip:
        sel = draw(2).bool()
        out = {k: _where(sel, v.flip(-2), v) for k, v in out.items()}
    h, w = out["depth"].shape[-2:]
    if cfg.rot90 and h == w:
        turns = draw(4)
        for k, v in out.items():
            rotated = v.clone()
            for t in (1, 2, 3):
                sel = turns == t
                if sel.any():
                    rotated[sel] = torch.rot90(v[sel], t, dims=(-2, -1))
            out[k] = rotated
    if cfg.depth_noise > 0:
        noise = torch.randn(out["depth"].shape, generator=generator, device=generator.device).to(device)
        out["depth"] = torch.where(out["valid"], out["depth"] * (1 + cfg.depth_noise * noise), out["depth"])
    return {**batch, **out}
