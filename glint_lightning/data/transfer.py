"""How a batch of tiles crosses from a DataLoader worker to the main process cheaply.

A batch is one buffer: depth (float32), mask (float32) and valid (bool) are views of it. Sending a tensor from a
worker costs a fresh shared-memory buffer (page faults, zero-filling) and, per tensor, a socket round trip that
waits for the worker to be scheduled: more than reading the tiles. So TileLoader gives each worker a few slots in
shared memory that it maps before the workers start; a worker writes a batch into a free slot and sends only a
SlotRef, and the main process hands out tensors over that slot, which is freed when the last of them is gone.
A worker with no free slot, or a plain DataLoader, sends the batch as tensors instead: slower, never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

KEYS = ("depth", "mask", "valid")
BYTES_PER_PIXEL = 9  # float32 depth + float32 mask + bool valid


def batch_views(buf: torch.Tensor, n: int, h: int, w: int) -> dict[str, torch.Tensor]:
    """depth, mask, valid as (n, 1, h, w) views of the uint8 tensor `buf` (9 n h w bytes)."""
    m = n * h * w
    return {
        "depth": buf[: 4 * m].view(torch.float32).view(n, 1, h, w),
        "mask": buf[4 * m : 8 * m].view(torch.float32).view(n, 1, h, w),
        "valid": buf[8 * m : 9 * m].view(torch.bool).view(n, 1, h, w),
    }


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A fresh uint8 tensor in shared memory: a batch written there crosses to the main process without a copy."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


@dataclass(frozen=True)
class SlotRef:
    """What a worker sends for a batch it wrote into slot `slot` of its pool."""

    worker: int
    slot: int
    n: int
    h: int
    w: int


class SlotPool:
    """One worker's batch slots in shared memory, created by the main process; slot i is free while flag i is 0."""

    def __init__(self, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.flags = shared_buffer(slots)
        self.flags.zero_()
        self.buf = shared_buffer(slots * self.slot_bytes)

    def take(self, nbytes: int) -> tuple[int, torch.Tensor] | None:
        """(slot, its first `nbytes`) marked in use; None when all are in use or the batch is larger."""
        flags = self.flags.numpy()
        free = np.flatnonzero(flags == 0)
        if nbytes > self.slot_bytes or not len(free):
            return None
        slot = int(free[0])
        flags[slot] = 1
        return slot, self.buf[slot * self.slot_bytes : slot * self.slot_bytes + nbytes]

    def lend(self, ref: SlotRef, pin: bool) -> dict[str, torch.Tensor]:
        """Main process: the batch in slot `ref.slot` as tensors over the slot itself, which is freed when the last
        of them (or of their views) is gone; with `pin`, copied into pinned memory and freed at once."""
        start = ref.slot * self.slot_bytes
        region = self.buf.numpy()[start : start + BYTES_PER_PIXEL * ref.n * ref.h * ref.w]
        if pin:
            out = torch.empty(len(region), dtype=torch.uint8, pin_memory=True)
            np.copyto(out.numpy(), region)  # numpy: one thread, no parallel region to stall
            self.flags.numpy()[ref.slot] = 0  # only after the copy: the worker may now reuse the slot
        else:
            lease = region.view(_Lease)
            lease.flags, lease.slot = self.flags.numpy(), ref.slot
            out = torch.from_numpy(lease)  # holds the lease for as long as the storage lives
        return batch_views(out, ref.n, ref.h, ref.w)


class _Lease(np.ndarray):
    """A slot's bytes whose end frees the slot. torch.from_numpy keeps it referenced for as long as any tensor
    or view of the batch lives, so a slot is never rewritten under a batch still in use."""

    flags: np.ndarray | None = None
    slot = -1

    def __del__(self) -> None:
        if self.flags is not None:
            self.flags[self.slot] = 0


def pinned(batch: Any) -> Any:
    """The batch's depth/mask/valid copied into one pinned buffer (one copy, where pin_memory would make two)."""
    if not isinstance(batch, dict) or not all(isinstance(batch.get(k), torch.Tensor) for k in KEYS):
        return batch
    n, _, h, w = batch["depth"].shape
    out = torch.empty(BYTES_PER_PIXEL * n * h * w, dtype=torch.uint8, pin_memory=True)
    views = batch_views(out, n, h, w)
    for k in KEYS:
        np.copyto(views[k].numpy(), batch[k].numpy())
    return {**batch, **views}


class _PoolIter(_MultiProcessingDataLoaderIter):
    _pools: list[SlotPool] | None = None
    _pin_tiles = False
    _draining = False

    def _free(self, data: Any) -> None:
        if self._pools and isinstance(data, SlotRef):
            self._pools[data.worker].flags.numpy()[data.slot] = 0

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        """A new epoch on persistent workers: batches of the last one that were received but not yielded, or that
        the reset drains, are dropped, so their slots are freed (the workers have finished writing them)."""
        for info in getattr(self, "_task_info", {}).values():
            self._free(info[1] if len(info) == 2 else None)
        self._draining = True
        try:
            super()._reset(loader, first_iter)
        finally:
            self._draining = False

    def _get_data(self) -> tuple[Any, Any]:
        idx, data = super()._get_data()
        if self._draining:
            self._free(data)
        return idx, data

    def _next_data(self) -> Any:
        data = super()._next_data()
        if isinstance(data, SlotRef):
            return self._pools[data.worker].lend(data, self._pin_tiles)
        return pinned(data) if self._pin_tiles else data


class _PinIter(_SingleProcessDataLoaderIter):
    def _next_data(self) -> Any:
        return pinned(super()._next_data())


class TileLoader(DataLoader):
    """DataLoader for H5Tiles: batches from workers come through slots (see the module docstring).

    `pin_tiles` pins batches as they arrive (the DataLoader's own pin_memory would copy them once more).
    """

    pin_tiles = False

    def _get_iterator(self) -> Any:
        pin = self.pin_tiles and torch.cuda.is_available()
        if self.num_workers == 0:
            return _PinIter(self) if pin else super()._get_iterator()
        self.check_worker_number_rationality()
        tile_bytes = getattr(self.dataset, "tile_bytes", None)
        if not tile_bytes or not self.batch_size:
            it = _PoolIter(self)
        else:
            slots = (self.prefetch_factor or 2) + 3  # in flight, plus those the training loop still holds
            pools = [SlotPool(self.batch_size * tile_bytes, slots) for _ in range(self.num_workers)]
            self.dataset.slot_pools = pools  # the workers fork (or unpickle the data set) in _PoolIter(self)
            try:
                it = _PoolIter(self)
            finally:
                self.dataset.slot_pools = None  # so that no other loader's workers write into these slots
            it._pools = pools
        it._pin_tiles = pin
        return it
