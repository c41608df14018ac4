"""HDF5 depth tiles read on demand, a batch at a time, from one file or several read as one.

Handles are opened lazily in the process that reads (each DataLoader worker has its own, one per file), never
before a fork: h5py handles shared across processes corrupt reads.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from glint_lightning.data.transfer import BYTES_PER_PIXEL, SlotPool, SlotRef, batch_views
from glint_lightning.utils.errors import GlintError

DEPTH_DTYPES = (np.float32, np.float16, np.float64, np.uint16)
MASK_CHECK_BLOCK = 256  # tiles per read when checking mask values: bounded memory for files larger than RAM
MAX_OPEN_FILES = 64  # h5py handles kept open per process; beyond, the least recently read file is closed
STATS_BLOCK = 64  # tiles per read for the normalisation statistics


@dataclass(frozen=True)
class TileKeys:
    depth: str = "depth"
    mask: str = "mask"
    valid: str | None = "valid"  # optional: when absent from the file, depth 0 or NaN marks invalid pixels
    frame: str | None = "frame"  # optional (N,) source frame id per tile: held-out splits keep a frame together


@dataclass(frozen=True)
class TileFileInfo:
    path: str
    n: int
    height: int
    width: int
    scale: float  # millimetres per stored unit
    has_valid: bool
    depth_dtype: str = "float32"
    mask_dtype: str = "uint8"
    valid_dtype: str | None = None
    has_frame: bool = False


def _open(path: str | os.PathLike) -> h5py.File:
    p = Path(path)
    if not p.is_file():
        raise GlintError(f"{p}: no such file; check the path (e.g. data.train_path=/abs/path/train.h5)")
    try:
        return h5py.File(p, "r")
    except OSError as err:
        raise GlintError(f"{p}: cannot be read as HDF5 ({err}); pass an HDF5 tile file") from None


def _check_frame(path: str | os.PathLike, f: h5py.File, key: str, n: int) -> None:
    ds = f[key]
    if not isinstance(ds, h5py.Dataset) or ds.shape not in ((n,), (n, 1)) or ds.dtype.kind not in "iu":
        raise GlintError(
            f"{path}: '{key}' is {getattr(ds, 'shape', 'a group')} {getattr(ds, 'dtype', '')}; expected ({n},) "
            "integer frame ids (one per tile), or set data.keys.frame=null"
        )


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
        has_frame = keys.frame is not None and keys.frame in f
        if has_frame:
            _check_frame(path, f, keys.frame, dshape[0])
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
        return TileFileInfo(
            str(path),
            int(dshape[0]),
            int(dshape[1]),
            int(dshape[2]),
            scale,
            has_valid,
            depth_dtype=str(depth.dtype),
            mask_dtype=str(mask.dtype),
            valid_dtype=str(f[keys.valid].dtype) if has_valid else None,
            has_frame=has_frame,
        )


def read_frames(info: TileFileInfo, keys: TileKeys) -> np.ndarray:
    """The file's per-tile frame ids as int64 (N,): 8 bytes a tile, read once at setup and closed again."""
    with _open(info.path) as f:
        return np.asarray(f[keys.frame][()], dtype=np.int64).reshape(-1)


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


def _direct_ok(ds: h5py.Dataset, tile_elements: int) -> bool:
    """Whether each tile is one unfiltered chunk of native bytes: then a tile is read with read_direct_chunk
    straight into the batch buffer, skipping HDF5's selection and conversion machinery."""
    if ds.chunks is None or ds.chunks[0] != 1 or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return False
    plist = ds.id.get_create_plist()
    return (
        plist.get_nfilters() == 0
        and int(np.prod(ds.chunks)) == tile_elements
        and ds.dtype.isnative
        and ds.dtype.kind in "fiub"
        and hasattr(ds.id, "read_direct_chunk")
    )


