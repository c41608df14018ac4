"""Peak resident memory of one loader epoch over a 0.5 GB and a 4 GB tile file: the DataModule streams tiles,
so the two should differ by far less than the files do (goal: < 300 MB). Each measurement runs in a fresh
process; the files are written under outputs/bench/ and deleted afterwards.

    python -m benchmarks.memory [--sizes-gb 0.5 4] [--tile 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np


def write_file(path: Path, gigabytes: float, tile: int) -> int:
    """Noise tiles (float32 depth, uint8 mask, bool valid), one tile per chunk; returns the tile count."""
    n = int(gigabytes * 2**30 / (tile * tile * 6))
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        depth = f.create_dataset("depth", (n, tile, tile), "f4", chunks=(1, tile, tile))
        mask = f.create_dataset("mask", (n, tile, tile), "u1", chunks=(1, tile, tile))
        valid = f.create_dataset("valid", (n, tile, tile), "bool", chunks=(1, tile, tile))
        block = 256
        for start in range(0, n, block):
            k = min(block, n - start)
            depth[start : start + k] = rng.uniform(400, 1600, (k, tile, tile)).astype("f4")
            mask[start : start + k] = (rng.random((k, tile, tile)) < 0.01).astype("u1")
            valid[start : start + k] = True
    return n


def epoch_peak_rss(path: str, workers: int) -> dict:
    """Runs in the child: one epoch of the training loader; peak RSS of this process and its workers."""
    from glint_lightning.data.datamodule import GlintDataModule

    dm = GlintDataModule(train_path=path, val_fraction=0.01, batch_size=16, num_workers=workers)
    dm.setup("fit")
    tiles = sum(b["depth"].shape[0] for b in dm.train_dataloader())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tiles": tiles, "main_mb": own, "worker_mb": children}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 4.0])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(epoch_peak_rss(args.child[0], int(args.child[1]))))
        return
    out = Path("outputs/bench")
    out.mkdir(parents=True, exist_ok=True)
    print(f"memory: peak RSS of one training-loader epoch ({args.tile}px tiles, {args.workers} workers)")
    peaks = []
    for gb in args.sizes_gb:
        path = out / f"memory-{gb}gb.h5"
        n = write_file(path, gb, args.tile)
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--child", str(path), str(args.workers)],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(res.stdout.strip().splitlines()[-1])
        size_gb = path.stat().st_size / 2**30
        path.unlink()
        peaks.append(peak["main_mb"] + peak["worker_mb"])
        print(
            f"  {size_gb:5.2f} GB file, {n:6d} tiles: main {peak['main_mb']:6.0f} MB, largest worker "
            f"{peak['worker_mb']:6.0f} MB"
        )
    if len(peaks) > 1:
        print(f"  difference (main + worker): {peaks[-1] - peaks[0]:+.0f} MB   (goal < 300 MB)")


if __name__ == "__main__":
    main()
