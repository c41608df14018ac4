"""LightningDataModule over HDF5 tile files: separate split files, or splits and folds cut from the training
files by frame, file or tile."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler

from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.demo import cached_demo, demo_folder
from glint_lightning.data.h5 import H5Tiles, TileKeys, collate_tiles, depth_statistics
from glint_lightning.data.sources import (
    SPLIT_UNITS,
    UNIT_NAMES,
    choose_split_by,
    file_fingerprint,
    inspect_files,
    resolve_paths,
    tile_units,
)
from glint_lightning.data.splits import assign_folds, hold_out
from glint_lightning.data.transfer import TileLoader
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.seeding import STREAM_AUGMENT, STREAM_SHUFFLE, derive_seed

log = logging.getLogger(__name__)
PathSpec = str | os.PathLike | Sequence[str]  # a file, a glob or a list of them


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise GlintError(
            f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be in [0, 1) "
            "and together below 1"
        )


def _depth_clip(value: Sequence[float] | None) -> tuple[float, float] | None:
    """data.depth_clip as (low, high) mm, or None for no clip."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not low < high or math.isinf(low) or math.isinf(high):  # also NaN
        raise GlintError(
            f"data.depth_clip={value}; use null or [low, high] in mm with low < high, e.g. data.depth_clip=[500,3000]"
        )
    return low, high


def _check_folds(folds: int | None, fold: int | None, val_path: PathSpec | None) -> None:
    if folds is None:
        if fold is not None:
            raise GlintError(f"data.fold={fold} without data.folds; set data.folds=K (the number of folds) too")
        return
    if folds < 2:
        raise GlintError(f"data.folds={folds}; use at least 2 folds, or data.folds=null for no cross-validation")
    if fold is None or not 0 <= fold < folds:
        raise GlintError(
            f"data.fold={fold} is outside 0..{folds - 1}; set the fold to validate on (data.folds={folds})"
        )
    if val_path:
        raise GlintError(
            f"data.folds={folds} with data.val_path={val_path}: folds validate on training tiles; drop one of them"
        )


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


