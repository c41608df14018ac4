"""Exclusive locks that the kernel releases when their process ends, however it ends (`kill -9` included).

One helper for everything that locks (the run dir's `train.lock`, an Optuna study file's `.lock`): `fcntl.flock`
on an open file, never a lock file whose mere existence is the lock, so a crashed process leaves nothing to clean
up. A lock belongs to the open file, not the process: two opens of one path in one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO


def try_lock(path: Path) -> BinaryIO | None:
    """Open (creating it) and exclusively lock `path` without waiting: the open file, which holds the lock until it is
    closed or the process ends, or None when another open file holds it.

    The file's content is left as it is (it may name the holder). Raises OSError where the file system has no locks.
    """
    while True:
        f = open(path, "a+b")  # noqa: SIM115 (returned open: it holds the lock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        except OSError:
            f.close()
            raise
        if _same_file(f, path):
            return f
        f.close()  # the holder removed or replaced the path between our open and our lock: lock the new one


def _same_file(f: BinaryIO, path: Path) -> bool:
    """Whether the open file is still the one at `path` (not unlinked or replaced since it was opened)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(here, os.fstat(f.fileno()))
