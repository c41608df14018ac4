"""Tiles/s delivered by GlintDataModule's training loader (augmentation on; 0, 1 and 2 workers) against raw
h5py reads of the same tiles in the same order, for an uncompressed and an lzf-compressed copy of the file.
Prints the ratios (goal >= 0.6 of raw with augmentation).

    python -m benchmarks.loader_throughput [--tiles 512] [--tile 128] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import Stopwatch, demo_tiles, median_rate
from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.datamodule import GlintDataModule


def copy_with(src: Path, dst: Path, compression: str | None) -> Path:
    """The same tiles, one tile per chunk, with `compression`."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key, ds in f.items():
            g.create_dataset(key, data=ds[()], chunks=(1, *ds.shape[1:]), compression=compression)
    return dst


def raw_epoch(path: Path, order: list[int]) -> tuple[int, float]:
    """The floor: h5py reads of depth, mask and valid for each tile, nothing else."""
    with Stopwatch() as watch, h5py.File(path, "r") as f:
        depth, mask, valid = f["depth"], f["mask"], f["valid"]
        for i in order:
            depth[i], mask[i], valid[i]
    return len(order), watch.seconds


def datamodule(path: Path, workers: int, batch: int) -> GlintDataModule:
    """Persistent workers, as in a real training run: otherwise every (short) epoch pays for starting them."""
    dm = GlintDataModule(
        train_path=str(path), val_fraction=0.05, batch_size=batch, num_workers=workers, persistent_workers=True
    )
    dm.setup("fit")
    return dm


def loader_epoch(loader) -> tuple[int, float]:
    augment, n = AugmentConfig(), 0
    with Stopwatch() as watch:
        for step, b in enumerate(loader):
            augment_batch(b, augment, torch.Generator().manual_seed(step))  # what on_after_batch_transfer does
            n += b["depth"].shape[0]
    return n, watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    src = demo_tiles(args.tiles, args.tile)
    out = Path("outputs/bench")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"loader throughput: {args.tiles} demo tiles of {args.tile}px, batch {args.batch}, augmentation on, "
        f"persistent workers, median of {args.rounds} epochs after a warm-up epoch"
    )
    print(f"  {'file':14s} {'reader':26s} {'tiles/s':>9s} {'vs raw':>7s}")
    for compression in (None, "lzf"):
        path = copy_with(src, out / f"tiles-{compression or 'raw'}.h5", compression)
        order = np.random.default_rng(0).permutation(args.tiles).tolist()
        raw = median_rate(partial(raw_epoch, path, order), args.rounds)
        name = compression or "uncompressed"
        print(f"  {name:14s} {'raw h5py (random order)':26s} {raw:9.0f} {1:7.2f}")
        for workers in (0, 1, 2):
            loader = datamodule(path, workers, args.batch).train_dataloader()
            loader_epoch(loader)  # starts the workers
            rate = median_rate(partial(loader_epoch, loader), args.rounds)
            del loader
            gc.collect()  # stop the persistent workers before the next loader forks its own
            print(f"  {name:14s} {f'DataModule, {workers} workers':26s} {rate:9.0f} {rate / raw:7.2f}")
        path.unlink()


if __name__ == "__main__":
    main()
