"""`glint-convert src=recordings.h5 out=tiles.h5 tile=256 stride=256` (options: conf/convert.yaml)

Cuts full frames (with masks) into tiles, one tile per HDF5 chunk (lzf by default), keeping every tile with a
glint and a share `keep_empty` of the others, and splits by frame into `<out>_train.h5`, `<out>_val.h5` and
`<out>_test.h5` (a frame's tiles never land in two splits). Each output tile records its source frame in `frame`.

Sources: an HDF5 file with `frames` and `masks` (N, H, W) (and optional `valid`), or a folder with `depth/` and
`mask/` sub-folders of 16-bit PNG or .npy images paired by file name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from glint_lightning.checkpoints.io import atomic_output
from glint_lightning.data.h5 import depth_and_validity
from glint_lightning.data.windows import window_starts
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.options import is_unset

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".npy", ".tif", ".tiff")


def _read_image(path: Path) -> np.ndarray:
    return np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path))


def iter_frames(src: Path, args: Any) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]], float]:
    """(number of frames, iterator of (depth, mask, valid or None), depth scale) for a source."""
    if src.is_dir():
        depth_dir, mask_dir = src / "depth", src / "mask"
        if not depth_dir.is_dir() or not mask_dir.is_dir():
            raise GlintError(f"{src}: expected sub-folders depth/ and mask/ with images paired by name")
        depth_files = sorted(p for p in depth_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        unpaired = [p.name for p in depth_files if p.stem not in masks]
        if unpaired:
            raise GlintError(f"{mask_dir}: no mask for {unpaired[:3]}; name each mask like its depth image")

        def gen() -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
            for p in depth_files:
                yield _read_image(p), _read_image(masks[p.stem]), None

        return len(depth_files), gen(), float(args.scale or 1.0)
    if not src.is_file():
        raise GlintError(f"{src}: no such file or folder; pass src=<recordings.h5 or folder>")
    try:
        f = h5py.File(src, "r")
    except OSError:
        raise GlintError(f"{src}: not an HDF5 file; pass an HDF5 file or a folder") from None
    keys = sorted(f.keys())
    for key in (args.frames_key, args.masks_key):
        if key not in f:
            f.close()
            raise GlintError(f"{src}: no dataset '{key}' (found {keys}); pass frames_key=/masks_key=")
    frames, masks = f[args.frames_key], f[args.masks_key]
    if frames.shape[0] != masks.shape[0] or frames.shape[-2:] != masks.shape[-2:]:
        shapes = f"'{args.masks_key}' {masks.shape} does not match '{args.frames_key}' {frames.shape}"
        f.close()
        raise GlintError(f"{src}: {shapes}")
    valid = f.get(args.valid_key)
    scale = float(args.scale if args.scale is not None else frames.attrs.get("scale", 1.0))

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        with f:
            for i in range(frames.shape[0]):
                yield frames[i].reshape(frames.shape[-2:]), masks[i], valid[i] if valid is not None else None

    return frames.shape[0], gen(), scale


def split_of_frames(n: int, shares: list[float], seed: int) -> np.ndarray:
    """Split name index (0 train, 1 val, 2 test) per frame, from a seeded permutation."""
    shares = np.asarray(shares, dtype=float)
    if len(shares) != 3 or (shares < 0).any() or shares.sum() <= 0:
        raise GlintError(f"split={shares.tolist()}; pass three non-negative shares, e.g. [0.8,0.1,0.1]")
    bounds = np.round(np.cumsum(shares / shares.sum()) * n).astype(int)
    which = np.zeros(n, dtype=int)
    order = np.random.default_rng(seed).permutation(n)
    which[order[bounds[0] : bounds[1]]] = 1
    which[order[bounds[1] :]] = 2
    return which


def convert(args: DictConfig) -> dict[str, Any]:
    """Tile and split `args.src` into `args.out` (options: conf/convert.yaml); returns paths and counts."""
    for name in ("src", "out"):
        if OmegaConf.is_missing(args, name) or not args[name]:
            raise GlintError(f"{name} is not set; e.g. glint-convert src=recordings.h5 out=tiles.h5 tile=256")
    tile, stride = int(args.tile), int(args.stride or args.tile)
    if tile < 8 or stride < 1:
        raise GlintError(f"tile={tile}, stride={stride}: use tile >= 8 and stride >= 1")
    src, out = Path(args.src), Path(args.out)
    n, frames, scale = iter_frames(src, args)
    if n == 0:
        raise GlintError(f"{src}: no frames")
    which = split_of_frames(n, list(args.split), args.seed)
    rng = np.random.default_rng(args.seed + 1)
    compression = None if is_unset(args.compression) else args.compression
    paths = {s: out.with_name(f"{out.stem}_{s}{out.suffix or '.h5'}") for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    with ExitStack() as stack:  # files close first, then each temporary file is renamed into place
        tmps = {s: stack.enter_context(atomic_output(p)) for s, p in paths.items()}
        files = {s: stack.enter_context(h5py.File(tmps[s], "w")) for s in SPLITS}
        for s, g in files.items():
            for key, dtype in (("depth", "float32"), ("mask", "uint8"), ("valid", "bool")):
                shape = dict(shape=(0, tile, tile), maxshape=(None, tile, tile), chunks=(1, tile, tile))
                g.create_dataset(key, dtype=dtype, compression=compression, **shape)
            g.create_dataset("frame", (0,), "int64", maxshape=(None,))
            g.attrs.update({"source": str(src), "split": s, "tile": tile, "stride": stride, "units": "mm"})
        for index, (depth, mask, valid) in enumerate(frames):
            if depth.shape != mask.shape:
                raise GlintError(f"{src}: frame {index}: depth {depth.shape} and mask {mask.shape} differ")
            if ((mask != 0) & (mask != 1)).any() and not set(np.unique(mask)) <= {0, 255}:
                raise GlintError(f"{src}: frame {index}: mask values {np.unique(mask)[:5].tolist()} are not binary")
            d, v = depth_and_validity(depth, scale, valid)
            m = (mask > 0).astype(np.uint8)
            if min(d.shape) < tile:
                raise GlintError(f"{src}: frame {index} is {d.shape[0]}x{d.shape[1]}, smaller than tile={tile}")
            picks = [
                (y, x)
                for y in window_starts(d.shape[0], tile, 1 - stride / tile)
                for x in window_starts(d.shape[1], tile, 1 - stride / tile)
            ]
            picks = [(y, x) for y, x in picks if m[y : y + tile, x : x + tile].any() or rng.random() < args.keep_empty]
            g, s = files[SPLITS[which[index]]], SPLITS[which[index]]
            if not picks:
                continue
            k = counts[s]
            for key in ("depth", "mask", "valid", "frame"):
                g[key].resize(k + len(picks), axis=0)
            g["depth"][k:] = np.stack([d[y : y + tile, x : x + tile] for y, x in picks])
            g["mask"][k:] = np.stack([m[y : y + tile, x : x + tile] for y, x in picks])
            g["valid"][k:] = np.stack([v[y : y + tile, x : x + tile] for y, x in picks])
            g["frame"][k:] = index
            counts[s] += len(picks)
    return {
        "paths": {s: str(p) for s, p in paths.items()},
        "tiles": counts,
        "frames": n,
        "frames_per_split": {s: int((which == i).sum()) for i, s in enumerate(SPLITS)},
    }


@hydra_app("convert")
def main(cfg: DictConfig) -> None:
    """glint-convert: full frames with masks -> train/val/test tile files."""
    result = convert(cfg)
    for s in SPLITS:
        print(f"{s}: {result['paths'][s]} ({result['tiles'][s]} tiles from {result['frames_per_split'][s]} frames)")


if __name__ == "__main__":
    main()
