"""Tiles/s delivered by GlintDataModule's training loader (augmentation on; 0, 1 and 2 workers) against raw h5py
reads of the same tiles in the same order, for an uncompressed and an lzf-compressed copy of the file.
Prints the ratios (goals: >= 0.6 of raw with augmentation at 0 workers; workers at least as fast as none).

The readers take turns, round after round, and each reports its median: on a machine shared with other jobs the
load then weighs on all of them alike.

    python -m benchmarks.loader_throughput [--tiles 512] [--tile 128] [--batch 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import Stopwatch, demo_tiles
from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.datamodule import GlintDataModule

WORKERS = (0, 1, 2)


def copy_with(src: Path, dst: Path, compression: str | None) -> Path:
    """The same tiles, one tile per chunk, with `compression` (1-D datasets such as `frame` as they are)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key, ds in f.items():
            if ds.ndim < 2:
                g.create_dataset(key, data=ds[()])
            else:
                g.create_dataset(key, data=ds[()], chunks=(1, *ds.shape[1:]), compression=compression)
    return dst


def raw_epoch(path: Path, order: list[int]) -> tuple[int, float]:
    """The floor: h5py reads of depth, mask and valid for each tile, nothing else."""
    with Stopwatch() as watch, h5py.File(path, "r") as f:
        depth, mask, valid = f["depth"], f["mask"], f["valid"]
        for i in order:
            depth[i], mask[i], valid[i]
    return len(order), watch.seconds


def train_loader(path: Path, workers: int, batch: int):
    """Persistent workers, as in a real training run: otherwise every (short) epoch pays for starting them."""
    dm = GlintDataModule(
        train_path=str(path), val_fraction=0.05, batch_size=batch, num_workers=workers, persistent_workers=True
    )
    dm.setup("fit")
    return dm.train_dataloader()


def loader_epoch(loader) -> tuple[int, float]:
    augment, n = AugmentConfig(), 0
    with Stopwatch() as watch:
        for step, b in enumerate(loader):
            augment_batch(b, augment, torch.Generator().manual_seed(step))  # what on_after_batch_transfer does
            n += b["depth"].shape[0]
    return n, watch.seconds


def measure(path: Path, tiles: int, batch: int, rounds: int) -> dict[str, float]:
    """Median tiles/s of raw h5py and of the loader at each worker count, measured in turns."""
    order = np.random.default_rng(0).permutation(tiles).tolist()
    loaders = {w: train_loader(path, w, batch) for w in WORKERS}
    runs = {"raw": lambda: raw_epoch(path, order), **{w: (lambda ld=ld: loader_epoch(ld)) for w, ld in loaders.items()}}
    rates: dict = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: starts the workers, fills the page cache
    for _ in range(rounds):
        for name, run in runs.items():
            items, seconds = run()
            rates[name].append(items / seconds)
    del loaders, runs
    gc.collect()  # stop the persistent workers before the next file's loaders fork their own
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    src = demo_tiles(args.tiles, args.tile)
    out = Path("outputs/bench")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"loader throughput: {args.tiles} demo tiles of {args.tile}px, batch {args.batch}, augmentation on, "
        f"persistent workers, median of {args.rounds} rounds taken in turns after a warm-up, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  {'file':14s} {'reader':26s} {'tiles/s':>9s} {'vs raw':>7s} {'vs 0 workers':>13s}")
    for compression in (None, "lzf"):
        path = copy_with(src, out / f"tiles-{compression or 'raw'}.h5", compression)
        rates = measure(path, args.tiles, args.batch, args.rounds)
        name, raw = compression or "uncompressed", rates["raw"]
        print(f"  {name:14s} {'raw h5py (random order)':26s} {raw:9.0f} {1:7.2f}")
        for w in WORKERS:
            rate, reader = rates[w], f"DataModule, {w} workers"
            print(f"  {name:14s} {reader:26s} {rate:9.0f} {rate / raw:7.2f} {rate / rates[0]:13.2f}")
        path.unlink()
    print(f"  load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
