"""The built-in synthetic glint data set: depth tiles that look like a structured-light sensor's output.

Surfaces are tilted planes with smooth low-frequency relief and occasional step edges, in millimetres; sensor
noise grows with the square of the depth; dropout holes (depth 0) are invalid pixels, not glints. Glints are
small saturated specular blobs (2-12 px), thin streaks, and missing-depth spots inside bright rims. Small real
bumps act as distractors so that "any small blob" is not the answer. Everything is a function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from glint_lightning.utils.errors import OptionError

SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 2  # bump when the files change (2: `frame`), so cached sets are regenerated


def _disk(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Normalised elliptical distance (1.0 on the ellipse boundary)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2)


def _random_ellipse(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, r: float, aspect: tuple[float, float]
) -> np.ndarray:
    """_disk at a random centre and angle, one radius r and the other r times a random aspect ratio."""
    size = yy.shape[0]
    cy, cx = rng.uniform(0, size), rng.uniform(0, size)
    return _disk(yy, xx, cy, cx, r, r * rng.uniform(*aspect), rng.uniform(0, 3))


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance in pixels from every pixel to the segment p0-p1 (points as (y, x))."""
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def synth_tile(rng: np.random.Generator, size: int, glint_free: bool) -> tuple[np.ndarray, ...]:
    """One tile: depth (float32, mm), mask (uint8 {0,1}), valid (bool)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = xx / size - 0.5, yy / size - 0.5
    base = rng.uniform(600.0, 2500.0)
    z = base + rng.uniform(-250, 250) * u + rng.uniform(-250, 250) * v
    for _ in range(rng.integers(1, 4)):  # smooth low-frequency relief
        f = rng.uniform(0.5, 2.5)
        z += rng.uniform(5, 60) * np.sin(2 * np.pi * f * (np.cos(a := rng.uniform(0, np.pi)) * u + np.sin(a) * v))
    if rng.random() < 0.35:  # a step edge where one object occludes another
        a = rng.uniform(0, 2 * np.pi)
        z += rng.uniform(-300, 300) * ((np.cos(a) * u + np.sin(a) * v) > rng.uniform(-0.3, 0.3))
    for _ in range(rng.poisson(1.5)):  # distractors: small real bumps, not glints
        r = rng.uniform(1.5, 6.0)
        d = _random_ellipse(rng, yy, xx, r, (0.6, 1.4))
        z += rng.uniform(-60, 60) * np.clip(1.0 - d, 0.0, 1.0)

    z = np.maximum(z, 250.0)  # the sensor's minimum range
    mask = np.zeros((size, size), dtype=bool)
    spike = np.zeros((size, size), dtype=np.float32)
    missing = np.zeros((size, size), dtype=bool)
    n_glints = 0 if glint_free else rng.integers(1, 5)
    for _ in range(n_glints):
        kind = rng.choice(3, p=[0.5, 0.25, 0.25])
        cy, cx = rng.uniform(2, size - 2, size=2)
        height = rng.uniform(150, 900) * rng.choice([-1.0, 1.0], p=[0.3, 0.7])  # saturated near/far readings
        if kind == 0:  # specular blob, 2-12 px across
            r = rng.uniform(1.0, 6.0)
            d = _disk(yy, xx, cy, cx, r, r * rng.uniform(0.6, 1.4), rng.uniform(0, 3))
            area = d <= 1.0
            spike = np.where(area, np.maximum(spike, np.clip((1.0 - d) * 4.0, 0.35, 1.0) * height), spike)
        elif kind == 1:  # streak
            length, angle = rng.uniform(6, 24), rng.uniform(0, np.pi)
            half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
            area = _segment_distance(yy, xx, np.array([cy, cx]) - half, np.array([cy, cx]) + half) <= rng.uniform(
                0.6, 1.4
            )
            spike = np.where(area, height, spike)
        else:  # missing-depth spot inside a bright rim
            r_in = rng.uniform(1.0, 3.5)
            d = _disk(yy, xx, cy, cx, r_in, r_in, 0.0)
            hole, rim = d <= 1.0, (d > 1.0) & (d <= 1.0 + rng.uniform(1.0, 2.5) / r_in)
            missing |= hole
            spike = np.where(rim, abs(height), spike)
            area = hole | rim
        mask |= area

    z = z + spike
    z = z + rng.standard_normal(z.shape).astype(np.float32) * (1.5e-6 * z**2)
    z[missing] = 0.0
    valid = np.ones((size, size), dtype=bool)
    for _ in range(rng.poisson(0.8)):  # sensor dropout: depth 0, not scored, not a glint
        r = rng.uniform(2.0, 9.0)
        d = _random_ellipse(rng, yy, xx, r, (0.4, 1.0))
        hole = (d + 0.15 * rng.standard_normal(d.shape)) <= 1.0
        hole &= ~mask
        valid &= ~hole
    z[~valid] = 0.0
    return z.astype(np.float32), mask.astype(np.uint8), valid


def write_split(path: Path, n: int, size: int, seed: int, glint_free_fraction: float = 0.2) -> None:
    """Write one split file in the framework's tile format, one tile per HDF5 chunk.

    Each tile is its own synthetic frame, recorded in `frame` as glint-convert does, so splits go by frame.
    """
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("frame", data=np.arange(n, dtype=np.int64))
        depth = f.create_dataset("depth", (n, size, size), dtype="float32", chunks=(1, size, size))
        mask = f.create_dataset("mask", (n, size, size), dtype="uint8", chunks=(1, size, size))
        valid = f.create_dataset("valid", (n, size, size), dtype="bool", chunks=(1, size, size))
        depth.attrs["units"] = "mm"
        for i in range(n):
            depth[i], mask[i], valid[i] = synth_tile(rng, size, glint_free=rng.random() < glint_free_fraction)


def make_demo(
    out: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_test: int,
    tile: int,
    seed: int,
    overwrite: bool = True,
) -> dict[str, str]:
    """Write train/val/test files into the folder `out` atomically; returns {split: path}.

    With overwrite=False an existing `out` (written by a concurrent job) is kept and this copy dropped.
    """
    out = Path(out)
    if tile < 16:
        raise OptionError(f"make_demo: tile={tile} is too small; use tile>=16")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for i, split in enumerate(SPLITS):
            if counts[split] > 0:
                write_split(tmp / f"{split}.h5", counts[split], tile, seed=seed * 1000 + i)
        params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "tile": tile, "seed": seed}
        (tmp / "params.json").write_text(json.dumps(params, indent=1))
        if out.exists() and overwrite:
            shutil.rmtree(out)
        if not out.exists():
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {s: str(out / f"{s}.h5") for s in SPLITS if counts[s] > 0}


def demo_folder(cache_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, tile: int, seed: int) -> Path:
    """Where the demo set for these parameters lives: a hash of them, so every rank and sweep job agrees."""
    params = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "tile": tile,
        "seed": seed,
        "v": GENERATOR_VERSION,
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"demo-{tile}px-{key}"


def cached_demo(cache_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, tile: int, seed: int) -> Path:
    """The demo folder for these parameters, generated on first use.

    Generation writes to a temporary folder and renames it, so concurrent jobs never see half a file.
    """
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "tile": tile, "seed": seed}
    folder = demo_folder(cache_dir, **params)
    if not (folder / "params.json").exists():
        make_demo(folder, **params, overwrite=False)
    return folder
