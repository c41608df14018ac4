"""HDF5 depth tiles read on demand: one file handle per process, opened lazily inside each DataLoader worker."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from glint_lightning.utils.errors import GlintError

DEPTH_DTYPES = (np.float32, np.float16, np.float64, np.uint16)
MASK_CHECK_BLOCK = 256  # tiles per read when checking mask values: bounded memory for files larger than RAM


@dataclass(frozen=True)
class TileKeys:
    depth: str = "depth"
    mask: str = "mask"
    valid: str | None = "valid"  # optional: when absent from the file, depth 0 or NaN marks invalid pixels


@dataclass(frozen=True)
class TileFileInfo:
    path: str
    n: int
    height: int
    width: int
    scale: float  # millimetres per stored unit
    has_valid: bool


def _open(path: str | os.PathLike) -> h5py.File:
    p = Path(path)
    if not p.is_file():
        raise GlintError(f"{p}: no such file; check the path (e.g. data.train_path=/abs/path/train.h5)")
    try:
        return h5py.File(p, "r")
    except OSError as err:
        raise GlintError(f"{p}: cannot be read as HDF5 ({err}); pass an HDF5 tile file") from None


def inspect_tile_file(path: str | os.PathLike, keys: TileKeys, depth_scale: float | None = None) -> TileFileInfo:
    """Check keys, ranks, shapes, dtypes and mask values; raise GlintError naming the file, key and fix."""
    with _open(path) as f:
        for key in (keys.depth, keys.mask):
            if key not in f:
                raise GlintError(
                    f"{path}: no dataset '{key}' (found {sorted(f.keys())}); set data.keys.depth/data.keys.mask"
                )
        depth, mask = f[keys.depth], f[keys.mask]
        if depth.ndim == 4 and depth.shape[1] == 1:
            dshape = (depth.shape[0], *depth.shape[2:])
        elif depth.ndim == 3:
            dshape = depth.shape
        else:
            raise GlintError(f"{path}: '{keys.depth}' has shape {depth.shape}; expected (N, H, W) or (N, 1, H, W)")
        if depth.dtype.type not in DEPTH_DTYPES:
            raise GlintError(f"{path}: '{keys.depth}' has dtype {depth.dtype}; expected float32, float16 or uint16")
        if tuple(mask.shape) != tuple(dshape):
            raise GlintError(
                f"{path}: '{keys.mask}' has shape {mask.shape} but '{keys.depth}' has {depth.shape}; "
                "masks must be (N, H, W) with the same N, H, W as the depth tiles"
            )
        has_valid = keys.valid is not None and keys.valid in f
        if has_valid and tuple(f[keys.valid].shape) != tuple(dshape):
            raise GlintError(f"{path}: '{keys.valid}' has shape {f[keys.valid].shape}; expected {dshape}")
        for start in range(0, mask.shape[0], MASK_CHECK_BLOCK):
            block = mask[start : start + MASK_CHECK_BLOCK]
            bad = (block != 0) & (block != 1)
            if bad.any():
                i = start + int(np.argwhere(bad)[0][0])
                raise GlintError(
                    f"{path}: '{keys.mask}' tile {i} has values {np.unique(block[bad])[:5].tolist()} outside "
                    "{0, 1}; store binary masks (e.g. mask = mask > 0)"
                )
        scale = depth_scale if depth_scale is not None else float(depth.attrs.get("scale", 1.0))
        return TileFileInfo(str(path), int(dshape[0]), int(dshape[1]), int(dshape[2]), scale, has_valid)


def depth_and_validity(
    stored: np.ndarray, scale: float, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stored depth -> (depth in mm as float32 with non-finite values set to 0, validity).

    Validity is the `valid` array where the file has one, else depth that is finite and non-zero.
    """
    depth = np.asarray(stored, dtype=np.float32)
    if scale != 1.0:
        depth = depth * np.float32(scale)
    finite = np.isfinite(depth)
    valid = np.asarray(valid, dtype=bool) & finite if valid is not None else finite & (depth != 0)
    return np.where(finite, depth, np.float32(0.0)), valid


class H5Tiles(Dataset):
    """Tiles `indices` of one HDF5 file as dicts of depth (mm, float32), mask (float32) and valid (bool) tensors.

    The h5py handle is opened on first access in the process that reads (each DataLoader worker has its own),
    never before a fork: h5py handles shared across processes corrupt reads.
    """

    def __init__(self, info: TileFileInfo, keys: TileKeys, indices: np.ndarray | None = None) -> None:
        self.info, self.keys = info, keys
        self.indices = np.arange(info.n) if indices is None else np.asarray(indices, dtype=np.int64)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: tuple | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None, "_datasets": None}

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.info.path, "r"), os.getpid()
            keys = (self.keys.depth, self.keys.mask, self.keys.valid if self.info.has_valid else None)
            self._datasets = tuple(self._file[k] if k else None for k in keys)  # name lookups cost per read
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._datasets = None, None

    def read_many(self, file_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tiles at `file_indices`: depth in mm (non-finite -> 0), mask, valid, each (k, H, W).

        One plain read per tile and key: h5py's fancy indexing (a list of indices in one call) measured about
        100x slower per tile than this on one-tile chunks.
        """
        self._handle()
        shape = (len(file_indices), self.info.height, self.info.width)
        depth_ds, mask_ds, valid_ds = self._datasets
        stored = np.stack([depth_ds[i] for i in file_indices]).reshape(shape)
        valid = np.stack([valid_ds[i] for i in file_indices]).reshape(shape) if valid_ds else None
        depth, valid = depth_and_validity(stored, self.info.scale, valid)
        mask = np.stack([mask_ds[i] for i in file_indices]).astype(np.float32, copy=False).reshape(shape)
        return depth, mask, valid

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw arrays of tile i (file order): depth in mm with non-finite values as 0, mask, valid."""
        depth, mask, valid = self.read_many(np.array([i]))
        return depth[0], mask[0], valid[0]

    def __getitems__(self, items: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, already stacked (B, 1, H, W); DataLoader calls this with `collate_fn=collate_tiles`."""
        depth, mask, valid = (torch.from_numpy(a)[:, None] for a in self.read_many(self.indices[items]))
        return {"depth": depth, "mask": mask, "valid": valid}

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([item]).items()}


def collate_tiles(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader collate for H5Tiles: a batch from __getitems__ is already stacked, so it is not copied again."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def depth_statistics(dataset: H5Tiles, max_tiles: int) -> tuple[float, float]:
    """Mean and std (mm) of valid depth over up to `max_tiles` evenly spaced tiles: cheap, deterministic."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(max_tiles, len(dataset))).astype(int))
    total = total_sq = count = 0.0
    for i in picks:
        depth, _, valid = dataset.read(int(dataset.indices[i]))
        values = depth[valid].astype(np.float64)
        total, total_sq, count = total + values.sum(), total_sq + (values**2).sum(), count + values.size
    dataset.close()
    if count == 0:
        raise GlintError(f"{dataset.info.path}: no valid depth pixel in the sampled tiles (all 0, NaN or inf)")
    mean = total / count
    std = max((total_sq / count - mean**2) ** 0.5, 1e-6)
    return float(mean), float(std)