class ResumableLoader(TileLoader):
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
    """Train/val/test tiles from HDF5, normalisation statistics from the training files, train-time augmentation.

    Each `*_path` is a file, a list of files or a glob, read lazily as one set. Splits cut from the training files
    (val_fraction, test_fraction, folds) take whole units (`split_by`: frames, files or tiles); global tile index =
    position in the concatenation of the training files in the order listed (a glob sorted by path).
    With no `train_path` and a `demo` block, the built-in synthetic set is generated once into `demo.cache_dir`;
    a `val_path` or `test_path` given with it replaces that demo split.
    """

    def __init__(
        self,
        train_path: PathSpec | None = None,
        val_path: PathSpec | None = None,
        test_path: PathSpec | None = None,
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
        folds: int | None = None,
        fold: int | None = None,
        split_by: str | None = None,
        depth_clip: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        # The frame passed, not looked up: Lightning's lookup leaves this module in a reference cycle, and its
        # persistent workers then stop only when the cycle collector runs (waiting 5 s each for a lost stop signal).
        self.save_hyperparameters(frame=inspect.currentframe())
        if batch_size < 1:
            raise GlintError(f"data.batch_size={batch_size}; use a positive batch size (e.g. data.batch_size=16)")
        _check_fractions(val_fraction if folds is None else 0.0, test_fraction)
        _check_folds(folds, fold, val_path)
        if split_by not in (None, *SPLIT_UNITS):
            raise GlintError(f"data.split_by={split_by}; use file, frame, tile or null (frame when files record it)")
        self.demo = dict(demo) if demo else None
        self.paths: dict[str, PathSpec | None] = {"train": train_path, "val": val_path, "test": test_path}
        self.demo_splits: set[str] = set()  # splits read from the generated demo set
        if train_path is None:
            if self.demo is None:
                raise GlintError("data.train_path is not set; pass data.train_path=/path/train.h5 (or use data=demo)")
            folder = demo_folder(**self.demo)
            counts = {"train": 1, "val": 0 if folds else self.demo["n_val"], "test": self.demo["n_test"]}
            self.demo_splits = {name for name, path in self.paths.items() if path is None and counts[name]}
            self.paths.update({name: str(folder / f"{name}.h5") for name in self.demo_splits})
        self.keys = TileKeys(**(keys or {}))
        self.augment = AugmentConfig(**(augment or {}))
        self.depth_scale = depth_scale
        self.depth_clip = _depth_clip(depth_clip)  # mm; the statistics and the network input both see it
        self.seed = seed
        self.datasets: dict[str, H5Tiles] = {}
        self.depth_stats: tuple[float, float] | None = None
        self.split_by: str | None = None  # the unit of cut splits, known after setup()
        self.cut: set[str] = set()  # splits cut from the training files
        self._units: dict[str, np.ndarray] = {}
        self._fingerprints: dict[str, str] = {}

    def prepare_data(self) -> None:
        if self.demo is not None and self.hparams.train_path is None:
            cached_demo(**self.demo)

    def _open_split(self, name: str) -> H5Tiles:
        """All tiles of split `name`'s own file(s)."""
        option = f"data.{name}_path"
        infos = inspect_files(resolve_paths(self.paths[name], option), self.keys, self.depth_scale, option)
        return H5Tiles(infos, self.keys)

    def setup(self, stage: str | None = None) -> None:
        if "train" in self.datasets:
            return
        hp = self.hparams
        train = self._open_split("train")
        n = len(train)
        cut_test = not self.paths["test"] and hp.test_fraction > 0
        cut_val = hp.folds is not None or (not self.paths["val"] and hp.val_fraction > 0)
        self.split_by, note = choose_split_by(hp.split_by, train.files, self.keys)
        if note and (cut_test or cut_val):
            log.info("note: %s", note)
        units = tile_units(train.files, self.keys, self.split_by)
        targets = [round(n * hp.test_fraction) if cut_test else 0, round(n * hp.val_fraction) if cut_val else 0]
        (test, val), rest = hold_out(units, targets if hp.folds is None else [targets[0], 0], hp.split_seed)
        if hp.folds is not None:
            fold_of = assign_folds(units[rest], hp.folds, hp.split_seed)
            val, rest = rest[fold_of == hp.fold], rest[fold_of != hp.fold]
        self.cut = {name for name, on in (("val", cut_val), ("test", cut_test)) if on}
        self.datasets["train"] = H5Tiles(train.files, self.keys, rest)
        for name, indices in (("val", val), ("test", test)):
            if name in self.cut:
                self.datasets[name] = H5Tiles(train.files, self.keys, indices)
            elif self.paths[name]:
                self.datasets[name] = self._open_split(name)
        self._units = {name: units[ds.indices] for name, ds in self.datasets.items() if name in {"train", *self.cut}}
        for name, ds in self.datasets.items():
            self._check_not_empty(name, ds)
        if "val" not in self.datasets:
            raise GlintError(f"{train.label}: no validation tiles; set data.val_path=... or data.val_fraction>0")
        self.depth_stats = depth_statistics(self.datasets["train"], hp.norm_samples, self.depth_clip)
        log.info("data: %s", self._summary())

    def _summary(self) -> str:
        """One line: the split unit, and tiles (and units, for cut splits) per split."""
        unit = UNIT_NAMES[self.split_by or "tile"]
        parts = [
            f"{name} {len(ds)} tiles"
            + (f" / {len(np.unique(self._units[name]))} {unit}" if name in self._units else f" ({ds.label})")
            for name, ds in self.datasets.items()
        ]
        fold = f", fold {self.hparams.fold} of {self.hparams.folds} validates" if self.hparams.folds else ""
        return f"split by {self.split_by}{fold}: " + ", ".join(parts)

    def split_units(self, name: str) -> np.ndarray:
        """The split unit (frame id, file position or tile index, per `split_by`) of each tile of split `name`, in
        the order of `datasets[name].indices`; for a split with its own files, units within those files."""
        if name not in self._units:
            ds = self.datasets[name]
            by = self.split_by or "tile"
            by = "tile" if by == "frame" and not all(f.has_frame for f in ds.files) else by
            self._units[name] = tile_units(ds.files, self.keys, by)[ds.indices]
        return self._units[name]

    def setup_split(self, name: str) -> None:
        """Open only what scoring split `name` (train, val or test) needs: its own file(s) when it has them (a file
        of the demo set is generated first), else the training files and their split, as `setup` does."""
        own = self.paths[name] if name != "train" else None
        if own is None:
            self.prepare_data()
            self.setup()
            return
        if name in self.demo_splits:
            self.prepare_data()
        if name not in self.datasets:
            self.datasets[name] = self._open_split(name)
            self._check_not_empty(name, self.datasets[name])

    def _check_not_empty(self, name: str, ds: H5Tiles) -> None:
        if len(ds) == 0:
            finer = "" if self.split_by in (None, "tile") else f" or a finer data.split_by (now {self.split_by})"
            raise GlintError(
                f"{ds.label}: the {name} split is empty; add tiles or change data.val_fraction/test_fraction{finer}"
            )

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = file_fingerprint(path)
        return self._fingerprints[path]

    def data_files(self) -> dict[str, str]:
        """{split: file} for provenance(): `train` for a single file, `train[0]`, `train[1]`, ... for several."""
        out = {}
        for name, ds in self.datasets.items():
            paths = ds.paths
            out.update({name: paths[0]} if len(paths) == 1 else {f"{name}[{i}]": p for i, p in enumerate(paths)})
        return out

    def describe(self) -> dict[str, Any]:
        """Plain-data summary written next to the run (data.json): files with fingerprints, split unit and sizes,
        folds, the val split's global tile indices, normalisation statistics."""
        splits = {}
        for name, ds in self.datasets.items():
            files = [{"path": f.path, "tiles": f.n, "fingerprint": self._fingerprint(f.path)} for f in ds.files]
            entry = {"path": ds.info.path, "tiles": len(ds), "files": files}
            if name in self._units:
                entry["units"] = int(len(np.unique(self._units[name])))
                entry["from"] = "train_path"
            splits[name] = entry
        val = self.datasets.get("val")
        return {
            "splits": splits,
            "split_by": self.split_by,
            "split_seed": self.hparams.split_seed,
            "folds": self.hparams.folds,
            "fold": self.hparams.fold,
            "tiles": {name: len(ds) for name, ds in self.datasets.items()},
            "units": {name: entry.get("units") for name, entry in splits.items()},
            "val_indices": val.indices.tolist() if val is not None and "val" in self.cut else None,
            "depth_mean_mm": self.depth_stats[0] if self.depth_stats else None,
            "depth_std_mm": self.depth_stats[1] if self.depth_stats else None,
            "depth_clip_mm": list(self.depth_clip) if self.depth_clip else None,
        }

    def save_description(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.describe(), indent=1))

    def has_split(self, name: str) -> bool:
        return name in self.datasets

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader(self, cls: type[TileLoader], ds: H5Tiles, batch_size: int, **kwargs: Any) -> TileLoader:
        """A loader with this module's worker options; pinning happens as batches leave the workers' slots."""
        workers = self.hparams.num_workers
        persistent = self.hparams.persistent_workers and workers > 0
        loader = cls(
            ds,
            batch_size=batch_size,
            num_workers=workers,
            persistent_workers=persistent,
            collate_fn=collate_tiles,
            **kwargs,
        )
        loader.pin_tiles = self.hparams.pin_memory
        return loader

    def eval_loader(self, name: str, shard: bool = True) -> TileLoader:
        """Tiles of split `name` in the order of `datasets[name].indices`; under DDP (shard=True) each rank gets
        its own slice, and torchmetrics sums the counts over ranks."""
        ds = self.datasets[name]
        rank, world = self._rank_and_world() if shard else (0, 1)
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(TileLoader, ds, batch_size, sampler=range(rank, len(ds), world))

    def train_dataloader(self) -> ResumableLoader:
        ds = self.datasets["train"]
        rank, world = self._rank_and_world()
        sampler = EpochShuffleSampler(len(ds), self.seed, rank, world)
        if self.trainer is not None:  # Lightning sets the epoch only after the first iter(); workers start before
            sampler.set_epoch(self.trainer.current_epoch)
        batch_size = self.hparams.batch_size
        drop_last = len(sampler) > batch_size
        self.train_loader = self._loader(ResumableLoader, ds, batch_size, sampler=sampler, drop_last=drop_last)
        return self.train_loader

    def val_dataloader(self) -> TileLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> TileLoader:
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