class _OpenFile:
    """One file's datasets in one process, and how to read a sorted set of its tiles into batch arrays."""

    def __init__(self, info: TileFileInfo, keys: TileKeys) -> None:
        self.info, self.file = info, h5py.File(info.path, "r")
        names = (keys.depth, keys.mask, keys.valid if info.has_valid else None)
        tile = info.height * info.width
        self.datasets = [self.file[k] if k else None for k in names]  # name lookups cost per read
        self.direct = [ds is not None and _direct_ok(ds, tile) for ds in self.datasets]
        self._stage: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.file.close()

    def _staging(self, dtype: np.dtype, k: int) -> np.ndarray:
        """A reused (>= k, H, W) buffer in the stored dtype, for tiles that are converted after reading."""
        buf = self._stage.get(dtype.str)
        if buf is None or len(buf) < k:
            buf = self._stage[dtype.str] = np.empty((max(k, 16), self.info.height, self.info.width), dtype)
        return buf[:k]

    def read(self, local: np.ndarray, pos: np.ndarray, outs: Sequence[np.ndarray | None]) -> None:
        """Tiles `local` (sorted file indices) into out[pos] for depth, mask and valid (None: not stored)."""
        for ds, direct, out in zip(self.datasets, self.direct, outs):
            if ds is None or out is None:
                continue
            if direct:
                self._read_chunks(ds, local, pos, out)
            else:
                self._read_runs(ds, local, pos, out)
        if self.info.scale != 1.0:
            outs[0][pos] *= np.float32(self.info.scale)

    def _read_chunks(self, ds: h5py.Dataset, local: np.ndarray, pos: np.ndarray, out: np.ndarray) -> None:
        same = out.dtype == ds.dtype
        dest = out if same else self._staging(ds.dtype, len(local))
        where = pos if same else np.arange(len(local))
        flat = dest.reshape(len(dest), -1).view(np.uint8)
        zeros = (0,) * (ds.ndim - 1)
        for i, p in zip(local.tolist(), where.tolist()):
            try:
                _, got = ds.id.read_direct_chunk((i, *zeros), out=flat[p])
                ok = len(got) == flat.shape[1]
            except RuntimeError:  # a chunk never written: HDF5 reads its fill value instead
                ok = False
            if not ok:
                dest[p] = ds[i].reshape(dest.shape[1:])
        if not same:
            out[pos] = dest

    @staticmethod
    def _read_runs(ds: h5py.Dataset, local: np.ndarray, pos: np.ndarray, out: np.ndarray) -> None:
        """One h5py read per run of consecutive tiles (compressed or contiguous layouts)."""
        breaks = np.flatnonzero(np.diff(local) != 1) + 1
        for run, where in zip(np.split(local, breaks), np.split(pos, breaks)):
            out[where] = ds[int(run[0]) : int(run[-1]) + 1].reshape(len(run), *out.shape[1:])


