"""A tiny Hydra app for sweeper tests (no training): `python -m tests.optuna_task --config-dir <dir> ...`.

Its config (written by the test) sets `x` (the swept value), `out` (a folder) and optionally `fail_above`. Job n
records its start in `<out>/started_<n>_<pid>`, waits while `<out>/hold_<n>` exists, and returns x (raises when x
is above fail_above), so a test can kill a sweep mid-trial or hold two launches' trials at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name="task")
def main(cfg: DictConfig) -> float:
    out, job = Path(cfg.out), HydraConfig.get().job.num
    (out / f"started_{job}_{os.getpid()}").write_text(str(cfg.x))
    end = time.monotonic() + 120
    while (out / f"hold_{job}").exists() and time.monotonic() < end:
        time.sleep(0.05)
    if cfg.get("fail_above") is not None and cfg.x > cfg.fail_above:
        raise ValueError(f"x={cfg.x} is above {cfg.fail_above}")
    return float(cfg.x)


if __name__ == "__main__":
    main()
