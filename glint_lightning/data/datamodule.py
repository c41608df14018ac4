"""LightningDataModule over HDF5 tile files: separate split files, or one file with split fractions."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.demo import cached_demo, demo_folder
from glint_lightning.data.h5 import H5Tiles, TileKeys, collate_tiles, depth_statistics, inspect_tile_file
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.seeding import STREAM_AUGMENT, STREAM_SHUFFLE, derive_seed


class EpochShuffleSampler(Sampler[int]):
    """This rank's share of a permutation keyed to (seed, epoch), from tile `start` on.

    Resuming at epoch e replays exactly epoch e's order, and `start` skips what a mid-epoch checkpoint already
    trained on. Under DDP every rank draws the same permutation and takes every `world_size`-th tile of it, so the
    shards are disjoint and cover the set; each rank gets `n // world_size` tiles (a different few are left out
    each epoch) because DDP needs the same number of steps on every rank. Lightning calls `set_epoch`.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_SHUFFLE, self.epoch))
        share = torch.randperm(self.n, generator=g)[self.rank :: self.world_size][: len(self)]
        return iter(share[self.start :].tolist())

    def __len__(self) -> int:
        return self.n // self.world_size


class ResumableLoader(DataLoader):
    """The training loader, able to continue an epoch where a mid-epoch checkpoint (every N steps, SIGTERM) left it.

    Lightning stores `state_dict()` in the checkpoint and calls `load_state_dict()` before iterating again. The
    datamodule counts batches as they reach the training step, so batches a worker prefetched do not count.
    """

    batches_done = 0
    _resume_at = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffleSampler):  # overfit_batches swapped in a SequentialSampler
            return
        if state["batches_done"] < len(self):
            self.sampler.set_epoch(state["epoch"])
            self._resume_at = int(state["batches_done"])
        else:  # saved after the epoch's last step: Lightning only finishes that epoch, the next one starts afresh
            self.sampler.set_epoch(state["epoch"] + 1)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.start = self._resume_at * self.batch_size
        self.batches_done, self._resume_at = self._resume_at, 0
        return super().__iter__()