class H5Tiles(Dataset):
    """Tiles `indices` of one or more HDF5 files as dicts of depth (mm, float32), mask (float32) and valid (bool).

    Indices are global: a tile's position in the concatenation of `files` in the order given. DataLoader hands
    __getitems__ a whole batch: its tiles are read sorted, file by file, into one buffer.
    """

    def __init__(
        self, files: TileFileInfo | Sequence[TileFileInfo], keys: TileKeys, indices: np.ndarray | None = None
    ) -> None:
        self.files = (files,) if isinstance(files, TileFileInfo) else tuple(files)
        self.keys = keys
        self.offsets = np.concatenate([[0], np.cumsum([f.n for f in self.files])]).astype(np.int64)
        first = self.files[0]
        whole = {"n": int(self.offsets[-1]), "has_frame": all(f.has_frame for f in self.files)}
        self.info = first if len(self.files) == 1 else TileFileInfo(**{**first.__dict__, **whole})
        self.indices = np.arange(self.info.n) if indices is None else np.asarray(indices, dtype=np.int64)
        self._open: OrderedDict[int, _OpenFile] = OrderedDict()
        self._pid: int | None = None
        self.slot_pools: list[SlotPool] | None = None  # set by TileLoader while its workers start

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def label(self) -> str:
        """The file, or the first file and how many more: for messages."""
        more = len(self.files) - 1
        return self.info.path + (f" (and {more} more file{'s' * (more > 1)})" if more else "")

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict(), "_pid": None}

    def is_open(self) -> bool:
        """Whether this process holds an h5py handle of the data set (it must not before forking workers)."""
        return bool(self._open) and self._pid == os.getpid()

    def _own(self) -> None:
        """Forget handles inherited through a fork: they belong to the parent, leave them alone."""
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()

    def _handle(self, f: int) -> _OpenFile:
        self._own()
        handle = self._open.get(f)
        if handle is None:
            if len(self._open) >= MAX_OPEN_FILES:
                self._open.popitem(last=False)[1].close()
            handle = self._open[f] = _OpenFile(self.files[f], self.keys)
        self._open.move_to_end(f)
        return handle

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._open.values():
                handle.close()
        self._open, self._pid = OrderedDict(), None

    def read_into(self, indices: np.ndarray, depth: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> None:
        """Tiles at global `indices` into (k, H, W) arrays: depth in mm (non-finite -> 0), mask, valid.

        Sorted reads, file by file; uncompressed one-tile chunks go straight into the arrays.
        """
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        bounds = np.searchsorted(ordered, self.offsets)
        has_valid = self.info.has_valid
        for f in range(len(self.files)):
            a, b = bounds[f], bounds[f + 1]
            if a < b:
                outs = (depth, mask, valid if has_valid else None)
                self._handle(f).read(ordered[a:b] - self.offsets[f], order[a:b], outs)
        finite = np.isfinite(depth)
        if has_valid:
            np.logical_and(valid, finite, out=valid)
        else:
            np.not_equal(depth, 0, out=valid)
            np.logical_and(valid, finite, out=valid)
        if not finite.all():
            depth[~finite] = 0.0

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tiles at global `indices`: depth in mm (non-finite -> 0), mask, valid, each (k, H, W)."""
        shape = (len(indices), self.info.height, self.info.width)
        depth, mask, valid = np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, bool)
        self.read_into(np.asarray(indices, dtype=np.int64), depth, mask, valid)
        return depth, mask, valid

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw arrays of tile i (global index): depth in mm with non-finite values as 0, mask, valid."""
        depth, mask, valid = self.read_many(np.array([i]))
        return depth[0], mask[0], valid[0]

    @property
    def tile_bytes(self) -> int:
        """Bytes of one tile in a batch (depth, mask, valid): TileLoader sizes its workers' slots with it."""
        return BYTES_PER_PIXEL * self.info.height * self.info.width

    def __getitems__(self, items: list[int]) -> dict[str, torch.Tensor] | SlotRef:
        """A whole batch, already stacked (B, 1, H, W); DataLoader calls this with `collate_fn=collate_tiles`.

        In a worker of a TileLoader the batch goes into a free one of its shared-memory slots and only a SlotRef
        is returned (data/transfer.py); else into plain memory (torch moves it to shared memory to send it).
        """
        indices = self.indices[np.asarray(items, dtype=np.int64)]
        n, h, w = len(indices), self.info.height, self.info.width
        worker = get_worker_info()
        pool = self.slot_pools[worker.id] if worker is not None and self.slot_pools else None
        taken = pool.take(n * self.tile_bytes) if pool is not None else None
        buf = taken[1] if taken is not None else torch.empty(n * self.tile_bytes, dtype=torch.uint8)
        batch = batch_views(buf, n, h, w)
        self.read_into(indices, *(batch[k].numpy().reshape(n, h, w) for k in ("depth", "mask", "valid")))
        return SlotRef(pool.token, taken[0], n, h, w) if taken is not None else batch

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([item]).items()}


def collate_tiles(batch: dict[str, torch.Tensor] | SlotRef | list[dict[str, torch.Tensor]]) -> Any:
    """DataLoader collate for H5Tiles: a batch from __getitems__ is already stacked (or in a slot), so it is
    passed on as it is."""
    return batch if isinstance(batch, (dict, SlotRef)) else default_collate(batch)


def depth_statistics(dataset: H5Tiles, max_tiles: int, clip: tuple[float, float] | None = None) -> tuple[float, float]:
    """Mean and std (mm) of valid depth over up to `max_tiles` evenly spaced tiles: cheap, deterministic. With `clip`
    (low, high) mm, of the depth clipped to it, as the network sees it (models.depth_input)."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(max_tiles, len(dataset))).astype(int))
    total = total_sq = count = 0.0
    for start in range(0, len(picks), STATS_BLOCK):
        depths, _, valids = dataset.read_many(dataset.indices[picks[start : start + STATS_BLOCK]])
        for depth, valid in zip(depths, valids):
            values = depth[valid].astype(np.float64)
            if clip is not None:
                values = np.clip(values, *clip)
            total, total_sq, count = total + values.sum(), total_sq + (values**2).sum(), count + values.size
    dataset.close()
    if count == 0:
        raise GlintError(f"{dataset.label}: no valid depth pixel in the sampled tiles (all 0, NaN or inf)")
    mean = total / count
    std = max((total_sq / count - mean**2) ** 0.5, 1e-6)
    return float(mean), float(std)
