"""A data set's fingerprint: the statistics a training plan is derived from (tile size, depth units and range,
valid pixels, glint share, glint sizes and contrast, frame ids), read through the project's tile reader in bounded
memory: at most `max_tiles` tiles of a split (a seeded sample when there are more) and at most `PIXELS_PER_TILE`
depth values of a tile for the percentiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from glint_lightning.data.h5 import H5Tiles, TileFileInfo
from glint_lightning.data.sources import file_fingerprint
from glint_lightning.metrics import EIGHT_CONNECTED

PIXELS_PER_TILE = 4096  # valid depth values kept per tile for the percentiles (all of a tile up to 64 x 64 px)
RING_PX = 3  # width of the surroundings a glint's depth is compared with
READ_BLOCK = 64  # tiles per read
DEPTH_PERCENTILES = (0.5, 50.0, 99.5)
SIZE_PERCENTILES = (5.0, 50.0, 95.0)


def sample_indices(n: int, max_tiles: int, seed: int) -> tuple[np.ndarray, bool]:
    """(sorted positions to read, whether it is a sample): all of them up to `max_tiles`, else a seeded draw."""
    if n <= max_tiles:
        return np.arange(n), False
    return np.sort(np.random.default_rng(seed).choice(n, size=max_tiles, replace=False)), True


class _Accumulator:
    """Running statistics of tiles (depth mm, mask, valid), kept small: counts, a bounded depth sample, and one
    row per glint (size, extent, contrast)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.tiles = self.pixels = self.valid = self.glint_valid = self.glint_px = self.glint_invalid = 0
        self.empty_tiles = 0
        self.depth: list[np.ndarray] = []
        self.sizes: list[int] = []
        self.extents: list[int] = []
        self.contrasts: list[float] = []

    def add(self, depth: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> None:
        for d, m, v in zip(depth, mask.astype(bool), valid):
            self._add_tile(d, m, v)

    def _add_tile(self, depth: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> None:
        self.tiles += 1
        self.pixels += mask.size
        self.valid += int(valid.sum())
        self.glint_px += int(mask.sum())
        self.glint_valid += int((mask & valid).sum())
        self.glint_invalid += int((mask & ~valid).sum())
        values = depth[valid]
        if values.size > PIXELS_PER_TILE:
            values = self.rng.choice(values, size=PIXELS_PER_TILE, replace=False)
        self.depth.append(values.astype(np.float32))
        labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        if n == 0:
            self.empty_tiles += 1
            return
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            self._add_glint(depth, labels, valid, k, box)

    def _add_glint(self, depth: np.ndarray, labels: np.ndarray, valid: np.ndarray, k: int, box: tuple) -> None:
        """Size (px), extent (the longer side of its bounding box) and the absolute difference between the median
        valid depth inside and in a RING_PX ring around it (other glints excluded), when both have valid pixels."""
        h, w = labels.shape
        ys = slice(max(box[0].start - RING_PX, 0), min(box[0].stop + RING_PX, h))
        xs = slice(max(box[1].start - RING_PX, 0), min(box[1].stop + RING_PX, w))
        inside = labels[ys, xs] == k
        self.sizes.append(int(inside.sum()))
        self.extents.append(max(box[0].stop - box[0].start, box[1].stop - box[1].start))
        grown = ndimage.binary_dilation(inside, structure=EIGHT_CONNECTED, iterations=RING_PX)
        ring = grown & (labels[ys, xs] == 0) & valid[ys, xs]
        inner = inside & valid[ys, xs]
        if ring.any() and inner.any():
            d = depth[ys, xs]
            self.contrasts.append(float(abs(np.median(d[inner]) - np.median(d[ring]))))

    def result(self) -> dict[str, Any]:
        depth = np.concatenate(self.depth) if self.depth else np.zeros(0, np.float32)
        glints = len(self.sizes)

        def pct(values: list | np.ndarray, qs: tuple[float, ...]) -> dict[str, float] | None:
            if len(values) == 0:
                return None
            return {f"p{q:g}": round(float(v), 4) for q, v in zip(qs, np.percentile(values, qs))}

        return {
            "valid_share": _share(self.valid, self.pixels),
            "depth_mm": pct(depth, DEPTH_PERCENTILES),
            "glint_share": _share(self.glint_valid, self.valid),  # of valid pixels: what the loss and metrics see
            "glint_invalid_share": _share(self.glint_invalid, self.glint_px),  # glint pixels without valid depth
            "empty_tile_share": _share(self.empty_tiles, self.tiles),
            "glints": glints,
            "glints_per_tile": round(glints / self.tiles, 4) if self.tiles else None,
            "glint_size_px": pct(self.sizes, SIZE_PERCENTILES),
            "glint_extent_px": pct(self.extents, SIZE_PERCENTILES),
            "glint_contrast_mm": pct(self.contrasts, SIZE_PERCENTILES),
        }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _read(ds: H5Tiles, positions: np.ndarray, acc: _Accumulator) -> None:
    for start in range(0, len(positions), READ_BLOCK):
        acc.add(*ds.read_many(ds.indices[positions[start : start + READ_BLOCK]]))


def split_fingerprint(ds: H5Tiles, max_tiles: int, seed: int) -> dict[str, Any]:
    """Statistics of one split's tiles (all of them, or a seeded sample of `max_tiles`)."""
    positions, sampled = sample_indices(len(ds), max_tiles, seed)
    acc = _Accumulator(seed)
    _read(ds, positions, acc)
    ds.close()
    info = ds.info
    return {
        "tiles": len(ds),
        "tile": [info.height, info.width],
        "files": ds.paths,
        "sampled": sampled,
        "tiles_read": int(len(positions)),
        **acc.result(),
    }


def file_entry(info: TileFileInfo, ds: H5Tiles, max_tiles: int, seed: int) -> dict[str, Any]:
    """One file: layout, depth units, content hash and its own statistics (a sample of `max_tiles` at most)."""
    return {
        "path": info.path,
        "fingerprint": file_fingerprint(info.path),
        "tiles": info.n,
        "tile": [info.height, info.width],
        "depth_dtype": info.depth_dtype,
        "mm_per_unit": info.scale,
        "has_valid": info.has_valid,
        "has_frame": info.has_frame,
        **split_fingerprint(ds, max_tiles, seed),
    }


def depth_units(info: TileFileInfo) -> str:
    """The stored depth and its unit in words, e.g. `uint16 x 0.25 mm`, `float32 mm`, `float32 x 1000 mm (m)`."""
    scale = "" if info.scale == 1.0 else f" x {info.scale:g}"
    metres = " (m)" if info.scale == 1000.0 else ""
    return f"{info.depth_dtype}{scale} mm{metres}"


def fingerprint(
    splits: Mapping[str, H5Tiles], max_tiles: int = 2000, seed: int = 0, split_by: str | None = None
) -> dict[str, Any]:
    """The fingerprint of a data set's splits (datasets as the datamodule cut them) and of each file they read."""
    files: dict[str, TileFileInfo] = {}
    for ds in splits.values():
        files.update({info.path: info for info in ds.files})
    keys = next(iter(splits.values())).keys
    first = next(iter(files.values()))
    return {
        "depth_units": depth_units(first),
        "frames": all(info.has_frame for info in files.values()),
        "split_by": split_by,
        "max_tiles": max_tiles,
        "seed": seed,
        "splits": {name: split_fingerprint(ds, max_tiles, seed) for name, ds in splits.items()},
        "files": [
            file_entry(info, H5Tiles(info, keys), max(max_tiles // max(len(files), 1), 64), seed)
            for info in files.values()
        ],
    }
