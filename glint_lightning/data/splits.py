"""Held-out splits and cross-validation folds made of whole units (frames, files or tiles), so that no frame
(or file) has tiles on both sides. Pure functions of the units and the seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from glint_lightning.utils.errors import GlintError


def hold_out(units: np.ndarray, targets: Sequence[int], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """([positions of group i], positions of the rest), all sorted: groups of whole units taken in turn from a
    permutation of the distinct units drawn with `seed`.

    Group i takes the run of units whose tile count is closest to targets[i] (at least one unit when the target
    is positive, and never the last unit, which stays with the rest). With one tile per unit this is exactly
    the first targets[0] tiles of the permutation, then the next targets[1], as a plain tile split.
    """
    distinct, inverse, counts = np.unique(units, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(distinct))
    cum = np.cumsum(counts[order])
    group_of = np.full(len(distinct), len(targets))  # the rest unless a group takes the unit
    start = taken = 0
    for g, target in enumerate(targets):
        stop = start
        if target > 0 and start < len(distinct) - 1:
            reach = cum[start : len(distinct) - 1] - taken
            stop = start + 1 + int(np.argmin(np.abs(reach - target)))
            taken = int(cum[stop - 1])
        group_of[order[start:stop]] = g
        start = stop
    tile_group = group_of[inverse.reshape(-1)]
    groups = [np.flatnonzero(tile_group == g) for g in range(len(targets))]
    return groups, np.flatnonzero(tile_group == len(targets))


def assign_folds(units: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id (0..k-1) of every tile: each unit whole in one fold, fold sizes balanced by tiles.

    Units go, largest first (ties in an order drawn with `seed`), to the fold holding the fewest tiles so far;
    with equal-sized units that is a round robin over a seeded permutation. Depends only on (units, k, seed).
    """
    if k < 2:
        raise GlintError(f"data.folds={k}; use at least 2 folds")
    distinct, inverse, counts = np.unique(units, return_inverse=True, return_counts=True)
    if len(distinct) < k:
        raise GlintError(
            f"data.folds={k}: only {len(distinct)} split units to share out; use fewer folds or a finer data.split_by"
        )
    perm = np.random.default_rng(seed).permutation(len(distinct))
    order = perm[np.argsort(-counts[perm], kind="stable")]
    fold_of = np.empty(len(distinct), dtype=np.int64)
    if (counts == counts[0]).all():
        fold_of[order] = np.arange(len(distinct)) % k
    else:
        load = [0] * k
        for u, size in zip(order.tolist(), counts[order].tolist()):
            f = min(range(k), key=load.__getitem__)
            fold_of[u] = f
            load[f] += size
    return fold_of[inverse.reshape(-1)]
