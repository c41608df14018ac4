"""Randomness keyed to counters (seed, epoch, step) instead of the global RNG stream, so a resumed run
draws exactly what an uninterrupted one would have drawn."""

from __future__ import annotations

import numpy as np

# Separate streams so that shuffling, augmentation and dropout never share draws.
STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_DROPOUT = 0, 1, 2


def derive_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed that depends only on (seed, *counters)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(c) for c in counters)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF
