"""One writer per run dir: two `train`s on one dir would overwrite each other's last.ckpt, and one would delete the
other's half-written checkpoint as a stale temporary.

`train` creates `<run dir>/train.lock` atomically (O_CREAT | O_EXCL) holding its pid, host and start time, and
removes it when it ends, also on errors and interrupts. A second `train` finds it and stops with one line naming
the other process. A lock whose process is gone (same host: no such pid, a zombie, or the pid reused by a process
started later) is taken over with a note; on another host nobody can tell, so the line says which file to delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from glint_lightning.runs import slurm
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.log import get_logger

log = get_logger(__name__)

LOCK_NAME = "train.lock"


class RunDirLocked(GlintError):
    """Another live process trains in this run dir."""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc (Linux), or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], fields[19]


def _me() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "proc_start": stat[1] if stat else None,
        "token": uuid.uuid4().hex,
        "argv": sys.argv[1:],
        "slurm_job": slurm.job_key(),
        "slurm_restart": slurm.restart_count(),
    }


def is_running(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote `owner` may still run (True when that cannot be told: another host)."""
    job = owner.get("slurm_job")
    if job and job == slurm.job_key() and int(owner.get("slurm_restart") or 0) < slurm.restart_count():
        return False  # this SLURM job's earlier run: SLURM ends a job's processes before it starts it again
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and owner.get("proc_start") in (None, start)


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's owner, or None while it is empty or unreadable (being written, or torn by a crash)."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/train.lock` for the block."""

    def __init__(self, run_dir: Path, patience_s: float = 2.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.patience_s = patience_s  # how long an empty lock file may be "being written" before it counts as torn
        self._mine: dict[str, Any] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me, empty_since = _me(), None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = _read(self.path)
                except FileNotFoundError:
                    continue  # released in between: try again
                if owner is None:
                    empty_since = empty_since or time.monotonic()
                    if time.monotonic() - empty_since < self.patience_s:
                        time.sleep(0.05)
                        continue
                    self._take_over(owner, "an unreadable lock file")
                elif is_running(owner):
                    raise RunDirLocked(self._refusal(owner)) from None
                else:
                    self._take_over(owner, f"pid {owner.get('pid')} is no longer running")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._mine = me
            return

    def _refusal(self, owner: dict[str, Any]) -> str:
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        elsewhere = owner.get("host") != socket.gethostname()
        tail = f"; if it is no longer running, delete {self.path}" if elsewhere else ""
        return (
            f"{self.path.parent}: another glint train is writing to this run dir ({who}); wait for it to end or "
            f"pass another hydra.run.dir{tail}"
        )

    def _take_over(self, owner: dict[str, Any] | None, why: str) -> None:
        """Remove a dead owner's lock; never one that a live process put there meanwhile."""
        aside = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)  # atomic: only one taker gets this file
        except FileNotFoundError:
            return
        try:
            now = _read(aside)
        except FileNotFoundError:
            now = None
        if now != owner and now is not None:  # a live process's lock replaced the dead one: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            log.warning(f"note: {self.path}: took over the lock ({why})")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        mine, self._mine = self._mine, None
        if mine is None:
            return
        try:
            owner = _read(self.path)
        except FileNotFoundError:
            return
        if owner is not None and owner.get("token") == mine["token"]:
            self.path.unlink(missing_ok=True)