class GlintDataModule(L.LightningDataModule):
    """Train/val/test tiles from HDF5, normalisation statistics from the training file, train-time augmentation.

    With no `train_path` and a `demo` block, the built-in synthetic set is generated once into `demo.cache_dir`;
    a `val_path` or `test_path` given with it replaces that demo split.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        keys: Mapping[str, str | None] | None = None,
        depth_scale: float | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        augment: Mapping[str, Any] | None = None,
        norm_samples: int = 256,
        seed: int = 0,
        demo: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise GlintError(f"data.batch_size={batch_size}; use a positive batch size (e.g. data.batch_size=16)")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise GlintError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be in [0, 1) "
                "and together below 1"
            )
        self.demo = dict(demo) if demo else None
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.demo_splits: set[str] = set()  # splits read from the generated demo set
        if train_path is None:
            if self.demo is None:
                raise GlintError("data.train_path is not set; pass data.train_path=/path/train.h5 (or use data=demo)")
            folder = demo_folder(**self.demo)
            counts = {"train": 1, "val": self.demo["n_val"], "test": self.demo["n_test"]}
            self.demo_splits = {name for name, path in self.paths.items() if path is None and counts[name]}
            self.paths.update({name: str(folder / f"{name}.h5") for name in self.demo_splits})
        self.keys = TileKeys(**(keys or {}))
        self.augment = AugmentConfig(**(augment or {}))
        self.depth_scale = depth_scale
        self.seed = seed
        self.datasets: dict[str, H5Tiles] = {}
        self.depth_stats: tuple[float, float] | None = None

    def prepare_data(self) -> None:
        if self.demo is not None and self.hparams.train_path is None:
            cached_demo(**self.demo)

    def _split_indices(self, n: int) -> dict[str, np.ndarray]:
        """Indices per split of the training file, drawn with `split_seed` (only for splits without a file)."""
        order = np.random.default_rng(self.hparams.split_seed).permutation(n)
        n_val = 0 if self.paths["val"] else int(round(n * self.hparams.val_fraction))
        n_test = 0 if self.paths["test"] else int(round(n * self.hparams.test_fraction))
        return {
            "val": np.sort(order[:n_val]),
            "test": np.sort(order[n_val : n_val + n_test]),
            "train": np.sort(order[n_val + n_test :]),
        }

    def setup(self, stage: str | None = None) -> None:
        if "train" in self.datasets:
            return
        info = inspect_tile_file(self.paths["train"], self.keys, self.depth_scale)
        split = self._split_indices(info.n)
        self.datasets["train"] = H5Tiles(info, self.keys, split["train"])
        for name in ("val", "test"):
            if self.paths[name]:
                self.datasets[name] = H5Tiles(
                    inspect_tile_file(self.paths[name], self.keys, self.depth_scale), self.keys
                )
            elif len(split[name]):
                self.datasets[name] = H5Tiles(info, self.keys, split[name])
        for name, ds in self.datasets.items():
            self._check_not_empty(name, ds)
        if "val" not in self.datasets:
            raise GlintError(
                f"{self.paths['train']}: no validation tiles; set data.val_path=... or data.val_fraction>0"
            )
        self.depth_stats = depth_statistics(self.datasets["train"], self.hparams.norm_samples)

    def setup_split(self, name: str) -> None:
        """Open only what scoring split `name` (train, val or test) needs: its own file when it has one (a file of
        the demo set is generated first), else the training file and its split, as `setup` does."""
        own = self.paths[name] if name != "train" else None
        if own is None:
            self.prepare_data()
            self.setup()
            return
        if name in self.demo_splits:
            self.prepare_data()
        if name not in self.datasets:
            self.datasets[name] = H5Tiles(inspect_tile_file(own, self.keys, self.depth_scale), self.keys)
            self._check_not_empty(name, self.datasets[name])

    @staticmethod
    def _check_not_empty(name: str, ds: H5Tiles) -> None:
        if len(ds) == 0:
            raise GlintError(
                f"{ds.info.path}: the {name} split is empty; add tiles or change data.val_fraction/test_fraction"
            )

    def describe(self) -> dict[str, Any]:
        """Plain-data summary written next to the run: files, split sizes, normalisation statistics."""
        return {
            "splits": {k: {"path": ds.info.path, "tiles": len(ds)} for k, ds in self.datasets.items()},
            "depth_mean_mm": self.depth_stats[0] if self.depth_stats else None,
            "depth_std_mm": self.depth_stats[1] if self.depth_stats else None,
        }

    def save_description(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.describe(), indent=1))

    def has_split(self, name: str) -> bool:
        return name in self.datasets

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader_options(self) -> dict[str, Any]:
        workers = self.hparams.num_workers
        persistent = self.hparams.persistent_workers and workers > 0
        return {
            "num_workers": workers,
            "pin_memory": self.hparams.pin_memory,
            "persistent_workers": persistent,
            "collate_fn": collate_tiles,
        }

    def eval_loader(self, name: str, shard: bool = True) -> DataLoader:
        """Tiles of split `name` in file order; under DDP (shard=True) each rank gets its own slice, and
        torchmetrics sums the counts over ranks."""
        ds = self.datasets[name]
        rank, world = self._rank_and_world() if shard else (0, 1)
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return DataLoader(ds, batch_size=batch_size, sampler=range(rank, len(ds), world), **self._loader_options())

    def train_dataloader(self) -> ResumableLoader:
        ds = self.datasets["train"]
        rank, world = self._rank_and_world()
        sampler = EpochShuffleSampler(len(ds), self.seed, rank, world)
        if self.trainer is not None:  # Lightning sets the epoch only after the first iter(); workers start before
            sampler.set_epoch(self.trainer.current_epoch)
        batch_size = self.hparams.batch_size
        self.train_loader = ResumableLoader(
            ds, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) > batch_size, **self._loader_options()
        )
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise GlintError("no test split; set data.test_path=... or data.test_fraction>0")
        return self.eval_loader("test")

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        self.train_loader.batches_done += 1
        device = batch["depth"].device
        g = torch.Generator(device=device if device.type == "cuda" else "cpu")
        g.manual_seed(derive_seed(self.seed, STREAM_AUGMENT, trainer.global_step))
        return augment_batch(batch, self.augment, g)
