"""How a batch of tiles crosses from a DataLoader worker to the main process cheaply.

A batch is one buffer: depth (float32), mask (float32) and valid (bool) are views of it. Sending a tensor from a
worker costs a fresh shared-memory buffer (page faults, a copy) and, per tensor, a socket round trip that waits for
the worker to be scheduled: more than reading the tiles (benchmarks/loader_throughput.py --transport, 2 workers:
the slots deliver 2.2-6.8x the stock DataLoader's tiles/s with the same reads for 128-256 px tiles, 0.8-2.1x for 64
px, on a shared 2-core machine). So TileLoader gives each worker a few slots in shared memory
(`Tensor.share_memory_`) before the workers start; a worker writes a batch into a free slot and sends only a
SlotRef, and the main process hands out tensors over that slot, which is freed when the last of them is gone. A
SlotRef the DataLoader drops unread (an epoch reset on persistent workers discards prefetched batches) frees its
slot as it goes. A worker with no free slot, or a plain DataLoader, sends the batch as tensors instead: slower,
never wrong. Only public torch APIs: the stock iterator does the work, TileLoader wraps it.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

KEYS = ("depth", "mask", "valid")
BYTES_PER_PIXEL = 9  # float32 depth + float32 mask + bool valid

_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()  # the main process's pools
_TOKENS = itertools.count()


def batch_views(buf: torch.Tensor, n: int, h: int, w: int) -> dict[str, torch.Tensor]:
    """depth, mask, valid as (n, 1, h, w) views of the uint8 tensor `buf` (9 n h w bytes)."""
    m = n * h * w
    return {
        "depth": buf[: 4 * m].view(torch.float32).view(n, 1, h, w),
        "mask": buf[4 * m : 8 * m].view(torch.float32).view(n, 1, h, w),
        "valid": buf[8 * m : 9 * m].view(torch.bool).view(n, 1, h, w),
    }


class SlotPool:
    """One worker's batch slots in shared memory, created by the main process; slot i is free while flag i is 0.

    Only the worker sets a flag (0 -> 1, in take) and only the main process clears it, so no lock is needed.
    """

    def __init__(self, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.flags = torch.zeros(slots, dtype=torch.uint8).share_memory_()
        self.buf = torch.empty(slots * self.slot_bytes, dtype=torch.uint8).share_memory_()
        self.token = next(_TOKENS)
        _POOLS[self.token] = self

    def take(self, nbytes: int) -> tuple[int, torch.Tensor] | None:
        """Worker: (slot, its first `nbytes`) marked in use; None when all are in use or the batch is larger."""
        flags = self.flags.numpy()
        free = np.flatnonzero(flags == 0)
        if nbytes > self.slot_bytes or not len(free):
            return None
        slot = int(free[0])
        flags[slot] = 1
        return slot, self.buf[slot * self.slot_bytes : slot * self.slot_bytes + nbytes]


class SlotRef:
    """What a worker sends for a batch it wrote into slot `slot` of pool `pool`.

    Unpickled in the main process, it owns the slot until `batch()` hands it on, and frees it if dropped unread.
    """

    def __init__(self, pool: int, slot: int, n: int, h: int, w: int) -> None:
        self.pool, self.slot, self.n, self.h, self.w = pool, slot, n, h, w
        self.owner: int | None = None  # the pid that owns the slot: set on arrival, cleared when handed on

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, owner=os.getpid())

    def __del__(self) -> None:
        pool = _POOLS.get(self.pool) if self.owner is not None and self.owner == os.getpid() else None
        if pool is not None:
            pool.flags.numpy()[self.slot] = 0

    def batch(self, pin: bool) -> dict[str, torch.Tensor]:
        """Main process: the batch as tensors over the slot itself, which is freed when the last of them (or of
        their views) is gone; with `pin`, copied into pinned memory and freed at once."""
        pool = _POOLS[self.pool]
        start = self.slot * pool.slot_bytes
        region = pool.buf.numpy()[start : start + BYTES_PER_PIXEL * self.n * self.h * self.w]
        if pin:
            out = torch.empty(len(region), dtype=torch.uint8, pin_memory=True)
            np.copyto(out.numpy(), region)  # numpy: one thread, no parallel region to stall
            pool.flags.numpy()[self.slot], self.owner = 0, None  # only after the copy: the worker may reuse it
        else:
            lease = region.view(_Lease)
            lease.flags, lease.slot, lease.owner = pool.flags.numpy(), self.slot, self.owner
            self.owner = None  # handed on: the lease frees the slot
            out = torch.from_numpy(lease)  # holds the lease for as long as the storage lives
        return batch_views(out, self.n, self.h, self.w)


class _Lease(np.ndarray):
    """A slot's bytes whose end frees the slot. torch.from_numpy keeps it referenced for as long as any tensor
    or view of the batch lives, so a slot is never rewritten under a batch still in use."""

    flags: np.ndarray | None = None
    slot = -1
    owner: int | None = None

    def __del__(self) -> None:
        if self.flags is not None and self.owner == os.getpid():  # not a copy inherited by a forked worker
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


class TileLoader(DataLoader):
    """DataLoader for H5Tiles: batches from workers come through slots (see the module docstring).

    `pin_tiles` pins batches as they arrive (the DataLoader's own pin_memory would copy them once more).
    `slot_pools` are the workers' pools: new ones for each start of workers, kept while persistent workers live.
    """

    pin_tiles = False
    slot_pools: list[SlotPool] | None = None

    def _pools(self) -> list[SlotPool] | None:
        tile_bytes = getattr(self.dataset, "tile_bytes", None)
        if not self.num_workers or not tile_bytes or not self.batch_size:
            return None
        if self.slot_pools is None or not self.persistent_workers:
            slots = (self.prefetch_factor or 2) + 3  # in flight, plus those the training loop still holds
            self.slot_pools = [SlotPool(self.batch_size * tile_bytes, slots) for _ in range(self.num_workers)]
        return self.slot_pools

    def __iter__(self) -> Iterator[Any]:
        pin, pools = self.pin_tiles and torch.cuda.is_available(), self._pools()
        if pools is None:
            return self._received(super().__iter__(), pin, pools)
        self.dataset.slot_pools = pools  # workers start (fork, or unpickle the data set) in super().__iter__()
        try:
            return self._received(super().__iter__(), pin, pools)
        finally:
            self.dataset.slot_pools = None  # so that no other loader's workers write into these slots

    @staticmethod
    def _received(batches: Iterator[Any], pin: bool, pools: list[SlotPool] | None) -> Iterator[Any]:
        """The batches as tensors; `pools` stay alive (and registered) for as long as this epoch's iteration."""
        for data in batches:
            if isinstance(data, SlotRef):
                yield data.batch(pin)
            else:
                yield pinned(data) if pin else data
