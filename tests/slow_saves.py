"""`python -m tests.slow_saves [overrides]`: glint_lightning.train with every checkpoint write held open for half
a second (a slow fsync), so a test can aim a kill into the middle of a save."""

import os
import runpy
import time

_fsync = os.fsync


def _slow_fsync(fd: int) -> None:
    time.sleep(0.5)
    _fsync(fd)


if __name__ == "__main__":
    os.fsync = _slow_fsync
    runpy.run_module("glint_lightning.train", run_name="__main__", alter_sys=True)
