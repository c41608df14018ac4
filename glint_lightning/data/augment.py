"""Batch augmentations applied after the batch reaches the device: flips, rot90 and depth noise.

They draw from a generator seeded by (seed, global step), so the same step gets the same augmentation whether
the run was interrupted or not, and whatever `num_workers` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KEYS = ("depth", "mask", "valid")


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    depth_noise: float = 0.0  # std of multiplicative noise on valid depth (0.01 = 1 %)


def _dihedral_numpy(x: torch.Tensor, hflip: list[bool], vflip: list[bool], turns: list[int]) -> torch.Tensor:
    """CPU: one strided copy per sample from a flipped/rotated numpy view, on one thread.

    torch's flip/where/rot90 run each op multi-threaded on a whole batch: ~40 parallel regions per batch, each
    stalling for a time slice whenever DataLoader workers (or other jobs) hold the cores.
    """
    src, out = x.numpy(), torch.empty_like(x, memory_format=torch.contiguous_format)
    dst = out.numpy()
    for b in range(src.shape[0]):
        view = src[b]
        if hflip[b]:
            view = view[..., ::-1]
        if vflip[b]:
            view = view[..., ::-1, :]
        np.copyto(dst[b], _rot90(view, turns[b]))
    return out


def _rot90(view: np.ndarray, turns: int) -> np.ndarray:
    """np.rot90(view, turns, axes=(-2, -1)) without its per-call overhead: a view."""
    if turns == 1:
        return view[..., ::-1].swapaxes(-2, -1)
    if turns == 2:
        return view[..., ::-1, ::-1]
    if turns == 3:
        return view[..., ::-1, :].swapaxes(-2, -1)
    return view


_MAPS: dict[tuple[int, int, str], torch.Tensor] = {}


def _index_maps(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(16, h*w) source pixel of each output pixel for code hflip + 2 vflip + 4 turns (turns only if h == w)."""
    key = (h, w, str(device))
    if key not in _MAPS:
        grid, maps = torch.arange(h * w).view(h, w), []
        for code in range(16 if h == w else 4):
            m = grid.flip(-1) if code & 1 else grid
            m = m.flip(-2) if code & 2 else m
            maps.append(torch.rot90(m, code // 4, dims=(-2, -1)).reshape(-1))
        _MAPS[key] = torch.stack(maps).to(device)
    return _MAPS[key]


def _dihedral_gather(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Accelerators: the whole batch in one gather through precomputed index maps."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    index = _index_maps(h, w, x.device)[codes].view(n, 1, h * w).expand(n, x[0].numel() // (h * w), h * w)
    return x.reshape(n, -1, h * w).gather(-1, index).view_as(x)


def augment_batch(batch: dict[str, torch.Tensor], cfg: AugmentConfig, generator: torch.Generator) -> dict:
    """Per-sample random flips, 90-degree rotations (square tiles) and depth noise, the same for every key.

    Equal, pixel for pixel, to flipping left-right, then up-down, then rotating by 90 degrees x turns (torch.rot90).
    """
    n = batch["depth"].shape[0]
    device = batch["depth"].device
    h, w = batch["depth"].shape[-2:]

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)

    zeros = torch.zeros(n, dtype=torch.long, device=device)
    hflip = draw(2) if cfg.hflip else zeros
    vflip = draw(2) if cfg.vflip else zeros
    turns = draw(4) if cfg.rot90 and h == w else zeros
    out = {k: batch[k] for k in KEYS}
    if cfg.hflip or cfg.vflip or (cfg.rot90 and h == w):
        if device.type == "cpu":
            flags = hflip.tolist(), vflip.tolist(), turns.tolist()
            out = {k: _dihedral_numpy(v, *flags) for k, v in out.items()}
        else:
            codes = hflip + 2 * vflip + 4 * turns
            out = {k: _dihedral_gather(v, codes) for k, v in out.items()}
    if cfg.depth_noise > 0:
        noise = torch.randn(out["depth"].shape, generator=generator, device=generator.device).to(device)
        out["depth"] = torch.where(out["valid"], out["depth"] * (1 + cfg.depth_noise * noise), out["depth"])
    return {**batch, **out}
