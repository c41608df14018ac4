"""One writer per run dir: two `train`s on one dir would overwrite each other's last.ckpt, and one would delete the
other's half-written checkpoint as a stale temporary.

`train` holds an exclusive `fcntl.flock` on `<run dir>/train.lock`, which the kernel releases when the process ends,
however it ends (`kill -9` included), so a crash leaves no lock behind; the file names the holder (pid, host, start
time) for the refusal, and is removed when the run ends. A second `train` stops with one line naming the holder; a
file left by a killed run is taken over with a note. A lock held on a shared file system by a node that died stays
until the file server drops it, so a refusal naming another host says which file to delete; a requeued SLURM job
does that itself for its own earlier run (SLURM ends a job's processes before it starts the job again).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from glint_lightning.runs import slurm
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.log import get_logger

log = get_logger(__name__)

LOCK_NAME = "train.lock"
_HELD: list[BinaryIO] = []  # the locks this process holds


def _drop_in_child() -> None:
    """In a forked child (a DataLoader worker): point the inherited lock descriptors at /dev/null, so a killed train's
    lock ends with it, not seconds later with its workers. Not closed, nor unlocked (that would unlock the parent)."""
    null = os.open(os.devnull, os.O_RDONLY)
    for f in _HELD:
        os.dup2(null, f.fileno())
    os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunDirLocked(GlintError):
    """Another live process trains in this run dir."""


def try_lock(path: Path) -> BinaryIO | None:
    """Open (creating it) and exclusively lock `path` without waiting: the open file, which holds the lock until it is
    closed or the process ends, or None when another open file holds it (also one of this process: a lock belongs
    to the open file). The content is left as it is. Raises OSError where the file system has no locks."""
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
        f.close()  # the holder removed the path between our open and our lock: lock the new file


def _same_file(f: BinaryIO, path: Path) -> bool:
    """Whether the open file is still the one at `path` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(f.fileno()))
    except FileNotFoundError:
        return False


def earlier_run_of_this_job(owner: dict[str, Any]) -> bool:
    """Whether `owner` is an earlier run of this requeued SLURM job (ended by SLURM, wherever its lock still is)."""
    job = owner.get("slurm_job")
    return bool(job) and job == slurm.job_key() and int(owner.get("slurm_restart") or 0) < slurm.restart_count()


def _parse(text: bytes) -> dict[str, Any] | None:
    """The owner a lock file names, or None while it is empty or unreadable (being written, or torn by a crash)."""
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/train.lock` for the block."""

    def __init__(self, run_dir: Path, patience_s: float = 2.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.patience_s = patience_s  # how long a held lock may name no owner (being written) before the refusal
        self._file: BinaryIO | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        unnamed_since = None
        while True:
            existed = self.path.exists()
            try:
                f = try_lock(self.path)
            except OSError as err:
                log.warning(
                    f"note: {self.path}: this file system has no file locks ({err.strerror}); a second train on "
                    "this run dir is not refused"
                )
                return
            if f is not None:
                self._hold(f, existed)
                return
            try:
                owner = _parse(self.path.read_bytes())
            except FileNotFoundError:  # its holder just ended
                continue
            if owner is None:  # the holder is between its lock and its write
                unnamed_since = unnamed_since or time.monotonic()
                if time.monotonic() - unnamed_since < self.patience_s:
                    time.sleep(0.05)
                    continue
                raise RunDirLocked(self._refusal({}))
            if not earlier_run_of_this_job(owner):
                raise RunDirLocked(self._refusal(owner))
            self.path.unlink(missing_ok=True)  # its dead node's lock: the next try locks a new file
            log.warning(f"note: {self.path}: took over the lock (SLURM ended pid {owner.get('pid')} of this job)")

    def _hold(self, f: BinaryIO, existed: bool) -> None:
        """Write this process's record into the file it has locked, noting a record left by a killed run."""
        f.seek(0)
        left = f.read()
        if left or existed:
            owner = _parse(left)
            why = f"pid {owner.get('pid')} is no longer running" if owner else "an unreadable lock file"
            log.warning(f"note: {self.path}: took over the lock ({why})")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        me.update(argv=sys.argv[1:], slurm_job=slurm.job_key(), slurm_restart=slurm.restart_count())
        f.truncate(0)
        f.write(json.dumps(me).encode())
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        _HELD.append(f)

    def _refusal(self, owner: dict[str, Any]) -> str:
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        who = who if owner else f"{self.path.name} names no process"
        elsewhere = bool(owner) and owner.get("host") != socket.gethostname()
        tail = f"; if it is no longer running, delete {self.path}" if elsewhere else ""
        return (
            f"{self.path.parent}: another glint train is writing to this run dir ({who}); wait for it to end or "
            f"pass another hydra.run.dir{tail}"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first: a waiting taker then locks a new file)."""
        f, self._file = self._file, None
        if f is None:
            return
        _HELD.remove(f)
        try:
            if _same_file(f, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            f.close()
