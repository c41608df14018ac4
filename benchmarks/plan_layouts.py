"""Two synthetic data sets in layouts other than the demo set's, for benchmarks.plan_budget:

- `sparse128`: 128 px tiles of uint16 depth in 0.25 mm units (the `scale` attribute), sparse 1-3 px glints (0-3 a
  tile, 40 % of tiles without), small real bumps and dropout pixels as distractors, no frame ids;
- `blobs48`: 48 px float32 tiles in metres (`scale` 1000), large glint blobs (4-10 px radius) that are partly
  missing depth, many holes (blob-shaped dropouts and scattered NaN), frame ids (4 tiles a frame).

Each is train/val/test .h5 files written once into a folder keyed by the layout, sizes and seed.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

LAYOUTS = ("sparse128", "blobs48")


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A tilted plane with low-frequency relief, in mm."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    z = rng.uniform(700, 2200) + rng.uniform(-200, 200) * xx + rng.uniform(-200, 200) * yy
    for _ in range(2):
        a, f = rng.uniform(0, np.pi), rng.uniform(0.5, 2.0)
        z += rng.uniform(5, 40) * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    return z


def sparse128(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One tile: depth (uint16, 0.25 mm units; 0 = no reading) and mask."""
    size = 128
    z = _surface(rng, size)
    z += rng.normal(0, 1.5e-6, (size, size)) * z**2  # noise grows with the square of the depth
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.poisson(3)):  # distractors: small real bumps
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 3)
        z += rng.uniform(-30, 30) * np.clip(1 - np.hypot(yy - cy, xx - cx) / r, 0, 1)
    mask = np.zeros((size, size), np.uint8)
    n = 0 if rng.random() < 0.4 else rng.integers(1, 4)
    for _ in range(n):
        y, x = rng.integers(1, size - 4, 2)
        h, w = rng.integers(1, 4, 2)
        mask[y : y + h, x : x + w] = 1
        z[y : y + h, x : x + w] += rng.choice([-1.0, 1.0]) * rng.uniform(60, 400)  # saturated near/far readings
    units = np.clip(np.round(z / 0.25), 1, 65535).astype(np.uint16)
    units[rng.random((size, size)) < 0.01] = 0  # dropout: invalid, not glint
    return units, mask


def blobs48(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One tile: depth (float32 metres; NaN = no reading) and mask."""
    size = 48
    z = _surface(rng, size) + rng.normal(0, 2.0, (size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    invalid = rng.random((size, size)) < 0.05
    for _ in range(rng.integers(1, 4)):  # blob-shaped dropouts: holes that are not glints
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 7)
        invalid |= np.hypot(yy - cy, (xx - cx) * rng.uniform(0.6, 1.4)) < r
    mask = np.zeros((size, size), np.uint8)
    for _ in range(0 if rng.random() < 0.2 else rng.integers(1, 3)):
        cy, cx, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(4, 10)
        d = np.hypot(yy - cy, (xx - cx) * rng.uniform(0.6, 1.4)) / r
        blob = d < 1
        mask[blob] = 1
        z[blob] += rng.choice([-1.0, 1.0]) * rng.uniform(40, 300) * (1.2 - d[blob])  # a bright dome
        invalid &= ~blob
        invalid |= d < rng.uniform(0.0, 0.5)  # its saturated core reads nothing
    depth = (z / 1000.0).astype(np.float32)
    depth[invalid] = np.nan
    return depth, mask


def write_split(path: Path, layout: str, n: int, seed: int) -> None:
    make = {"sparse128": sparse128, "blobs48": blobs48}[layout]
    rng = np.random.default_rng(seed)
    tiles = [make(rng) for _ in range(n)]
    depth, mask = np.stack([t[0] for t in tiles]), np.stack([t[1] for t in tiles])
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("depth", data=depth, chunks=(1, *depth.shape[1:]))
        d.attrs["scale"] = 0.25 if layout == "sparse128" else 1000.0
        f.create_dataset("mask", data=mask, chunks=(1, *mask.shape[1:]))
        if layout == "blobs48":
            f.create_dataset("frame", data=np.arange(n, dtype=np.int64) // 4 + seed * 10**6)
    tmp.replace(path)


def layout_files(root: Path, layout: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """{split: file} of a layout, generated when missing."""
    folder = root / f"{layout}-{n_train}-{n_val}-{n_test}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        files[split] = folder / f"{split}.h5"
        if not files[split].is_file():
            write_split(files[split], layout, n, seed * 3 + i + 1)
    return files
