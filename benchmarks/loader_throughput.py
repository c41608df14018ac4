"""Tiles/s delivered by GlintDataModule's training loader (augmentation on; 0, 1 and 2 workers) against raw h5py
reads of the same tiles in the same order, for an uncompressed and an lzf-compressed copy of the file.
Prints the ratios (goals: >= 0.6 of raw with augmentation at 0 workers; workers at least as fast as none).

The readers take turns, round after round, and each reports its median: on a machine shared with other jobs the
load then weighs on all of them alike.

    python -m benchmarks.loader_throughput [--tiles 512] [--tile 128] [--batch 16] [--rounds 5]

`--transport` instead compares how batches cross from 2 workers to the main process: the module's TileLoader
(shared-memory slots, data/transfer.py) against the stock DataLoader (pin_memory, the same batched h5py reads
through H5Tiles.__getitems__), taking turns round after round; it prints the medians and their ratio. Issue 20's
rule: the slots stay only at >= 1.3x. The README's figures came from

    python -m benchmarks.loader_throughput --transport --tiles 2048 --tile 128 --batch 16 --rounds 11
    (also --tiles 4096 --tile 64 --batch 32, the demo's, and --tiles 1024 --tile 256)
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
from glint_lightning.data.datamodule import EpochShuffleSampler, GlintDataModule
from glint_lightning.data.h5 import collate_tiles

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


def random_file(path: Path, tiles: int, size: int) -> Path:
    """Random tiles in the framework's layout (float32 depth, uint8 mask, bool valid, one tile per chunk)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        chunks = (1, size, size)
        f.create_dataset("depth", data=rng.uniform(500, 1500, (tiles, size, size)).astype(np.float32), chunks=chunks)
        f.create_dataset("mask", data=(rng.random((tiles, size, size)) < 0.05).astype(np.uint8), chunks=chunks)
        f.create_dataset("valid", data=rng.random((tiles, size, size)) < 0.95, chunks=chunks)
    return path


def transport_loaders(path: Path, batch: int, workers: int) -> dict:
    """The module's TileLoader (slots) and a stock DataLoader over a data set of its own, same order and reads."""
    out = {}
    for name in ("slots", "stock"):
        dm = GlintDataModule(
            train_path=str(path),
            val_fraction=0.05,
            batch_size=batch,
            num_workers=workers,
            persistent_workers=True,
            pin_memory=True,
            norm_samples=8,
        )
        dm.setup("fit")
        if name == "slots":
            out[name] = dm.train_dataloader()
        else:
            ds = dm.datasets["train"]
            out[name] = torch.utils.data.DataLoader(
                ds,
                batch_size=batch,
                sampler=EpochShuffleSampler(len(ds), 0),
                num_workers=workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=True,
                collate_fn=collate_tiles,
                drop_last=True,
            )
    return out


def drain(loader) -> tuple[int, float]:
    """Tiles/s of one epoch; each batch is touched (summed) as a training step would read it."""
    n = 0
    with Stopwatch() as watch:
        for b in loader:
            b["depth"].sum(), b["mask"].sum(), b["valid"].sum()
            n += b["depth"].shape[0]
    return n, watch.seconds


def compare_transport(args: argparse.Namespace) -> None:
    """Median tiles/s of the slots and of the stock DataLoader over random tiles, measured in turns."""
    path = random_file(Path("outputs/bench/transport.h5"), args.tiles, args.tile)
    loaders = transport_loaders(path, args.batch, 2)
    rates: dict = {name: [] for name in loaders}
    for loader in loaders.values():
        drain(loader)  # warm-up: starts the persistent workers, fills the page cache
    for r in range(args.rounds):
        for name in sorted(loaders, reverse=r % 2 == 1):  # alternate who goes first
            n, seconds = drain(loaders[name])
            rates[name].append(n / seconds)
    slots, stock = (statistics.median(rates[k]) for k in ("slots", "stock"))
    batches = len(loaders["stock"]) * args.rounds
    print(
        f"transport: {args.tiles} random tiles of {args.tile}px, batch {args.batch}, 2 workers, persistent, "
        f"pin_memory {'on' if torch.cuda.is_available() else 'off (no CUDA)'}, {batches} batches per loader in "
        f"{args.rounds} rounds taken in turns, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    for name in ("slots", "stock"):
        each = [round(x) for x in rates[name]]
        print(f"  {name:6s} median {statistics.median(rates[name]):8.0f} tiles/s, rounds {each}")
    paired = statistics.median(a / b for a, b in zip(rates["slots"], rates["stock"]))
    print(
        f"  slots / stock = {slots / stock:.2f} (medians), {paired:.2f} (median of each round's ratio); rule: >= 1.30"
    )
    del loaders
    gc.collect()
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transport", action="store_true", help="slots vs the stock DataLoader, 2 workers")
    args = parser.parse_args()
    if args.transport:
        Path("outputs/bench").mkdir(parents=True, exist_ok=True)
        return compare_transport(args)
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
